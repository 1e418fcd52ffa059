"""The built-in models, by name: one registry that the CLI, the benchmarks and the tests share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from ..errors import ModelError
from ..frames import EDM, FLOW, Frame
from .analytic import EmpiricalDenoiser, GaussianMixture
from .digits import digits_data
from .flow import FlowDenoiser, FlowGaussianMixture

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CondDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ModelInfo:
    """A denoiser with what sampling needs to know about it. For a flow model (`frame` FLOW) the denoiser is
    D(x_t, t) in the flow frame and sigma_min / sigma_max are its flow-time range t_min / t_max (t_max = 1)."""

    name: str
    denoiser: Denoiser
    shape: tuple[int, ...]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    description: str = ""
    exact: bool = False  # True when D is the exact posterior mean (analytic models)
    bottleneck: torch.nn.Module | None = field(default=None, repr=False)
    fingerprint: str = ""  # identifies the weights: cached results of another version are not reused
    # conditional models (fewstep.conditioning): labels 0…K−1 and the null label ∅ = K; `denoiser` is D(x, σ, ∅)
    num_classes: int = 0  # 0 = unconditional
    cond_denoiser: CondDenoiser | None = field(default=None, repr=False)  # raw D(x, σ, labels [B])
    with_prompts: Callable[[list[str]], ModelInfo] | None = field(default=None, repr=False)  # prompt models:
    # the same model conditioned on prompt indices 0…P−1 (∅ = P), prompts encoded once
    noisy_classifier: torch.nn.Module | None = field(default=None, repr=False)  # logits(x, σ): classifier guidance
    condition_key: str = ""  # set when conditions are bound: cached references are kept per condition set
    conditions: Any = None  # the ConditionSpec bound into `denoiser` (conditioning.conditioned_model), else None
    device: str = "cpu"  # where the weights live: noise and solver state go there (fewstep.device.to_device)
    frame: Frame = EDM  # the solver coordinates (fewstep.frames): EDM σ-space, or the flow frame
    # latent models (diffusers pipelines, `diffusers:DIR`): final states → images [B, C, H, W] in [−1, 1], which
    # `fewstep sample` writes as PNGs (None: the states are the images)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    schedule: str = ""  # the model's own grid (a schedule spec, e.g. 'flow:shift=3') where a method names none
    state_dtype: torch.dtype = torch.float64  # noise and solver state in `sample` / `bench` (networks cast)
    record: dict[str, Any] = field(default_factory=dict)  # more of what sampling manifests record about it


def gmm_parameters() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed `gmm` model: 8 isotropic components in 64 dims (1×8×8), written as closed formulas.

    μ_{k,d} = 0.6·sin(1.7k + 0.37(k+1)d), s_k = 0.05 + 0.03k, w_k ∝ k + 1 (k = 0…7, d = 0…63):
    component means lie in [−0.6, 0.6], so the data are roughly in [−1, 1].
    """
    k = torch.arange(8, dtype=torch.float64)[:, None]
    d = torch.arange(64, dtype=torch.float64)[None, :]
    means = 0.6 * torch.sin(1.7 * k + 0.37 * (k + 1) * d)
    stds = 0.05 + 0.03 * k[:, 0]
    weights = k[:, 0] + 1
    return means.reshape(8, 1, 8, 8), stds, weights / weights.sum()


def _gmm() -> ModelInfo:
    means, stds, weights = gmm_parameters()
    return ModelInfo(
        "gmm", GaussianMixture(means, stds, weights), (1, 8, 8),
        description="8-component Gaussian mixture in 64 dims, exact denoiser", exact=True,
    )


def _gmm_flow() -> ModelInfo:
    means, stds, weights = gmm_parameters()
    return ModelInfo(
        "gmm-flow", FlowGaussianMixture(means, stds, weights), (1, 8, 8), FLOW_T_MIN, 1.0,
        description="the gmm mixture as a rectified-flow model (exact D(x_t, t), flow time t from 1)", exact=True,
        frame=FLOW,
    )


def _digits_opt() -> ModelInfo:
    return ModelInfo(
        "digits-opt", EmpiricalDenoiser(digits_data()), (1, 8, 8),
        description="empirical optimal denoiser of sklearn digits in [-1, 1]", exact=True,
    )


