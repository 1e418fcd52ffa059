"""What the ComfyUI nodes need from a ComfyUI model, without importing ComfyUI.

* The model family, read from the model's `model_sampling` (the `MODEL` patcher's
  `get_model_object("model_sampling")`, or `model.inner_model…model_sampling` inside a sampler): EPS,
  V_PREDICTION and EDM run in fewstep's EDM frame (ComfyUI's sigmas are σ), CONST ("flow": SD3, Flux, Wan) in the
  flow frame (sigmas are flow times t, x is x_t).
* The model's σ (or t) range and its flow shift, from which `sigmas` builds fewstep's schedules as ComfyUI
  SIGMAS: a decreasing float32 tensor ending with 0, `denoise < 1` cut like ComfyUI's BasicScheduler.
* `sampler_function`: a k-diffusion sampler function for `comfy.samplers.KSAMPLER` (fewstep's
  `integrations.kdiffusion` with the frame given explicitly, checks on the latent, and ComfyUI's own exceptions
  — an interrupt, out of memory — passed through unwrapped rather than as fewstep's DenoiserError).
* `NodeError`: the one-line error a node shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import DenoiserError, FewstepError, ScheduleError
from ..flow import parse_flow_arg
from ..frames import EDM, FLOW, Frame
from ..integrations.kdiffusion import run_solver
from ..schedules import get_schedule

FAMILIES = ("CONST", "EDM", "V_PREDICTION", "EPS")  # most derived first: EDM derives from V_PREDICTION from EPS
SCHEDULES = ("polynomial", "logsnr", "time_uniform", "kl_optimal", "flow", "oss", "ays", "gits", "discrete")
FLOW_ONLY = ("flow", "oss")
RANGE_RTOL = 1e-3  # a card's or checkpoint's σ grid may exceed an EDM-family model's σ range by this much


class NodeError(FewstepError, ValueError):
    """A node's inputs cannot work (another model's card, a missing folder, an option out of range): one line,
    prefixed with the node's name, for ComfyUI's error message."""

    def __init__(self, node: str, problem: object):
        text = str(problem).strip().splitlines()
        line = text[0] if text else type(problem).__name__
        super().__init__(line if isinstance(problem, NodeError) else f"{node}: {line}")


def family(sampling: Any) -> str:
    """ComfyUI's prediction type of a model_sampling object: CONST, EDM, V_PREDICTION, EPS, or the name of the
    first other class it derives from (X0, COSMOS_RFLOW, …)."""
    names = [c.__name__ for c in type(sampling).__mro__]
    for name in FAMILIES:
        if name in names:
            return name
    known = [n for n in names if n == n.upper()]
    return known[0] if known else type(sampling).__name__


def frame_of_sampling(sampling: Any) -> Frame:
    """The frame fewstep integrates a ComfyUI model in: flow for CONST, EDM (σ-space) for every other family."""
    return FLOW if family(sampling) == "CONST" else EDM


def model_sampling_of(model: Any) -> Any:
    """The model_sampling of a ComfyUI MODEL (a ModelPatcher), a BaseModel, or a sampler's model wrapper
    (KSamplerX0Inpaint → CFGGuider → BaseModel); None when there is none."""
    getter = getattr(model, "get_model_object", None)
    if callable(getter):
        try:
            return getter("model_sampling")
        except (AttributeError, KeyError):
            pass
    obj = model
    for _ in range(8):
        if obj is None:
            return None
        sampling = getattr(obj, "model_sampling", None)
        if sampling is not None:
            return sampling
        obj = getattr(obj, "model", None) or getattr(obj, "inner_model", None)
    return None


def sigma_range(sampling: Any) -> tuple[float, float]:
    """The model's (σ_min, σ_max), flow times for CONST."""
    return float(sampling.sigma_min), float(sampling.sigma_max)


def model_shift(sampling: Any) -> str:
    """A CONST model's own time shift as a flow-schedule option: 'mu=…' for Flux's exponential shift (ComfyUI's
    ModelSamplingFlux stores μ), else 'shift=…' (ModelSamplingDiscreteFlow; 1 when it has none)."""
    if any(c.__name__ == "ModelSamplingFlux" for c in type(sampling).__mro__):
        return f"mu={float(sampling.shift)!r}"
    return f"shift={float(getattr(sampling, 'shift', 1.0))!r}"


def describe(sampling: Any) -> str:
    lo, hi = sigma_range(sampling)
    what = "t" if frame_of_sampling(sampling) is FLOW else "σ"
    return f"a {family(sampling)} model ({what} ∈ [{lo:.4g}, {hi:.4g}])"


