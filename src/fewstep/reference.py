"""Reference ODE solutions: a very fine solve from the same noise, computed once and cached on disk, and the
error measure against them (`rmse`). The benchmark's yardstick and the default teacher of learned cards."""

from __future__ import annotations

import hashlib
import re

import torch

from .io import cache_dir, cached_tensor
from .models.registry import ModelInfo
from .noise import seeded_noise
from .schedules import get_schedule
from .solvers import sample

REFERENCE_SOLVER = "heun"
REFERENCE_STEPS = 1000  # grid points of polynomial ρ = 7: 1 998 NFE; its error is ~1e-6 on the analytic models
NETWORK_REFERENCE_STEPS = 500  # networks (docs/maths.md §11: a 500+-step Heun solve): 998 NFE


def _key(model: ModelInfo, seeds: list[int], num_steps: int) -> str:
    seed_hash = hashlib.sha1(",".join(map(str, seeds)).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.name) + (f"-{model.fingerprint}" if model.fingerprint else "")
    # conditions and guidance (docs/maths.md, "Conditions and guidance")
    name += f"-c{model.condition_key}" if model.condition_key else ""
    return f"ref-{name}-s{seeds[0]}-n{len(seeds)}-{seed_hash}-{REFERENCE_SOLVER}{num_steps}"


def reference_solution(
    model: ModelInfo, seeds: list[int], num_steps: int | None = None, batch: int = 1024, progress: bool = False
) -> torch.Tensor:
    """x at σ_min from a `num_steps`-point Heun solve for each seed, float64, cached by (model, seeds, steps).

    Default steps: 1000 for exact (analytic) models, 500 for networks."""
    if num_steps is None:
        num_steps = REFERENCE_STEPS if model.exact else NETWORK_REFERENCE_STEPS
    sched = get_schedule("polynomial", num_steps, model.sigma_min, model.sigma_max, rho=7.0)
    if model.condition_key:  # conditions are bound for exactly these seeds (conditioning.conditioned_model)
        batch = len(seeds)

    def solve() -> torch.Tensor:
        parts = []
        for i in range(0, len(seeds), batch):
            noise = seeded_noise(seeds[i : i + batch], model.shape, model.state_dtype, model.device)
            parts.append(sample(model.denoiser, noise, REFERENCE_SOLVER, sched, progress=progress).cpu())
        return torch.cat(parts)

    return cached_tensor(cache_dir() / f"{_key(model, seeds, num_steps)}.safetensors", solve)


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of the per-sample RMSE."""
    diff = (x.to(device=ref.device, dtype=torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1)
    return float(diff.pow(2).mean(1).sqrt().mean())
