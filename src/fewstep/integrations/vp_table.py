"""The conversions between fewstep's σ-space and a discrete VP network (docs/maths.md §2), shared by
`DiffusersDenoiser` and `FewstepScheduler` (`fewstep.integrations.diffusers`) so that both compute bit-identical
network inputs, timesteps and D."""

from __future__ import annotations

from typing import Any

import torch

try:
    from diffusers import DDPMScheduler
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError("fewstep.integrations.diffusers needs diffusers: pip install 'fewstep[diffusers]'") from e

from ..errors import ModelError
from ..schedules import sigma_to_timestep
from ..solvers.base import bcast

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_DDPM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr")


def _ddpm_from_config(config: Any) -> DDPMScheduler:
    cfg = dict(config)
    return DDPMScheduler(**{k: cfg[k] for k in _DDPM_KEYS if k in cfg and cfg[k] is not None})


def alphas_cumprod_from_config(config: Any) -> torch.Tensor:
    """ᾱ_k of a DDPM-style scheduler config (any diffusers scheduler config, or a dict), computed by diffusers'
    own `DDPMScheduler` so that every beta schedule (linear, scaled_linear, squaredcos_cap_v2, trained_betas,
    rescale_betas_zero_snr) matches bit for bit."""
    return _ddpm_from_config(config).alphas_cumprod.clone()


def _alphas_cumprod(source: Any) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if hasattr(source, "alphas_cumprod"):  # a scheduler object
        return torch.as_tensor(source.alphas_cumprod)
    if hasattr(source, "keys"):  # a config
        return alphas_cumprod_from_config(source)
    return torch.as_tensor(source)


class VPTable:
    """The conversions between fewstep's σ-space and a discrete VP network, shared by `DiffusersDenoiser` and
    `FewstepScheduler` so that both compute bit-identical network inputs, timesteps and D."""

    def __init__(self, alphas_cumprod: Any, prediction_type: str = "epsilon", snap_timesteps: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"prediction_type {prediction_type!r} not in {list(PREDICTION_TYPES)}")
        ac = _alphas_cumprod(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1).clone()
        if ac.numel() < 2 or not torch.isfinite(ac).all() or (ac < 0).any() or (ac >= 1).any():
            raise ModelError("alphas_cumprod must hold at least 2 values in [0, 1)")
        if ac[-1] == 0:  # zero terminal SNR: σ would be infinite; diffusers' Euler scheduler uses 2^-24 too
            ac[-1] = 2.0**-24
        table = ((1 - ac) / ac).sqrt()
        if (table[1:] <= table[:-1]).any():
            raise ModelError("alphas_cumprod must be strictly decreasing (σ table strictly increasing)")
        self.sigma_table = table
        self.prediction_type = prediction_type
        self.snap_timesteps = bool(snap_timesteps)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_table[-1])

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timesteps (float32, on σ's device) of σ: fractional by log-σ interpolation, or rounded."""
        t = sigma_to_timestep(sigma.detach().to("cpu", torch.float64), self.sigma_table)
        if self.snap_timesteps:
            t = t.round()
        return t.to(device=sigma.device, dtype=torch.float32)

    @staticmethod
    def model_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_vp = x/√(1 + σ²), in x's dtype."""
        s = bcast(sigma, x)
        return x / torch.sqrt(1 + s * s)

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """D(x, σ) from the network output (ε, v or x̂₀), in x's dtype."""
        if output.shape[1:] != x.shape[1:] and output.ndim == x.ndim and output.shape[1] == 2 * x.shape[1]:
            output = output[:, : x.shape[1]]  # learned variance: [ε, v_var]
        out = output.to(device=x.device, dtype=x.dtype)
        s = bcast(sigma, x)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            alpha = 1 / torch.sqrt(1 + s * s)
            return alpha * self.model_input(x, sigma) - (s * alpha) * out
        return out
