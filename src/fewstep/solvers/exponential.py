"""Exponential-integrator multistep solvers in the half-log-SNR λ (docs/maths.md §4.7–4.8, §15): DPM-Solver++
and UniPC.

Model output m is D (data prediction, `predict_x0=True`) or d = ε̂ (noise prediction). With the frame's signal
scale α and λ = log(α/t) (EDM: α = 1, λ = −log σ; flow: α = 1 − t), the data-prediction update is
x_{n+1} = (t_{n+1}/t_n)·x_n − α_{n+1}·(expm1(−h)·m_n + …), and the (EDM-only) noise-prediction one
x_{n+1} = x_n − t_{n+1}·(expm1(h)·m_n + …). A step's `scale` c multiplies the model terms. Both updates are linear
in the history, so each step is written as x_{n+1} = a·x_n + Σ_j w_j·m_{n−j} with coefficients that depend only
on the grid (a cached plan; see `Solver.plan`). From a flow model's t = 1 (λ = −∞, h = +∞) the coefficients are
their limits: IEEE arithmetic gives them for DPM-Solver++, UniPC drops nodes at λ = −∞ from its extrapolation.
"""

from __future__ import annotations

import math

import torch

from ..errors import SolverError
from ..frames import EDM, Frame
from .base import Node, Option, Solver, StepInfo, affine, order_option, register
from .primitives import phi_ratios


class _Exponential(Solver):
    recommended_schedule = ("logsnr", None)
    options = {
        "max_order": order_option(3),
        "predict_x0": Option(True, choices=(True, False), help="data prediction (DPM-Solver++) or noise prediction"),
        "lower_order_final": Option(True, choices=(True, False), help="order never exceeds the steps left"),
    }
    history = 3

    def order(self, available: int, info: StepInfo) -> int:
        k = min(self.max_order, available)
        # the final denoise is a step to σ = 0 too (as diffusers' and k-diffusion's last step)
        return min(k, info.steps_left + int(info.final_denoise)) if self.lower_order_final else k

    def check_frame(self, frame: Frame) -> None:
        if not self.predict_x0 and frame is not EDM:
            raise SolverError(f"{self.name}: noise prediction (predict_x0=False) divides by α = 1 − t = 0 at a flow "
                              "model's t = 1; use data prediction (the default)")

    def model_out(self, n: Node) -> torch.Tensor:
        return n.denoised if self.predict_x0 else n.d

    def to_update(self, t_cur: torch.Tensor, t_next: torch.Tensor, terms: list[torch.Tensor],
                  frame: Frame) -> tuple[torch.Tensor | float, list[torch.Tensor]]:
        """(a, w) of x_{n+1} = a·x_n + Σ w_j·m_j from the coefficients of the model terms:
        a = t_{n+1}/t_n and w = −α_{n+1}·terms (data), or a = 1 and w = −t_{n+1}·terms (noise, EDM)."""
        if self.predict_x0:
            alpha = frame.alpha(t_next)
            return t_next / t_cur, [-alpha * c for c in terms]
        return 1.0, [-t_next * c for c in terms]


@register
class DPMSolverPP(_Exponential):
    name = "dpmpp"
    summary = "DPM-Solver++ multistep (1, 2M, 3M); noise-prediction DPM-Solver with predict_x0=False"

    def step(self, x, hist, t_next, info, scale=1.0):
        nodes = hist[::-1][: self.order(len(hist), info)]  # newest first
        sigmas = [n.sigma for n in nodes]
        a, w = self.plan([*sigmas, t_next], (info.frame.name,), lambda: self.coefficients(sigmas, t_next, info.frame))
        return affine(x, a, [(c, self.model_out(n)) for c, n in zip(w, nodes)], scale)

    def coefficients(self, sigmas: list[torch.Tensor], t_next: torch.Tensor,
                     frame: Frame = EDM) -> tuple[torch.Tensor | float, list]:
        """(a, w) of the order-len(sigmas) update from the nodes at `sigmas` (newest first)."""
        lam = frame.lam
        h = lam(t_next) - lam(sigmas[0])
        sgn = -1.0 if self.predict_x0 else 1.0  # data prediction integrates e^{−h}, noise prediction e^{h}
        phi1 = torch.expm1(sgn * h)
        if len(sigmas) == 1:
            return self.to_update(sigmas[0], t_next, [phi1], frame)
        r0 = (lam(sigmas[0]) - lam(sigmas[1])) / h
        if len(sigmas) == 2:  # 2M: φ₁·(m0 + ½·(m0 − m1)/r0)
            return self.to_update(sigmas[0], t_next, [phi1 * (1 + 0.5 / r0), -phi1 * 0.5 / r0], frame)
        r1 = (lam(sigmas[1]) - lam(sigmas[2])) / h
        hb = sgn * h
        phi2 = phi1 / hb - 1
        phi3 = phi2 / hb - 0.5
        # 3M (docs/maths.md §4.7): φ₁m0 + φ₂D1 + φ₃D2 with the φ's of hb = ∓h for both variants,
        # D1 = d0 + r0/(r0+r1)·(d0 − d1), D2 = (d0 − d1)/(r0+r1), d0 = (m0 − m1)/r0, d1 = (m1 − m2)/r1
        u = phi2 * (1 + r0 / (r0 + r1)) + phi3 / (r0 + r1)  # the coefficient of d0
        v = -phi2 * r0 / (r0 + r1) - phi3 / (r0 + r1)  # the coefficient of d1
        return self.to_update(sigmas[0], t_next, [phi1 + u / r0, -u / r0 + v / r1, -v / r1], frame)


