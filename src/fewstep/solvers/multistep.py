"""Linear multistep solvers on d (docs/maths.md §4.4–4.6, §4.9): iPNDM, exact variable-step Adams–Bashforth, DEIS,
gradient estimation."""

from __future__ import annotations

import torch

from ..schedules import VPLinear
from .base import Node, Option, Solver, StepInfo, affine, order_option, register
from .primitives import ADAMS_BASHFORTH, lagrange_step_weights


class _LinearMultistep(Solver):
    """x_{n+1} = x_n + c·Σ_j C_{n,j} d_{n−j}, warming up with lower orders while history is short."""

    options = {"max_order": order_option(4)}
    history = 4

    def order(self, hist: list[Node]) -> int:
        return min(self.max_order, len(hist))

    def coefficients(self, nodes: list[Node], t_next: torch.Tensor, info: StepInfo) -> list[torch.Tensor]:
        """C_{n,j} (already multiplied by h) for the nodes, newest first."""
        raise NotImplementedError

    def step(self, x, hist, t_next, info, scale=1.0):
        nodes = hist[::-1][: self.order(hist)]
        coeffs = self.plan([n.sigma for n in nodes] + [t_next], (info.sigma_min, info.sigma_max),
                           lambda: tuple(self.coefficients(nodes, t_next, info)))
        return affine(x, 1.0, [(c, n.d) for c, n in zip(coeffs, nodes)], scale)


@register
class IPNDM(_LinearMultistep):
    name = "ipndm"
    summary = "improved PNDM: fixed-step Adams–Bashforth weights on d, orders 1–4"

    def coefficients(self, nodes, t_next, info):
        h = t_next - nodes[0].sigma
        return [h * w for w in ADAMS_BASHFORTH[len(nodes)]]


@register
class IPNDMv(_LinearMultistep):
    name = "ipndm_v"
    summary = "exact variable-step Adams–Bashforth in σ, orders 1–4 (= iPNDM on uniform grids)"

    def coefficients(self, nodes, t_next, info):
        return lagrange_step_weights([n.sigma for n in nodes], nodes[0].sigma, t_next)


@register
class DEIS(_LinearMultistep):
    name = "deis"
    recommended_schedule = ("time_uniform", 2.0)
    summary = "DEIS exponential-integrator multistep: tAB (Lagrange in VP time) or ρAB (in σ), orders 1–4"
    options = {
        "max_order": order_option(4),
        "deis_mode": Option("tab", choices=("tab", "rhoab"), help="interpolate in VP time τ (tab) or in σ (rhoab)"),
    }

    def coefficients(self, nodes, t_next, info):
        sigmas = [n.sigma for n in nodes]
        if self.deis_mode == "rhoab":
            return lagrange_step_weights(sigmas, nodes[0].sigma, t_next)
        vp = VPLinear.fit(info.sigma_min, info.sigma_max)
        return lagrange_step_weights(sigmas, nodes[0].sigma, t_next, coord=vp.tau, quad_points=16)


@register
class GradientEstimation(_LinearMultistep):
    name = "gradient_estimation"
    recommended_schedule = ("kl_optimal", None)  # its best schedule over the built-in models (and ComfyUI's pairing)
    summary = "gradient estimation (Permenter & Yuan): Euler on γ·d_n + (1 − γ)·d_{n−1}, γ = 2; first order"
    options = {"gamma": Option(2.0, low=1.0, high=3.0, help="weight γ of the newest direction (1: Euler)")}
    history = 2

    def order(self, hist: list[Node]) -> int:
        return min(2, len(hist))

    def coefficients(self, nodes, t_next, info):
        h = t_next - nodes[0].sigma
        return [h] if len(nodes) == 1 else [h * self.gamma, h * (1 - self.gamma)]
