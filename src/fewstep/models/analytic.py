"""Analytic models with an exact denoiser D(x, σ) = E[x₀ | x] (docs/maths.md §2), for tests and exact-error
benchmarks.

Both compute in float64 with log-sum-exp responsibilities and return the input's dtype.
"""

from __future__ import annotations

import torch

from ..errors import DenoiserError


def _sigma_column(sigma: float | torch.Tensor, batch: int) -> torch.Tensor:
    """σ given as a number, a 0-d tensor, [B] or [B, 1, …] → float64 tensor [B, 1]."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise DenoiserError(f"sigma has {s.numel()} entries for a batch of {batch}")
    return s.reshape(batch, 1)


class GaussianMixture:
    """p₀ = Σ_k w_k N(μ_k, diag(s_k²)): the exact denoiser of a Gaussian mixture.

    `means` is [K, *shape]; `stds` is [K] (isotropic components) or [K, *shape] (diagonal); `weights` [K]
    (uniform when omitted). D(x, σ) = Σ_k γ_k(x)[μ_k + s_k²/(s_k² + σ²)(x − μ_k)], γ_k ∝ w_k N(x; μ_k, s_k² + σ²).
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor | float, weights: torch.Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must be [K, *shape], got shape {tuple(means.shape)}")
        self.shape = tuple(means.shape[1:])
        k, dim = means.shape[0], means[0].numel()
        self.means = means.reshape(k, dim)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.numel() == 1:
            stds = stds.reshape(1).expand(k)
        if stds.shape == (k,):
            stds = stds[:, None].expand(k, dim)
        if stds.numel() != k * dim:
            raise ValueError(f"stds must be a scalar, [K] or [K, *shape]; got shape {tuple(stds.shape)}")
        if (stds < 0).any() or not torch.isfinite(stds).all():  # checked before squaring hides the sign
            raise ValueError("stds must be finite and non-negative")
        self.vars = stds.reshape(k, dim).clone() ** 2
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if w.shape != (k,) or (w <= 0).any():
            raise ValueError(f"weights must be [K] = [{k}] positive numbers")
        self.log_weights = (w / w.sum()).log()
        self.isotropic = bool((self.vars == self.vars[:, :1]).all())

    def to(self, device: str | torch.device) -> GaussianMixture:
        """Keep the parameters on `device` (in place), so that calls there copy nothing."""
        self.means, self.vars, self.log_weights = (t.to(device) for t in (self.means, self.vars, self.log_weights))
        return self

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b == 0:  # an empty batch: nothing to denoise
            return x.clone()
        xf = x.reshape(b, -1).to(torch.float64)
        s2 = _sigma_column(sigma, b).to(xf.device) ** 2  # [B, 1]
        means, vars_ = self.means.to(xf.device), self.vars.to(xf.device)
        if self.isotropic:  # matmul form: ‖x − μ_k‖² = ‖x‖² − 2x·μ_k + ‖μ_k‖²
            var = vars_[:, 0] + s2  # [B, K]
            dist2 = (xf**2).sum(1, keepdim=True) - 2 * xf @ means.T + (means**2).sum(1)
            log_p = -0.5 * (dist2 / var + xf.shape[1] * var.log()) + self.log_weights.to(xf.device)
            gamma = torch.softmax(log_p, dim=1)
            shrink = vars_[:, 0] / var  # s_k²/(s_k² + σ²)
            out = (gamma * (1 - shrink)) @ means + (gamma * shrink).sum(1, keepdim=True) * xf
        else:
            var = vars_ + s2.unsqueeze(-1)  # [B, K, D]
            diff = xf.unsqueeze(1) - means
            log_p = -0.5 * ((diff**2) / var + var.log()).sum(-1) + self.log_weights.to(xf.device)
            gamma = torch.softmax(log_p, dim=1).unsqueeze(-1)
            out = (gamma * (means + vars_ / var * diff)).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n samples of the data distribution p₀."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return (self.means[comp] + self.vars[comp].sqrt() * z).reshape(n, *self.shape)


class EmpiricalDenoiser:
    """The optimal denoiser of a finite data set {y_i}: D*(x, σ) = Σ_i softmax_i(−‖x − y_i‖²/2σ²) y_i.

    Squared distances use the matmul form ‖x‖² − 2x·y + ‖y‖² (much faster than broadcasting, the same result
    up to rounding in float64); large batches are processed in chunks to bound memory.
    """

    def __init__(self, data: torch.Tensor, chunk: int = 1024):
        data = torch.as_tensor(data, dtype=torch.float64)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must be [M, *shape] with M >= 1, got shape {tuple(data.shape)}")
        self.shape = tuple(data.shape[1:])
        self.data = data.reshape(data.shape[0], -1)
        self.data_sq = (self.data**2).sum(1)
        self.chunk = chunk

    def to(self, device: str | torch.device) -> EmpiricalDenoiser:
        """Keep the data on `device` (in place), so that calls there copy nothing."""
        self.data, self.data_sq = self.data.to(device), self.data_sq.to(device)
        return self

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b == 0:  # an empty batch: nothing to denoise
            return x.clone()
        xf = x.reshape(b, -1).to(torch.float64)
        s2 = _sigma_column(sigma, b).to(xf.device) ** 2
        y, y_sq = self.data.to(xf.device), self.data_sq.to(xf.device)
        parts = []
        for i in range(0, b, self.chunk):
            xc = xf[i : i + self.chunk]
            dist2 = (xc**2).sum(1, keepdim=True) - 2 * xc @ y.T + y_sq
            parts.append(torch.softmax(-dist2 / (2 * s2[i : i + self.chunk]), dim=1) @ y)
        return torch.cat(parts).reshape(x.shape).to(x.dtype)
