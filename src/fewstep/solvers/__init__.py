"""Solvers of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ, and the driver that runs them.

The driver owns every model evaluation: it evaluates the state arriving at each grid point except the last
(or takes AFS's analytic value at the first), hands the newest nodes to the solver's `step`, and lets
predictor–corrector solvers refine the arrived state with that evaluation (which the next step reuses).
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import SolverError
from ..schedules import check_schedule, get_schedule
from . import exponential, multistep, single  # noqa: F401  (register the solvers)
from .base import SOLVERS, Denoiser, Evaluator, Node, Solver, StepInfo, afs_node, get_solver

# Recommended schedule per solver (SPEC §8 / the bench): (name, rho)
RECOMMENDED_SCHEDULE: dict[str, tuple[str, float | None]] = {
    "euler": ("polynomial", 7.0),
    "heun": ("polynomial", 7.0),
    "dpm2": ("polynomial", 7.0),
    "ipndm": ("polynomial", 7.0),
    "ipndm_v": ("polynomial", 7.0),
    "deis": ("time_uniform", 2.0),
    "dpmpp": ("logsnr", None),
    "unipc": ("logsnr", None),
}


def nfe(solver: str, num_steps: int, afs: bool = False, denoise_to_zero: bool = False, **options: Any) -> int:
    """Number of denoiser calls of a configuration (N − 1 intervals; AFS saves one, denoise_to_zero adds one)."""
    s = get_solver(solver, **options)
    if num_steps < 2:
        raise SolverError(f"num_steps must be >= 2 (grid points), got {num_steps}")
    return s.evals_per_step * (num_steps - 1) - int(afs) + int(denoise_to_zero)


def num_steps_for_nfe(solver: str, target_nfe: int, afs: bool = False, **options: Any) -> int | None:
    """The num_steps giving exactly `target_nfe` calls, or None when this solver cannot hit it."""
    per = get_solver(solver, **options).evals_per_step
    intervals, rest = divmod(target_nfe + int(afs), per)
    return intervals + 1 if rest == 0 and intervals >= 1 else None


def _solver_dtype(noise: torch.Tensor) -> torch.dtype:
    """Solver arithmetic runs in float32 at least (float64 when the noise is float64)."""
    return torch.promote_types(noise.dtype, torch.float32) if noise.is_floating_point() else torch.float32


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    solver: str = "euler",
    schedule: torch.Tensor | None = None,
    *,
    num_steps: int | None = None,
    afs: bool = False,
    denoise_to_zero: bool = False,
    return_trajectory: bool = False,
    thresholding: bool = False,
    threshold_ratio: float = 0.995,
    progress: bool = False,
    **options: Any,
) -> torch.Tensor:
    """Solve the probability-flow ODE from x_T = schedule[0]·noise down to schedule[-1].

    `denoiser(x, sigma)` returns E[x₀|x] (sigma is a [B] tensor); `noise` is N(0, I) of shape [B, …].
    Without `schedule`, the solver's recommended schedule with `num_steps` points is used.
    Returns the state at σ_min (or D(x, σ_min) with `denoise_to_zero`), or with `return_trajectory` a tensor
    [N, *noise.shape] of the state at every grid point (its last entry is what would be returned otherwise,
    the denoised output when `denoise_to_zero`). `options` are the solver's own (see `fewstep solvers`).
    """
    algo = get_solver(solver, **options)
    if schedule is None:
        if num_steps is None:
            raise SolverError("give a schedule or num_steps")
        name, rho = RECOMMENDED_SCHEDULE[solver]
        schedule = get_schedule(name, num_steps, rho=rho)
    sigmas = check_schedule(schedule)
    if num_steps is not None and num_steps != len(sigmas):
        raise SolverError(f"num_steps={num_steps} but the schedule has {len(sigmas)} points")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise SolverError("noise must be a tensor [B, …]")
    ev = Evaluator(denoiser, threshold_ratio if thresholding else None)
    x = noise.to(_solver_dtype(noise)) * float(sigmas[0])
    traj = [x] if return_trajectory else None
    x = integrate(algo, ev, x, sigmas, afs=afs, trajectory=traj, progress=progress)
    if denoise_to_zero:
        x = ev(x, sigmas[-1:], len(sigmas) - 1).denoised
        if traj is not None:
            traj[-1] = x
    return torch.stack(traj) if traj is not None else x


def integrate(
    algo: Solver,
    ev: Evaluator,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    afs: bool = False,
    trajectory: list[torch.Tensor] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run `algo` over the grid `sigmas` (float64, validated) from the state x at sigmas[0]."""
    n_int = len(sigmas) - 1
    t = [sigmas[i : i + 1] for i in range(len(sigmas))]
    lo, hi = float(sigmas[-1]), float(sigmas[0])
    hist: list[Node] = [afs_node(x, t[0]) if afs else ev(x, t[0], 0)]
    for i in tqdm(range(n_int), disable=not progress, desc=algo.name, leave=False):
        info = StepInfo(i, n_int - i, lo, hi)
        x_next = algo.step(x, hist, t[i + 1], info, ev)
        if i + 1 < n_int:  # evaluate the arrived state (every point but the last)
            hist = [*hist[-algo.history :], ev(x_next, t[i + 1], i + 1)]
            x_next = algo.correct(x, x_next, hist, info)
        x = x_next
        if trajectory is not None:
            trajectory.append(x)
    return x


__all__ = [
    "RECOMMENDED_SCHEDULE", "SOLVERS", "Evaluator", "Node", "Solver", "StepInfo",
    "get_solver", "integrate", "nfe", "num_steps_for_nfe", "sample",
]
