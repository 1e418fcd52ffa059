"""Solvers of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ, and the driver that runs them.

The driver (`driver.run`) owns every model evaluation: it requests the state arriving at each grid point except
the last (or takes AFS's analytic value at the first), hands the newest nodes to the solver's `step` / `stages`,
and lets predictor–corrector solvers refine the arrived state with that evaluation (which the next step reuses).
"""

from __future__ import annotations

from typing import Any

from ..errors import SolverError
from . import exponential, multistep, single  # noqa: F401  (register the solvers)
from .base import SOLVERS, Control, Evaluator, ModelRequest, Node, Solver, StepInfo, get_solver
from .driver import GridPoint, answer, integrate, run, sample, sample_with_directions, solver_dtype


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


__all__ = [
    "SOLVERS", "Control", "Evaluator", "GridPoint", "ModelRequest", "Node", "Solver",
    "StepInfo", "answer", "get_solver", "integrate", "nfe", "num_steps_for_nfe", "run", "sample",
    "sample_with_directions", "solver_dtype",
]
