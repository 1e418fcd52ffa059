"""Classic fourth-order Runge–Kutta, written here independently of fewstep's solvers: the reference the
convergence-order tests measure against."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rk4(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """x integrated along dx/ds = f(s, x) over the points `ts` (any direction), one RK4 step per interval."""
    for a, b in zip(ts[:-1], ts[1:]):
        h = b - a
        k1 = f(a, x)
        k2 = f(a + h / 2, x + h / 2 * k1)
        k3 = f(a + h / 2, x + h / 2 * k2)
        k4 = f(b, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