def _digits() -> ModelInfo:
    """The shipped EDM-preconditioned U-Net trained on sklearn digits at 16×16 (EMA weights, eval mode).
    Raises ModelError when the weights file is missing or corrupt."""
    import hashlib

    from .unet import DIGITS_WEIGHTS, load_unet

    net = load_unet()
    return ModelInfo(
        "digits", net, net.shape, 0.002, 80.0,
        description="EDM U-Net trained on sklearn digits at 16x16 (see models/unet.py, data/digits_unet.json)",
        bottleneck=net.bottleneck, fingerprint=hashlib.sha1(DIGITS_WEIGHTS.read_bytes()).hexdigest()[:12],
    )


def _digits_cond() -> ModelInfo:
    """The class-conditional digits U-Net (10 classes, ∅ = 10; fine-tuned from `digits` with 10 % condition
    dropout, data/digits_cond_unet.json). `denoiser` is D(x, σ, ∅); bind classes with fewstep.conditioning."""
    import hashlib

    from .noisy_classifier import NOISY_CLASSIFIER_WEIGHTS, load_noisy_classifier
    from .unet import DIGITS_COND_WEIGHTS, load_unet

    net = load_unet(DIGITS_COND_WEIGHTS)
    if net.num_classes != 10:
        raise ModelError(f"{DIGITS_COND_WEIGHTS} is not a 10-class conditional U-Net")
    return ModelInfo(
        "digits-cond", net, net.shape, 0.002, 80.0,
        description="class-conditional EDM U-Net on sklearn digits (10 classes, classifier-free guidance)",
        bottleneck=net.bottleneck, fingerprint=hashlib.sha1(DIGITS_COND_WEIGHTS.read_bytes()).hexdigest()[:12],
        num_classes=10, cond_denoiser=net,
        noisy_classifier=load_noisy_classifier() if NOISY_CLASSIFIER_WEIGHTS.is_file() else None,
    )


def _digits_flow() -> ModelInfo:
    """The class-conditional rectified-flow U-Net on digits (velocity network, t ∈ [0, 1]; fine-tuned from
    `digits-cond` by flow matching with logit-normal t, data/digits_flow_unet.json)."""
    import hashlib

    from .unet import DIGITS_FLOW_WEIGHTS, load_unet

    net = load_unet(DIGITS_FLOW_WEIGHTS)
    if not net.flow or net.num_classes != 10:
        raise ModelError(f"{DIGITS_FLOW_WEIGHTS} is not a 10-class flow U-Net")
    flow = FlowDenoiser(net)
    return ModelInfo(
        "digits-flow", flow, net.shape, FLOW_T_MIN, 1.0,
        description="class-conditional rectified-flow U-Net on sklearn digits (velocity, sampled from t = 1)",
        bottleneck=net.bottleneck, fingerprint=hashlib.sha1(DIGITS_FLOW_WEIGHTS.read_bytes()).hexdigest()[:12],
        num_classes=10, cond_denoiser=flow, frame=FLOW,
    )


FLOW_T_MIN = 1e-3  # the built-in flow models' last grid time (diffusers' flow schedulers' 1/1000)
BUILTIN_MODELS: dict[str, Callable[[], ModelInfo]] = {"gmm": _gmm, "digits-opt": _digits_opt, "digits": _digits,
                                                      "digits-cond": _digits_cond, "gmm-flow": _gmm_flow,
                                                      "digits-flow": _digits_flow}
DEFAULT_MODEL = "gmm"


# `PREFIX:ARGUMENT` model specs and their loaders, named by string (as user factories are) so that the models
# layer has no import edge to fewstep.integrations, which reaches the solvers and optional packages
PREFIX_LOADERS = {"diffusers": "fewstep.integrations.diffusers_dir:load_pipeline_model"}


@cache
def load_model(name: str) -> ModelInfo:
    """A built-in model by name, a user model `package.module:factory` (or `path/file.py:factory`), or a local
    diffusers pipeline folder `diffusers:DIR` (fewstep.integrations.diffusers_dir); constructed once per process."""
    if name.partition(":")[0] in PREFIX_LOADERS:
        return load_prefixed(name)
    if ":" in name:
        return load_factory(name)
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}, "
                         "or package.module:factory")
    return BUILTIN_MODELS[name]()


