"""Solvers of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ, and the driver that runs them.

The driver (`driver.run`) owns every model evaluation: it requests the state arriving at each grid point except
the last (or takes AFS's analytic value at the first), hands the newest nodes to the solver's `step` / `stages`,
and lets predictor–corrector solvers refine the arrived state with that evaluation (which the next step reuses).
"""

from __future__ import annotations

from typing import Any

from ..errors import SolverError
from . import exponential, multistep, single  # noqa: F401  (register the solvers)
from .base import SOLVERS, Evaluator, ModelRequest, Node, Solver, StepInfo, get_solver
from .driver import GridPoint, answer, integrate, resolve, run, sample, sample_with_directions, solver_dtype


def nfe(solver: str | Solver, num_steps: int, afs: bool = False, denoise_to_zero: bool = False,
        **options: Any) -> int:
    """Number of denoiser calls of a run (the one NFE rule): `evals_per_step` per interval over the N − 1
    intervals of a `num_steps`-point grid; AFS saves one, `denoise_to_zero` adds one. `solver` is a name (with
    `options`) or a Solver instance, wrappers included (they report their own `evals_per_step`)."""
    algo = resolve(solver, options)
    if num_steps < 2:
        raise SolverError(f"num_steps must be >= 2 (grid points), got {num_steps}")
    return algo.evals_per_step * (num_steps - 1) - int(afs) + int(denoise_to_zero)


def num_steps_for_nfe(solver: str | Solver, target_nfe: int, afs: bool = False, denoise_to_zero: bool = False,
                      **options: Any) -> int | None:
    """The num_steps giving exactly `target_nfe` calls (`nfe` inverted), or None when this configuration cannot
    hit it."""
    intervals, rest = divmod(target_nfe + int(afs) - int(denoise_to_zero), resolve(solver, options).evals_per_step)
    return intervals + 1 if rest == 0 and intervals >= 1 else None


__all__ = [
    "SOLVERS", "Evaluator", "GridPoint", "ModelRequest", "Node", "Solver", "StepInfo", "answer", "get_solver",
    "integrate", "nfe", "num_steps_for_nfe", "resolve", "run", "sample", "sample_with_directions", "solver_dtype",
]
