"""Step primitives shared by the multistep solvers: Lagrange/Adams–Bashforth weights and exponential φ's."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch

# Fixed-step Adams–Bashforth weights, newest first (iPNDM).
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@cache
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def lagrange_step_weights(
    node_sigmas: list[torch.Tensor],
    t_cur: torch.Tensor,
    t_next: torch.Tensor,
    coord: Callable[[torch.Tensor], torch.Tensor] | None = None,
    quad_points: int = 4,
) -> list[torch.Tensor]:
    """C_j = ∫_{t_cur}^{t_next} L_j(φ(σ)) dσ for the Lagrange basis L_j through the nodes φ(σ_j).

    With φ = identity this is the exact variable-step Adams–Bashforth method in σ (iPNDM_v, DEIS-ρAB,
    k-diffusion's LMS); with φ = VP time τ(σ) it is DEIS-tAB (the substitution dσ = σ'(τ)dτ turns the usual
    ∫ L_j(τ)σ'(τ)dτ into this smooth integral over σ). Gauss–Legendre with `quad_points` nodes is exact for
    polynomial integrands of degree < 2·quad_points. All σ's are float64 [1] or [B]; returns one [B'] per node.
    """
    coord = coord or (lambda s: s)
    xg, wg = _gauss_legendre(quad_points)
    half = (t_next - t_cur)[:, None] / 2
    mid = (t_next + t_cur)[:, None] / 2
    u = coord(mid + half * xg)  # [B', Q] quadrature points in the interpolation coordinate
    phis = [coord(s)[:, None] for s in node_sigmas]
    weights = []
    for j, pj in enumerate(phis):
        basis = torch.ones_like(u)
        for m, pm in enumerate(phis):
            if m != j:
                basis = basis * (u - pm) / (pj - pm)
        weights.append((half * basis * wg).sum(-1))
    return weights


def phi_ratios(h: torch.Tensor, order: int) -> list[torch.Tensor]:
    """g_1 = expm1(h)/h − 1, g_{k+1} = g_k/h − 1/(k+1)! (UniPC's b vector before scaling)."""
    g = [torch.expm1(h) / h - 1]
    fact = 1.0
    for k in range(1, order):
        fact *= k + 1
        g.append(g[-1] / h - 1 / fact)
    return g
