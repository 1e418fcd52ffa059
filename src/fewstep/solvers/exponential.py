"""Exponential-integrator multistep solvers in λ = −log σ (SPEC §4.7–4.8): DPM-Solver++ and UniPC.

Model output m is D (data prediction, `predict_x0=True`) or d = ε̂ (noise prediction). In σ-space
(α = 1) the data-prediction update is x_{n+1} = (t_{n+1}/t_n)·x_n − expm1(−h)·m_n − …, and the
noise-prediction one x_{n+1} = x_n − t_{n+1}·(expm1(h)·m_n + …). AMED's scale c multiplies the model terms.
"""

from __future__ import annotations

import math

import torch

from .base import Node, Option, Solver, StepInfo, bcast, order_option, register
from .primitives import phi_ratios


def lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR in σ-space: λ = −log σ."""
    return -torch.log(sigma)


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
        return min(k, info.steps_left) if self.lower_order_final else k

    def model_out(self, n: Node) -> torch.Tensor:
        return n.denoised if self.predict_x0 else n.d

    def combine(self, x: torch.Tensor, n0: Node, t_next: torch.Tensor, model_terms: torch.Tensor,
                scale: torch.Tensor | float) -> torch.Tensor:
        """x_{n+1} = (t_{n+1}/t_n)x_n − c·terms (data) or x_n − c·t_{n+1}·terms (noise)."""
        if not (isinstance(scale, float) and scale == 1.0):  # AMED's c; skip a full pass when plain
            model_terms = scale * model_terms
        if self.predict_x0:
            return bcast(t_next / n0.sigma, x) * x - model_terms
        return x - bcast(t_next, x) * model_terms


@register
class DPMSolverPP(_Exponential):
    name = "dpmpp"
    summary = "DPM-Solver++ multistep (1, 2M, 3M); noise-prediction DPM-Solver with predict_x0=False"

    def step(self, x, hist, t_next, info, ev, scale=1.0):
        k = self.order(len(hist), info)
        n0 = hist[-1]
        h = lam(t_next) - lam(n0.sigma)
        sgn = -1.0 if self.predict_x0 else 1.0  # data prediction integrates e^{−h}, noise prediction e^{h}
        phi1 = bcast(torch.expm1(sgn * h), x)
        m0 = self.model_out(n0)
        if k == 1:
            return self.combine(x, n0, t_next, phi1 * m0, scale)
        n1 = hist[-2]
        r0 = (lam(n0.sigma) - lam(n1.sigma)) / h
        d1_0 = (m0 - self.model_out(n1)) / bcast(r0, x)
        if k == 2:  # 2M: m0 + ½·D1
            return self.combine(x, n0, t_next, phi1 * (m0 + 0.5 * d1_0), scale)
        n2 = hist[-3]
        r1 = (lam(n1.sigma) - lam(n2.sigma)) / h
        d1_1 = (self.model_out(n1) - self.model_out(n2)) / bcast(r1, x)
        d1 = d1_0 + bcast(r0 / (r0 + r1), x) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / bcast(r0 + r1, x)
        hb = bcast(sgn * h, x)
        phi2 = phi1 / hb - 1
        phi3 = phi2 / hb - 0.5
        # 3M: φ₁m + φ₂D1 + φ₃D2 with the φ's of hb = ∓h for both variants (SPEC's data-form φ₂ = φ₁/h + 1 is
        # −phi2 here, hence its "φ₁D_n − φ₂D1 + φ₃D2"; the noise form is SPEC's φ₁d_n + φ₂D1 + φ₃D2 as written)
        return self.combine(x, n0, t_next, phi1 * m0 + phi2 * d1 + phi3 * d2, scale)


@register
class UniPC(_Exponential):
    name = "unipc"
    summary = "UniPC: UniP-p predictor + UniC corrector (order p+1) reusing the next evaluation"
    options = {
        **_Exponential.options,
        "variant": Option("bh2", choices=("bh1", "bh2"), help="B(h) = h (bh1) or expm1(h) (bh2)"),
    }
    history = 4
    corrects = True

    def _update(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor, order: int,
                scale: torch.Tensor | float, new: Node | None) -> torch.Tensor:
        """UniP (new is None) or UniC (new = the evaluation at t_next) of the given order from hist[-1]."""
        n0 = hist[-1]
        h = lam(t_next) - lam(n0.sigma)
        hh = -h if self.predict_x0 else h
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        m0 = self.model_out(n0)
        older = hist[::-1][1:order]  # the order−1 nodes before n0, newest first
        rks = [(lam(n.sigma) - lam(n0.sigma)) / h for n in older]
        diffs = [(self.model_out(n) - m0) / bcast(r, x) for n, r in zip(older, rks)]
        if new is not None:
            rks.append(torch.ones_like(h))
            diffs.append(self.model_out(new) - m0)
        n_terms = len(diffs)
        if n_terms == 0:
            rhos: list[torch.Tensor] = []
        elif (new is None and order == 2) or (new is not None and order == 1):
            rhos = [torch.full_like(h, 0.5)]  # the simplified order-2 predictor / order-1 corrector
        else:
            g = phi_ratios(hh, n_terms)
            b = torch.stack([math.factorial(k + 1) * g[k] / b_h for k in range(n_terms)], -1)  # [B', p]
            r = torch.stack([torch.stack(rks, -1) ** k for k in range(n_terms)], -2)  # R_{k,i} = r_i^k
            rhos = list(torch.linalg.solve(r, b).unbind(-1))
        res = sum((bcast(rho, x) * dd for rho, dd in zip(rhos, diffs)), torch.zeros_like(x))
        return self.combine(x, n0, t_next, bcast(torch.expm1(hh), x) * m0 + bcast(b_h, x) * res, scale)

    def step(self, x, hist, t_next, info, ev, scale=1.0):
        return self._update(x, hist, t_next, self.order(len(hist), info), scale, None)

    def correct(self, x_prev, x_new, hist, info, scale=1.0):
        order = self.order(len(hist) - 1, info)
        return self._update(x_prev, hist[:-1], hist[-1].sigma, order, scale, hist[-1])
