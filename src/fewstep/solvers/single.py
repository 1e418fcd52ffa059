"""Single-step solvers (SPEC §4.1–4.3): each interval uses only the node at its start."""

from __future__ import annotations

import torch

from .base import Evaluator, Node, Option, Solver, StepInfo, bcast, register


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


def midpoint_sigma(t_cur: torch.Tensor, t_next: torch.Tensor, r: torch.Tensor | float) -> torch.Tensor:
    """s = t_{n+1}^r · t_n^{1−r}: the geometric intermediate time of DPM-Solver-2 and AMED."""
    return t_next**r * t_cur ** (1 - r)


def two_stage_step(
    x: torch.Tensor, n: Node, t_next: torch.Tensor, r: torch.Tensor | float, ev: Evaluator, step: int,
    scale: torch.Tensor | float = 1.0, time_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 with ratio r, generalised to AMED's scaled direction and scaled model time.

    y = x_n + (s − t_n)d_n; x_{n+1} = x_n + c·h·[(1/2r)·d(y, s) + (1 − 1/2r)·d_n], the model called at σ = a·s.
    With r = ½ the d_n term vanishes and this is AMED-Solver's x_n + c·h·d(y, a·s).
    """
    s = midpoint_sigma(n.sigma, t_next, r)
    y = x + bcast(s - n.sigma, x) * n.d
    d_mid = ev(y, s, step, model_sigma=s * time_scale).d
    w = bcast(1 / (2 * torch.as_tensor(r, dtype=torch.float64)), x)
    return x + scale * bcast(t_next - n.sigma, x) * (w * d_mid + (1 - w) * n.d)


@register
class DPMSolver2(Solver):
    name = "dpm2"
    summary = "DPM-Solver-2 (singlestep, midpoint at ratio r), order 2, 2 NFE per step"
    evals_per_step = 2
    options = {"r": Option(0.5, low=1e-3, high=1.0, help="position of the intermediate point in log σ")}

    def step(self, x, hist, t_next, info, ev, scale=1.0):
        return two_stage_step(x, hist[-1], t_next, self.r, ev, info.index, scale)