def load_prefixed(spec: str) -> ModelInfo:
    """`PREFIX:ARGUMENT` through its loader in PREFIX_LOADERS (imported on demand; a missing optional package is
    a ModelError naming the extra to install)."""
    import importlib

    module_name, _, attr = PREFIX_LOADERS[spec.partition(":")[0]].partition(":")
    try:
        loader = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ModelError(f"--model {spec!r}: {e}") from e
    info = loader(spec)
    if not isinstance(info, ModelInfo):
        raise ModelError(f"--model {spec!r}: the loader returned {type(info).__name__}, not a ModelInfo")
    return info


def load_factory(spec: str) -> ModelInfo:
    """Import `package.module` (or the file `path/file.py`) and call its `factory()`.

    The factory returns a ModelInfo; or a dict with `denoiser` and `shape` (optional: sigma_min, sigma_max,
    bottleneck, description, name); or a denoiser callable D(x, σ) exposing `shape` (and optionally `sigma_min`,
    `sigma_max`, `bottleneck`) as attributes. A non-callable attribute holding one of these is used as is.
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ModelError(f"--model {spec!r}: expected package.module:factory")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ModelError(f"--model {spec!r}: file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(f"fewstep_user_model_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelError(f"--model {spec!r}: cannot import {module_name!r} ({e}); is it installed or on "
                         "PYTHONPATH? A file works too: path/to/file.py:factory") from e
    except ModelError:
        raise
    except SyntaxError as e:
        raise ModelError(f"--model {spec!r}: syntax error in {e.filename}, line {e.lineno}: {e.msg}") from e
    except Exception as e:  # the user's module raised while it was imported
        raise ModelError(f"--model {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e

    if not hasattr(module, attr):
        raise ModelError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if not isinstance(obj, (ModelInfo, dict)):
        if not callable(obj):
            raise ModelError(f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a factory")
        try:
            obj = obj()
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"--model {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    return _as_model_info(spec, obj)


def _as_model_info(spec: str, obj: object) -> ModelInfo:
    where = f"--model {spec!r}"
    if isinstance(obj, ModelInfo):
        info = obj
    elif isinstance(obj, dict):
        unknown = set(obj) - {"denoiser", "shape", "sigma_min", "sigma_max", "bottleneck", "description", "name"}
        if unknown or "denoiser" not in obj or "shape" not in obj:
            raise ModelError(f"{where}: the factory's dict needs 'denoiser' and 'shape' (optional: sigma_min, "
                             f"sigma_max, bottleneck, description, name); got keys {sorted(obj)}")
        info = ModelInfo(obj.get("name", spec), obj["denoiser"], obj["shape"], obj.get("sigma_min", 0.002),
                         obj.get("sigma_max", 80.0), obj.get("description", ""), bottleneck=obj.get("bottleneck"))
    elif callable(obj):
        if getattr(obj, "shape", None) is None:
            raise ModelError(f"{where}: the factory returned a denoiser without a `shape` attribute; return a "
                             "ModelInfo or a dict with 'denoiser' and 'shape' instead")
        info = ModelInfo(spec, obj, obj.shape, getattr(obj, "sigma_min", 0.002), getattr(obj, "sigma_max", 80.0),
                         getattr(obj, "description", ""), bottleneck=getattr(obj, "bottleneck", None))
    else:
        raise ModelError(f"{where}: the factory returned {type(obj).__name__}; expected a ModelInfo, a dict or a "
                         "denoiser callable")
    if not callable(info.denoiser):
        raise ModelError(f"{where}: the denoiser is not callable")
    try:
        info.shape = tuple(int(v) for v in info.shape)
        info.sigma_min, info.sigma_max = float(info.sigma_min), float(info.sigma_max)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: shape must be a tuple of ints and the sigma range numbers ({e})") from e
    if not info.shape or min(info.shape) < 1:
        raise ModelError(f"{where}: shape must be positive integers, got {info.shape}")
    if not (0 < info.sigma_min < info.sigma_max < float("inf")):
        raise ModelError(f"{where}: need 0 < sigma_min < sigma_max < inf, got {info.sigma_min}, {info.sigma_max}")
    if info.bottleneck is not None and not isinstance(info.bottleneck, torch.nn.Module):
        raise ModelError(f"{where}: bottleneck must be a torch.nn.Module, got {type(info.bottleneck).__name__}")
    return info
