"""Rectified-flow (flow-matching) models as denoisers in the flow frame (docs/maths.md §15).

A flow network predicts, at x_t = (1 − t)·x₀ + t·ε, the velocity v = ε − x₀ (SD3, Flux, Wan, …), or x₀, or ε.
`FlowDenoiser` turns any of them into the x₀-prediction D(x_t, t) that the solvers use in the flow frame
(`fewstep.frames.FLOW`): velocity D = x_t − t·v; x₀ D = x̂₀; ε D = (x_t − t·ε̂)/(1 − t) (undefined at t = 1,
refused there). Guidance on D is guidance on v: D is affine in v at fixed (x_t, t).
`FlowGaussianMixture` is the exact flow-frame denoiser of a Gaussian mixture, finite at t = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import DenoiserError, ModelError
from ..frames import FLOW
from .analytic import GaussianMixture, _sigma_column

PREDICTIONS = ("velocity", "x0", "epsilon")


class FlowDenoiser:
    """D(x_t, t[, condition…]) from a flow network `net(x_t, time, condition…)`.

    `time_scale` is the network's own time unit (1: t ∈ [0, 1], as Flux and `digits-flow`; 1000: the diffusers
    SD3 / Wan transformers' `timestep = t·1000`). Extra arguments (class labels, prompt embeddings) pass through.
    """

    frame = FLOW

    def __init__(self, net: Callable[..., torch.Tensor], prediction: str = "velocity", time_scale: float = 1.0):
        if prediction not in PREDICTIONS:
            raise ModelError(f"flow prediction {prediction!r} not in {list(PREDICTIONS)}")
        if not (time_scale > 0):
            raise ModelError(f"time_scale must be positive, got {time_scale!r}")
        self.net, self.prediction, self.time_scale = net, prediction, float(time_scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *condition: Any) -> torch.Tensor:
        tb = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        out = self.net(x, t * self.time_scale if self.time_scale != 1.0 else t, *condition).to(x.dtype)
        if self.prediction == "velocity":
            return x - tb * out
        if self.prediction == "x0":
            return out
        if bool((t >= 1).any()):
            raise DenoiserError("an ε-prediction flow model has no x₀ estimate at t = 1; start the grid below 1")
        return (x - tb * out) / (1 - tb)


class FlowGaussianMixture(GaussianMixture):
    """The exact D(x_t, t) = E[x₀ | x_t] of a Gaussian mixture under x_t = (1 − t)·x₀ + t·ε (float64).

    Given component k, x_t ~ N((1 − t)μ_k, (1 − t)²s_k² + t²), so γ_k ∝ w_k N(x_t; (1 − t)μ_k, v_k) and
    E[x₀ | x_t, k] = μ_k + (1 − t)s_k²/v_k·(x_t − (1 − t)μ_k), with v_k = (1 − t)²s_k² + t²; at t = 1 this is the
    data mean. (The EDM-frame mixture at σ = t/(1 − t), x̂ = x_t/(1 − t) gives the same D for t < 1.)
    """

    frame = FLOW

    @classmethod
    def of(cls, mixture: GaussianMixture) -> FlowGaussianMixture:
        """The flow view of an EDM-frame mixture (same parameters)."""
        out = cls.__new__(cls)
        out.__dict__.update(mixture.__dict__)
        return out

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b == 0:
            return x.clone()
        xf = x.reshape(b, -1).to(torch.float64)
        tc = _sigma_column(t, b).to(xf.device)  # [B, 1]
        if bool(((tc < 0) | (tc > 1)).any()):
            raise DenoiserError(f"flow time outside [0, 1]: {tc.min().item():g}..{tc.max().item():g}")
        a = 1 - tc
        means, vars_ = self.means.to(xf.device), self.vars.to(xf.device)
        log_w = self.log_weights.to(xf.device)
        if self.isotropic:  # matmul form: ‖x − aμ_k‖² = ‖x‖² − 2a·x·μ_k + a²‖μ_k‖²
            var = a**2 * vars_[:, 0] + tc**2  # [B, K]
            dist2 = (xf**2).sum(1, keepdim=True) - 2 * a * (xf @ means.T) + a**2 * (means**2).sum(1)
            gamma = torch.softmax(-0.5 * (dist2 / var + xf.shape[1] * var.log()) + log_w, dim=1)
            gain = gamma * a * vars_[:, 0] / var  # E[x₀|x_t, k] = μ_k(1 − a²s_k²/v_k) + (a s_k²/v_k)·x_t
            out = (gamma - gain * a) @ means + gain.sum(1, keepdim=True) * xf
        else:
            var = a[..., None] ** 2 * vars_ + tc[..., None] ** 2  # [B, K, D]
            diff = xf.unsqueeze(1) - a[..., None] * means  # x_t − (1 − t)μ_k
            log_p = -0.5 * ((diff**2) / var + var.log()).sum(-1) + log_w
            gamma = torch.softmax(log_p, dim=1).unsqueeze(-1)
            out = (gamma * (means + a[..., None] * vars_ / var * diff)).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact velocity v = (x_t − D)/t (the network a flow pipeline would call)."""
        tb = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - self(x, t)) / tb
