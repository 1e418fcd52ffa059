"""Single-step solvers (docs/maths.md §4.1–4.3): each interval uses only the node at its start."""

from __future__ import annotations

import torch

from .base import Node, Option, Solver, Stages, StepInfo, bcast, midpoint_sigma, register, request


@register
class Euler(Solver):
    name = "euler"
    summary = "Euler / DDIM, order 1"

    def step(self, x, hist, t_next, info, scale=1.0):
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


def two_stage_step(
    x: torch.Tensor, n: Node, t_next: torch.Tensor, r: torch.Tensor | float, step: int,
    c: torch.Tensor | float = 1.0, a: torch.Tensor | float = 1.0, mean_direction: bool = False,
) -> Stages:
    """DPM-Solver-2 with ratio r, generalised to a scaled direction c and a scaled model time a.

    s = t_{n+1}^r·t_n^{1−r}; y = x_n + (s − t_n)·d_n; the model is called at σ = a·s (direction (y − D)/s):
    DPM-Solver-2:    x_{n+1} = x_n + c·h·[(1/2r)·d(y, s) + (1 − 1/2r)·d_n]
    mean direction:  x_{n+1} = x_n + c·h·d(y, s)   (the same as DPM-Solver-2 at r = ½).
    """
    s = midpoint_sigma(n.sigma, t_next, r)
    y = x + bcast(s - n.sigma, x) * n.d
    d_mid = (yield from request(y, s, step, model_sigma=s * a)).d
    h = bcast(t_next - n.sigma, x)
    if mean_direction:
        return x + c * h * d_mid
    w = bcast(1 / (2 * torch.as_tensor(r, dtype=torch.float64)).reshape(-1), x)
    return x + c * h * (w * d_mid + (1 - w) * n.d)


class TwoStage(Solver):
    """Single-step solvers with one intermediate evaluation at ratio r (`two_stage_step`); a wrapper may set r,
    the direction scale and the model-time scale per sample and interval (`ratio_stages`)."""

    evals_per_step = 2
    mean_direction = False
    r: float

    def stages(self, x, hist, t_next, info, scale=1.0):
        return (yield from self.ratio_stages(x, hist, t_next, info, self.r, scale))

    def ratio_stages(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor, info: StepInfo,
                     r: torch.Tensor | float, scale: torch.Tensor | float = 1.0,
                     time_scale: torch.Tensor | float = 1.0) -> Stages:
        """One interval with intermediate ratio r, model terms scaled by `scale`, the model called at
        `time_scale`·s."""
        return (yield from two_stage_step(x, hist[-1], t_next, r, info.index, scale, time_scale,
                                          self.mean_direction))


@register
class DPMSolver2(TwoStage):
    name = "dpm2"
    summary = "DPM-Solver-2 (singlestep, midpoint at ratio r), order 2, 2 NFE per step"
    options = {"r": Option(0.5, low=1e-3, high=1.0, help="position of the intermediate point in log σ")}
