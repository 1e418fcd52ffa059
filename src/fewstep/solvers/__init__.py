"""Solvers of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ, and the driver that runs them.

The driver owns every model evaluation: it evaluates the state arriving at each grid point except the last
(or takes AFS's analytic value at the first), hands the newest nodes to the solver's `step`, and lets
predictor–corrector solvers refine the arrived state with that evaluation (which the next step reuses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import SolverError
from ..schedules import check_schedule
from . import exponential, multistep, single  # noqa: F401  (register the solvers)
from .base import SOLVERS, Control, Denoiser, Evaluator, Node, Solver, StepInfo, afs_node, get_solver



class _RecommendedSchedules(Mapping):
    """Read-only view name → (schedule, ρ) of every registered solver's `recommended_schedule` class attribute
    (the policy lives on the solver class; this view serves callers that only have a name)."""

    def __getitem__(self, name: str) -> tuple[str, float | None]:
        return SOLVERS[name].recommended_schedule

    def __iter__(self) -> Iterator[str]:
        return iter(SOLVERS)

    def __len__(self) -> int:
        return len(SOLVERS)


RECOMMENDED_SCHEDULE = _RecommendedSchedules()


def _evals_per_interval(solver: str, amed: bool, options: dict[str, Any]) -> int:
    algo = get_solver(solver, **options)
    if amed and solver == "heun":
        raise SolverError("heun has no AMED-Plugin")
    return 2 if amed else algo.evals_per_step  # AMED-Plugin adds one evaluation at s_n to one-call solvers


def nfe(solver: str, num_steps: int, afs: bool = False, denoise_to_zero: bool = False, amed: bool = False,
        **options: Any) -> int:
    """Number of denoiser calls of a configuration (N − 1 intervals; AFS saves one, denoise_to_zero adds one).

    `amed=True` counts the AMED-Plugin of `solver` (2 calls per interval for every solver; AMED-Solver is
    `solver="amed"`); the predictor itself adds none.
    """
    if num_steps < 2:
        raise SolverError(f"num_steps must be >= 2 (grid points), got {num_steps}")
    return _evals_per_interval(solver, amed, options) * (num_steps - 1) - int(afs) + int(denoise_to_zero)


def num_steps_for_nfe(solver: str, target_nfe: int, afs: bool = False, amed: bool = False,
                      **options: Any) -> int | None:
    """The num_steps giving exactly `target_nfe` calls, or None when this configuration cannot hit it."""
    intervals, rest = divmod(target_nfe + int(afs), _evals_per_interval(solver, amed, options))
    return intervals + 1 if rest == 0 and intervals >= 1 else None


def _solver_dtype(noise: torch.Tensor) -> torch.dtype:
    """Solver arithmetic runs in float32 at least (float64 when the noise is float64)."""
    return torch.promote_types(noise.dtype, torch.float32) if noise.is_floating_point() else torch.float32


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    solver: str | Solver = "euler",
    schedule: torch.Tensor | None = None,
    *,
    num_steps: int | None = None,
    afs: bool | None = None,
    denoise_to_zero: bool = False,
    return_trajectory: bool = False,
    thresholding: bool = False,
    threshold_ratio: float = 0.995,
    progress: bool = False,
    predictor: Any = None,
    bottleneck: torch.nn.Module | None = None,
    **options: Any,
) -> torch.Tensor:
    """Solve the probability-flow ODE from x_T = schedule[0]·noise down to schedule[-1].

    `denoiser(x, sigma)` returns E[x₀|x] (sigma is a [B] tensor); `noise` is N(0, I) of shape [B, …].
    Without `schedule`, the solver's recommended schedule with `num_steps` points is used. `solver` is a name
    (with `options`) or a Solver instance, e.g. a learned card from `fewstep.load_solver(DIR)`, which brings its
    own grid and AFS setting.
    Returns the state at σ_min (or D(x, σ_min) with `denoise_to_zero`), or with `return_trajectory` a tensor
    [N, *noise.shape] of the state at every grid point (its last entry is what would be returned otherwise,
    the denoised output when `denoise_to_zero`). `options` are the solver's own (see `fewstep solvers`).
    With an AMED `predictor`, every interval runs as the AMED-Plugin of `solver` (AMED-Solver for "amed");
    its features come from the `bottleneck` module's output (forward hook) or, without one, from D.
    """
    if isinstance(solver, Solver):
        if options:
            raise SolverError(f"options {sorted(options)} given with a solver instance; set them on the instance")
        algo = solver
    else:
        algo = get_solver(solver, **options)
    afs = algo.resolve_afs(afs)
    if schedule is None:
        schedule = algo.default_schedule(num_steps)
    sigmas = check_schedule(schedule)
    if num_steps is not None and num_steps != len(sigmas):
        raise SolverError(f"num_steps={num_steps} but the schedule has {len(sigmas)} points")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise SolverError("noise must be a tensor [B, …]")
    x = noise.to(_solver_dtype(noise)) * float(sigmas[0])
    traj = [x] if return_trajectory else None
    if predictor is None:
        ev = Evaluator(denoiser, threshold_ratio if thresholding else None)
        x = integrate(algo, ev, x, sigmas, afs=afs, trajectory=traj, progress=progress)
    else:
        from ..amed.features import feature_source

        with feature_source(bottleneck) as features, torch.no_grad():
            ev = Evaluator(denoiser, threshold_ratio if thresholding else None, features=features)
            x = integrate(algo, ev, x, sigmas, afs=afs, trajectory=traj, progress=progress,
                          controller=predictor.control)
    if denoise_to_zero:
        ev.features = None  # the final D feeds no predictor (and a bottleneck hook is removed by now)
        x = ev(x, sigmas[-1:], len(sigmas) - 1).denoised
        if traj is not None:
            traj[-1] = x
    return torch.stack(traj) if traj is not None else x


Controller = Callable[[Node, torch.Tensor, torch.Tensor], Control]


def integrate(
    algo: Solver,
    ev: Evaluator,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    afs: bool = False,
    trajectory: list[torch.Tensor] | None = None,
    progress: bool = False,
    controller: Controller | None = None,
) -> torch.Tensor:
    """Run `algo` over the grid `sigmas` (float64, validated) from the state x at sigmas[0].

    With a `controller` (AMED's predictor: node at t_n, t_n, t_{n+1} → Control) every interval runs as the
    AMED-Plugin of `algo` (or as AMED-Solver); the controller adds no model call.
    """
    n_int = len(sigmas) - 1
    t = [sigmas[i : i + 1] for i in range(len(sigmas))]
    lo, hi = float(sigmas[-1].detach()), float(sigmas[0].detach())
    hist: list[Node] = [afs_node(x, t[0]) if afs else ev(x, t[0], 0, model_sigma=algo.eval_sigma(t[0], 0))]
    for i in tqdm(range(n_int), disable=not progress, desc=algo.name, leave=False):
        control = controller(hist[-1], t[i], t[i + 1]) if controller is not None else None
        sub = algo.advance(x, hist, t[i + 1], StepInfo(i, n_int - i, lo, hi), ev, control)
        x, hist = sub.x_next, sub.hist
        if i + 1 < n_int:  # evaluate the arrived state (every point but the last), maybe correct it
            hist = [*hist[-algo.history :], ev(x, t[i + 1], i + 1, model_sigma=algo.eval_sigma(t[i + 1], i + 1))]
            x = algo.correct(sub.x_prev, x, hist, sub.info, sub.scale)
        if trajectory is not None:
            trajectory.append(x)
    return x


__all__ = [
    "RECOMMENDED_SCHEDULE", "SOLVERS", "Control", "Evaluator", "Node", "Solver", "StepInfo",
    "get_solver", "integrate", "nfe", "num_steps_for_nfe", "sample",
]