def sigmas(sampling: Any, schedule: str, steps: int, denoise: float = 1.0, rho: float = 0.0,
           argument: str = "") -> torch.Tensor:
    """ComfyUI SIGMAS of a fewstep schedule on the model's own range: `steps` model calls of a one-call solver
    (the grid's points, then 0); with `denoise < 1` the last `steps` of int(steps/denoise), as BasicScheduler.
    `rho` (0: the schedule's default) for polynomial / time_uniform; `argument`: flow options ('shift=3',
    'spacing=karras'; default the model's own shift), the OSS or AYS table ('flux', 'wan'; 'sd15', 'sdxl'), the
    GITS file."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ScheduleError(f"steps must be an integer >= 1, got {steps!r}")
    if not (math.isfinite(denoise) and 0 <= denoise <= 1):
        raise ScheduleError(f"denoise must lie in [0, 1], got {denoise!r}")
    if denoise == 0:
        return torch.zeros(0)
    flow = frame_of_sampling(sampling) is FLOW
    if schedule in FLOW_ONLY and not flow:
        raise ScheduleError(f"schedule {schedule!r} is for flow (CONST) models; this is {describe(sampling)}")
    total = steps if denoise >= 1 else int(steps / denoise)
    lo, hi = sigma_range(sampling)
    argument = argument.strip()
    name = schedule
    if schedule == "flow":
        opts = parse_flow_arg(argument)
        if not {"shift", "mu", "dynamic"} & set(opts):
            argument = ",".join(filter(None, [model_shift(sampling), argument]))
        name = f"flow:{argument}"
    elif schedule in ("oss", "ays", "gits"):
        default = {"oss": "flux", "ays": "", "gits": ""}[schedule]
        name = f"{schedule}:{argument or default}" if argument or default else schedule
    elif argument:
        raise ScheduleError(f"schedule {schedule!r} takes no argument, got {argument!r}")
    if rho and schedule not in ("polynomial", "time_uniform"):
        raise ScheduleError(f"schedule {schedule!r} takes no rho (0 = default), got {rho!r}")
    if total == 1:
        grid = torch.tensor([hi], dtype=torch.float64)
    else:
        table = SimpleNamespace(sigma_table=torch.as_tensor(getattr(sampling, "sigmas", torch.tensor([lo, hi]))))
        grid = get_schedule(name, total, lo, hi, rho=rho or None, model=table)
    full = torch.cat([grid, grid.new_zeros(1)]).to(torch.float32)
    return full[-(steps + 1):]


def check_grid_range(sampling: Any, grid: torch.Tensor, what: str) -> None:
    """Refuse a card's or checkpoint's grid the model cannot run (made for another model): outside an EDM-family
    model's σ range, or beyond t = 1 on a flow model (which takes any time in (0, 1])."""
    lo, hi = sigma_range(sampling)
    if frame_of_sampling(sampling) is FLOW:
        lo, hi = 0.0, 1.0
    g_hi, g_lo = float(grid[0]), float(grid[-1])
    if g_hi > hi * (1 + RANGE_RTOL) or g_lo < lo * (1 - RANGE_RTOL):
        raise NodeError(what, f"its grid spans σ ∈ [{g_lo:.4g}, {g_hi:.4g}], outside the range of "
                              f"{describe(sampling)}: it was made for another model")


def with_zero(grid: torch.Tensor) -> torch.Tensor:
    """A fewstep grid as ComfyUI SIGMAS: float32, then the final step to 0."""
    grid = grid.detach().to("cpu", torch.float64)
    return torch.cat([grid, grid.new_zeros(1)]).to(torch.float32)


def sampler_function(node: str, method: Any, options: dict[str, Any] | None = None, frame: Frame | None = None,
                     shape: list[int] | tuple[int, ...] | None = None,
                     run: Callable[..., torch.Tensor] = run_solver) -> Callable[..., torch.Tensor]:
    """A k-diffusion sampler function for ComfyUI's KSAMPLER running `method` (a solver name, spec or Solver)
    with `options` (solver options and afs / thresholding). The frame is read from the model each run; `frame`
    (a card's or checkpoint's) must match it, and `shape` (theirs) the latent's. `run` is the driver function
    (`run_solver`, or `sample_learned` with the card bound)."""
    options = dict(options or {})

    def sample(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict[str, Any] | None = None,
               callback: Callable[[dict[str, Any]], Any] | None = None, disable: bool | None = None,
               **extra: Any) -> torch.Tensor:
        sampling = model_sampling_of(model)
        model_frame = EDM if sampling is None else frame_of_sampling(sampling)
        if frame is not None and frame is not model_frame:
            kinds = {"edm": "a diffusion (EPS / V_PREDICTION / EDM)", "flow": "a flow-matching (CONST)"}
            here = describe(sampling) if sampling is not None else "not a ComfyUI model"
            raise NodeError(node, f"made for {kinds[frame.name]} model, but the sampled model is {here}")
        if shape is not None and list(x.shape[1:]) != list(shape):
            raise NodeError(node, f"made for latents of shape {tuple(shape)}, got {tuple(x.shape[1:])}")
        try:
            return run(method, model, x, sigmas, extra_args, callback, disable,
                       flow=model_frame is FLOW, **options, **extra)
        except DenoiserError as e:
            cause = e.__cause__
            if cause is not None and not isinstance(cause, FewstepError):
                raise cause from None  # ComfyUI's interrupt / OOM handling sees its own exception
            raise NodeError(node, e) from None
        except FewstepError as e:
            raise NodeError(node, e) from None

    sample.__name__ = sample.__qualname__ = "sample_fewstep"
    return sample
