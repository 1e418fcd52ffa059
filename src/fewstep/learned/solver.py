"""A learned global solver: a classic base solver on a learned grid, with learned evaluation offsets and additive
corrections to its update (docs/maths.md, "Learned global solvers").

With a grid of N + 1 points σ_0 > … > σ_N, the model is called at σ̃_i = σ_i·exp(ξ_i) while the update uses σ_i,
and interval i adds to the base solver's update

    Δx_i = h_i · Σ_{j<K} Δw_{i,j} · d_{i−j}  +  (1 − σ_{i+1}/σ_i) · Σ_{j<K} Δβ_{i,j} · D_{i−j},

with h_i = σ_{i+1} − σ_i: Δw corrects the multistep weights on d (DyWeight-style; rows need not sum to one), Δβ
the exponential-integrator coefficients on D (GS-style). The base update and the corrections are linear in the
history, so with ξ = Δw = Δβ = 0 the card *is* its base solver on that grid, bit for bit (the zero terms are
skipped). A predictor–corrector base (UniPC) gets the same Δx after its corrector. With AFS, an optional learned
shift μ (one value per data dimension, zero = plain AFS) is added to the analytic first node's D_0.

A card's steps are those it was learned with: its base solver sees the run's ending it was fitted for
(`final_denoise`, its frame's: a final denoise after the last grid point on flow models, none on EDM models), so a
run that adds a final denoising call (k-diffusion's and ComfyUI's trailing 0) adds that call and nothing else —
DPM-Solver++'s and UniPC's `lower_order_final` would otherwise raise the order of the last learned steps.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SolverError
from ..frames import EDM, Frame
from ..solvers import nfe
from ..solvers.base import Node, Solver, StepInfo, bcast, get_solver

# Bases whose every interval costs one model call (the card's NFE is then N − AFS).
BASES = ("euler", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc", "gradient_estimation")


class LearnedSolver(Solver):
    """A base solver with a fixed learned grid, offsets ξ [N] (one per evaluated grid point) and correction
    matrices Δw, Δβ [N, K] (None: not learned). Tensors may require grad (training) or be plain (sampling)."""

    name = "learned"
    summary = "a learned global solver card (fewstep learn)"

    def __init__(self, base: str, base_options: dict[str, Any], grid: torch.Tensor, afs: bool,
                 offsets: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                 coeffs: torch.Tensor | None = None, label: str = "", afs_shift: torch.Tensor | None = None,
                 final_denoise: bool | None = None):
        super().__init__()
        if base not in BASES:
            raise SolverError(f"learned solvers build on one of {', '.join(BASES)}, not {base!r}")
        self.base = get_solver(base, **base_options)
        self.grid, self.afs, self.label = grid, bool(afs), label
        self.final_denoise = final_denoise  # the ending it was learned for (None: the run's)
        n = len(grid) - 1
        for field, value, rows in (("offsets", offsets, n), ("weights", weights, n), ("coeffs", coeffs, n)):
            if value is not None and value.shape[0] != rows:
                raise SolverError(f"card {field}: {value.shape[0]} rows for a grid of {n} intervals")
        if afs_shift is not None and not afs:
            raise SolverError("a learned AFS shift needs afs=True")
        self.offsets, self.weights, self.coeffs, self.afs_shift = offsets, weights, coeffs, afs_shift
        window = max((m.shape[1] for m in (weights, coeffs) if m is not None), default=0)
        self.history = max(self.base.history, window)
        self.evals_per_step = self.base.evals_per_step
        self.recommended_schedule = self.base.recommended_schedule
        # Skip zero terms at sampling time (bit-exact base); while training every term stays in the graph.
        self._live = {name: m is not None and (m.requires_grad or bool((m != 0).any()))
                      for name, m in (("offsets", offsets), ("weights", weights), ("coeffs", coeffs),
                                      ("afs_shift", afs_shift))}

    @property
    def nfe(self) -> int:
        return nfe(self, len(self.grid), afs=self.afs)

    def describe(self) -> str:
        return self.label or f"learned {self.base.describe()}"

    def default_schedule(self, num_steps: int | None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                         model: Any = None) -> torch.Tensor:
        if num_steps is not None and num_steps != len(self.grid):
            raise SolverError(f"this card has a {len(self.grid)}-point grid, not num_steps={num_steps}")
        return self.grid.detach()

    def resolve_afs(self, afs: bool | None) -> bool:
        if afs is not None and bool(afs) != self.afs:
            raise SolverError(f"this card was learned with afs={self.afs}; it cannot run with afs={bool(afs)}")
        return self.afs

    def afs_node(self, x: torch.Tensor, sigma: torch.Tensor, frame: Frame = EDM) -> Node:
        """AFS's analytic first node, plus a learned shift μ of D_0 (one value per data dimension): plain AFS
        assumes zero-mean data, and μ learns what the data's mean adds to E[x_0 | x_T]."""
        node = super().afs_node(x, sigma, frame)
        if not self._live["afs_shift"]:
            return node
        shift = self.afs_shift.to(device=x.device, dtype=x.dtype).reshape(1, *x.shape[1:])
        return Node(sigma, x, node.denoised + shift)

    def eval_sigma(self, sigma: torch.Tensor, index: int) -> torch.Tensor | None:
        if not self._live["offsets"] or index >= len(self.offsets):
            return None
        return sigma * torch.exp(self.offsets[index : index + 1])

    def correction(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor, index: int) -> torch.Tensor | None:
        """Δx of interval `index` from the newest nodes of `hist` (None when every term is zero)."""
        nodes = hist[::-1]
        out = None
        n0 = nodes[0]
        if self._live["weights"]:
            h = bcast(t_next - n0.sigma, x)
            for j, node in enumerate(nodes[: self.weights.shape[1]]):
                term = h * bcast(self.weights[index, j : j + 1], x) * node.d
                out = term if out is None else out + term
        if self._live["coeffs"]:
            g = bcast(1 - t_next / n0.sigma, x)
            for j, node in enumerate(nodes[: self.coeffs.shape[1]]):
                term = g * bcast(self.coeffs[index, j : j + 1], x) * node.denoised
                out = term if out is None else out + term
        return out

    def check_grid(self, sigmas: torch.Tensor) -> None:
        """Only the card's own grid (its σ's are part of what was learned)."""
        given, own = (g.detach().to("cpu", torch.float64) for g in (sigmas, self.grid))
        if given.shape != own.shape or not torch.equal(given, own):
            raise SolverError(f"this card runs on its own {len(self.grid)}-point grid (fewstep learn export DIR "
                              "--sigmas); do not pass another schedule")

    def step(self, x, hist, t_next, info, scale=1.0):
        info = info.ending(self.final_denoise)  # the steps it was learned with (module docstring)
        x_next = self.base.step(x, hist[-self.base.history :], t_next, info, scale)
        delta = self.correction(x, hist, t_next, info.index)
        return x_next if delta is None else x_next + delta

    def correct(self, x_prev: torch.Tensor, x_new: torch.Tensor, hist: list[Node], info: StepInfo,
                scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        info = info.ending(self.final_denoise)
        x_c = self.base.correct(x_prev, x_new, hist[-self.base.history - 1 :], info, scale)
        if x_c is x_new:
            return x_new
        delta = self.correction(x_prev, hist[:-1], hist[-1].sigma, info.index)
        return x_c if delta is None else x_c + delta
