"""Single-step solvers (docs/maths.md §4.1–4.3): each interval uses only the node at its start."""

from __future__ import annotations

import torch

from ..errors import SolverError
from .base import Node, Option, Solver, Stages, Substep, bcast, midpoint_sigma, register, request


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

    def stages(self, x, hist, t_next, info, scale=1.0):
        n = hist[-1]
        h = bcast(t_next - n.sigma, x)
        x_euler = x + h * n.d  # x' = x_n + h·d_n
        d_next = (yield from request(x_euler, t_next, info.index)).d
        return x + scale * h * (n.d + d_next) / 2  # x_{n+1} = x_n + h(d_n + d(x', t_{n+1}))/2

    def amed_step(self, x, hist, t_next, info, control):
        raise SolverError("heun has no AMED-Plugin; use euler, dpm2, ipndm, ipndm_v, deis, dpmpp, unipc or amed")


def two_stage_step(
    x: torch.Tensor, n: Node, t_next: torch.Tensor, r: torch.Tensor | float, step: int,
    c: torch.Tensor | float = 1.0, a: torch.Tensor | float = 1.0, mean_direction: bool = False,
) -> Stages:
    """DPM-Solver-2 with ratio r, generalised to AMED's scaled direction c and scaled model time a.

    s = t_{n+1}^r·t_n^{1−r}; y = x_n + (s − t_n)·d_n; the model is called at σ = a·s (direction (y − D)/s):
    DPM-Solver-2:  x_{n+1} = x_n + c·h·[(1/2r)·d(y, s) + (1 − 1/2r)·d_n]
    AMED-Solver:   x_{n+1} = x_n + c·h·d(y, s)   (`mean_direction`; the same as DPM-Solver-2 at r = ½).
    """
    s = midpoint_sigma(n.sigma, t_next, r)
    y = x + bcast(s - n.sigma, x) * n.d
    d_mid = (yield from request(y, s, step, model_sigma=s * a)).d
    h = bcast(t_next - n.sigma, x)
    if mean_direction:
        return x + c * h * d_mid
    w = bcast(1 / (2 * torch.as_tensor(r, dtype=torch.float64)).reshape(-1), x)
    return x + c * h * (w * d_mid + (1 - w) * n.d)


class _TwoStage(Solver):
    """Single-step solvers with one intermediate evaluation: AMED sets their ratio r instead of inserting s_n."""

    evals_per_step = 2
    mean_direction = False

    def stages(self, x, hist, t_next, info, scale=1.0):
        return (yield from two_stage_step(x, hist[-1], t_next, self.r, info.index, scale,
                                          mean_direction=self.mean_direction))

    def amed_step(self, x, hist, t_next, info, control):
        c = bcast(control.c, x)
        x_next = yield from two_stage_step(x, hist[-1], t_next, control.r, info.index, c, control.a,
                                           self.mean_direction)
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