@register
class UniPC(_Exponential):
    name = "unipc"
    summary = "UniPC: UniP-p predictor + UniC corrector (order p+1) reusing the next evaluation"
    options = {
        **_Exponential.options,
        "variant": Option("bh2", choices=("bh1", "bh2"), help="B(h) = h (bh1) or expm1(h) (bh2)"),
    }
    history = 4

    def _update(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor, order: int,
                scale: torch.Tensor | float, new: Node | None, frame: Frame) -> torch.Tensor:
        """UniP (new is None) or UniC (new = the evaluation at t_next) of the given order from hist[-1]."""
        nodes = hist[::-1][:order]  # n0 and the order−1 nodes before it, newest first
        if frame.max_time < math.inf:  # older nodes at λ = −∞ (t = 1): their divided differences vanish
            nodes = nodes[:1] + [n for n in nodes[1:] if not bool((n.sigma >= frame.max_time).any())]
        sigmas = [n.sigma for n in nodes]
        corrector = new is not None
        a, w = self.plan([*sigmas, t_next], (corrector, frame.name),
                         lambda: self.coefficients(sigmas, t_next, corrector, frame))
        models = [self.model_out(n) for n in nodes] + ([self.model_out(new)] if corrector else [])
        return affine(x, a, list(zip(w, models)), scale)

    def coefficients(self, sigmas: list[torch.Tensor], t_next: torch.Tensor, corrector: bool,
                     frame: Frame = EDM) -> tuple[torch.Tensor | float, list]:
        """(a, w) over m0, the older nodes' m (newest first) and, for the corrector, the new evaluation's m:
        expm1(hh)·m0 + B(h)·Σ ρ_i·(m_i − m0)/r_i with r_new = 1."""
        lam = frame.lam
        h = lam(t_next) - lam(sigmas[0])
        hh = -h if self.predict_x0 else h
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rks = [(lam(s) - lam(sigmas[0])) / h for s in sigmas[1:]] + ([torch.ones_like(h)] if corrector else [])
        n_terms = len(rks)
        if n_terms == 0:
            rhos: list[torch.Tensor] = []
        elif (not corrector and len(sigmas) == 2) or (corrector and len(sigmas) == 1):
            rhos = [torch.full_like(h, 0.5)]  # the simplified order-2 predictor / order-1 corrector
        else:
            g = phi_ratios(hh, n_terms)
            b = torch.stack([math.factorial(k + 1) * g[k] / b_h for k in range(n_terms)], -1)  # [B', p]
            r = torch.stack([torch.stack(rks, -1) ** k for k in range(n_terms)], -2)  # R_{k,i} = r_i^k
            rhos = list(torch.linalg.solve(r, b).unbind(-1))
        w = [b_h * rho / rk for rho, rk in zip(rhos, rks)]
        return self.to_update(sigmas[0], t_next, [torch.expm1(hh) - sum(w, torch.zeros_like(h)), *w], frame)

    def step(self, x, hist, t_next, info, scale=1.0):
        return self._update(x, hist, t_next, self.order(len(hist), info), scale, None, info.frame)

    def correct(self, x_prev, x_new, hist, info, scale=1.0):
        if self.variant == "bh1" and info.frame.max_time < math.inf and bool((hist[-2].sigma >= 1).any()):
            return x_new  # bh1's B(h) = h is infinite over a step from t = 1: that corrector has no limit
        order = self.order(len(hist) - 1, info)
        return self._update(x_prev, hist[:-1], hist[-1].sigma, order, scale, hist[-1], info.frame)
