"""The built-in models, by name: one registry that the CLI, the benchmarks and the tests share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch

from ..errors import ModelError
from .analytic import EmpiricalDenoiser, GaussianMixture

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ModelInfo:
    """A denoiser with what sampling needs to know about it."""

    name: str
    denoiser: Denoiser
    shape: tuple[int, ...]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    description: str = ""
    exact: bool = False  # True when D is the exact posterior mean (analytic models)
    bottleneck: torch.nn.Module | None = field(default=None, repr=False)


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


def digits_data() -> torch.Tensor:
    """sklearn's bundled digits (1 797 images of 8×8), scaled from [0, 16] to [−1, 1], shape [1797, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float64)
    return (images / 8.0 - 1.0).reshape(-1, 1, 8, 8)


def _gmm() -> ModelInfo:
    means, stds, weights = gmm_parameters()
    return ModelInfo(
        "gmm", GaussianMixture(means, stds, weights), (1, 8, 8),
        description="8-component Gaussian mixture in 64 dims, exact denoiser", exact=True,
    )


def _digits_opt() -> ModelInfo:
    return ModelInfo(
        "digits-opt", EmpiricalDenoiser(digits_data()), (1, 8, 8),
        description="empirical optimal denoiser of sklearn digits in [-1, 1]", exact=True,
    )


def _digits() -> ModelInfo:
    """The shipped EDM-preconditioned U-Net trained on sklearn digits at 16×16 (EMA weights, eval mode).
    Raises ModelError when the weights file is missing or corrupt."""
    from .unet import load_unet

    net = load_unet()
    return ModelInfo(
        "digits", net, net.shape, 0.002, 80.0,
        description="EDM U-Net trained on sklearn digits at 16x16 (see models/unet.py, data/digits_unet.json)",
        bottleneck=net.bottleneck,
    )


BUILTIN_MODELS: dict[str, Callable[[], ModelInfo]] = {"gmm": _gmm, "digits-opt": _digits_opt, "digits": _digits}
DEFAULT_MODEL = "gmm"


@cache
def load_model(name: str) -> ModelInfo:
    """A built-in model by name (constructed once per process)."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]()
