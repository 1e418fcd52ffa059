"""Single-step solvers (SPEC §4.1–4.3): each interval uses only the node at its start."""

from __future__ import annotations

import torch

from ..errors import SolverError
from .base import Evaluator, Node, Option, Solver, Substep, bcast, midpoint_sigma, register


@register
class Euler(Solver):
    name = "euler"
    summary = "Euler / DDIM, order 1"

    def step(self, x, hist, t_next, info, ev, scale=1.0):
        n = hist[-1]
        h = bcast(t_next - n.sigma, x)
        return x + scale * h * n.d  # x_{n+1} = x_n + h·d_n


@register
class Heun(Solver):
    name = "heun"
    summary = "EDM's Heun (trapezoidal) method, order 2, 2 NFE per step"
    evals_per_step = 2

    def step(self, x, hist, t_next, info, ev, scale=1.0):
        n = hist[-1]
        h = bcast(t_next - n.sigma, x)
        x_euler = x + h * n.d  # x' = x_n + h·d_n
        d_next = ev(x_euler, t_next, info.index).d
        return x + scale * h * (n.d + d_next) / 2  # x_{n+1} = x_n + h(d_n + d(x', t_{n+1}))/2

    def amed_step(self, x, hist, t_next, info, ev, control):
        raise SolverError("heun has no AMED-Plugin; use euler, dpm2, ipndm, ipndm_v, deis, dpmpp, unipc or amed")


def two_stage_step(
    x: torch.Tensor, n: Node, t_next: torch.Tensor, r: torch.Tensor | float, ev: Evaluator, step: int,
    scale: torch.Tensor | float = 1.0, time_scale: torch.Tensor | float = 1.0, mean_direction: bool = False,
) -> torch.Tensor:
    """DPM-Solver-2 with ratio r, generalised to AMED's scaled direction c and scaled model time a.

    s = t_{n+1}^r·t_n^{1−r}; y = x_n + (s − t_n)·d_n; the model is called at σ = a·s (direction (y − D)/s):
    DPM-Solver-2:  x_{n+1} = x_n + c·h·[(1/2r)·d(y, s) + (1 − 1/2r)·d_n]
    AMED-Solver:   x_{n+1} = x_n + c·h·d(y, s)   (`mean_direction`; the same as DPM-Solver-2 at r = ½).
    """
    s = midpoint_sigma(n.sigma, t_next, r)
    y = x + bcast(s - n.sigma, x) * n.d
    d_mid = ev(y, s, step, model_sigma=s * time_scale).d
    h = bcast(t_next - n.sigma, x)
    if mean_direction:
        return x + scale * h * d_mid
    w = bcast(1 / (2 * torch.as_tensor(r, dtype=torch.float64)).reshape(-1), x)
    return x + scale * h * (w * d_mid + (1 - w) * n.d)


class _TwoStage(Solver):
    """Single-step solvers with one intermediate evaluation: AMED sets their ratio r instead of inserting s_n."""

    evals_per_step = 2
    mean_direction = False

    def step(self, x, hist, t_next, info, ev, scale=1.0):
        return two_stage_step(x, hist[-1], t_next, self.r, ev, info.index, scale, mean_direction=self.mean_direction)

    def amed_step(self, x, hist, t_next, info, ev, control):
        c = bcast(control.c, x)
        x_next = two_stage_step(x, hist[-1], t_next, control.r, ev, info.index, c, control.a, self.mean_direction)
        return Substep(x_next, x, hist, info, c)


@register
class DPMSolver2(_TwoStage):
    name = "dpm2"
    summary = "DPM-Solver-2 (singlestep, midpoint at ratio r), order 2, 2 NFE per step"
    options = {"r": Option(0.5, low=1e-3, high=1.0, help="position of the intermediate point in log σ")}


@register
class AMEDSolver(_TwoStage):
    name = "amed"
    recommended_schedule = ("time_uniform", 1.0)  # the paper's AMED-Solver recipe
    summary = "AMED-Solver: one learned mean direction per step (needs a predictor; r=½ without one), 2 NFE"
    options = {"r": Option(0.5, low=1e-3, high=1.0, help="intermediate ratio when no predictor is given")}
    mean_direction = True
