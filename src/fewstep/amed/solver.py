"""AMED as solvers (docs/maths.md §8): AMED-Solver, and the AMED-Plugin of a base solver as a `Solver` wrapper.

`AMEDPlugin(base, predictor)` is a solver like any other: the loop (`fewstep.solvers.run`) knows nothing of
predictors. On every interval t_n → t_{n+1} the wrapper asks the predictor for (r, c, a) from the features of
the node at t_n, then runs its base on the grid t_n, s_n, t_{n+1} with s_n = t_{n+1}^r·t_n^{1−r}: the model is
called at a·s_n, s_n joins the base's history like any node, and the model terms of the second sub-step are
scaled by c. A two-stage base (DPM-Solver-2, AMED-Solver) takes r as its own ratio and c, a for its whole step.

Features: the evaluator stores them on the nodes (`node_features`: a forward hook on the model's `bottleneck`
module for the length of a run); a node without them is read through its denoised estimate, and AFS's analytic
first node (no model call) gets zeros.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import SolverError
from ..frames import EDM, Frame
from ..solvers.base import (
    SOLVERS, FeatureFn, ModelRequest, Node, Option, Solver, StepInfo, Substep, bcast, midpoint_sigma, register,
    request,
)
from ..solvers.single import TwoStage
from .features import feature_source, reduce_to_features
from .predictor import Control


class Predictor(Protocol):
    """What the plugin asks on every interval: (r, c, a) from the features [B, feature_dim] at t_cur."""

    feature_dim: int

    def control(self, features: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor) -> Control: ...


@register
class AMEDSolver(TwoStage):
    name = "amed"
    recommended_schedule = ("time_uniform", 1.0)  # the paper's AMED-Solver recipe
    summary = "AMED-Solver: one learned mean direction per step (needs a predictor; r=½ without one), 2 NFE"
    options = {"r": Option(0.5, low=1e-3, high=1.0, help="intermediate ratio when no predictor is given")}
    mean_direction = True


def plugin_bases() -> list[str]:
    """The registered solvers an AMED-Plugin can wrap: one model call per interval, or two-stage."""
    return [n for n, cls in SOLVERS.items() if issubclass(cls, TwoStage) or cls.evals_per_step == 1]


def check_base(base: Solver) -> None:
    """Refuse a base the plugin cannot wrap: Heun (two calls, no ratio to set) and solvers that are themselves
    wrappers (a learned card)."""
    if SOLVERS.get(base.name) is not type(base):
        raise SolverError(f"{base.describe()} takes no AMED predictor: the plugin wraps a registered solver (to "
                          "refine a learned card's grid, train AMED on it: --schedule card:DIR)")
    if not isinstance(base, TwoStage) and base.evals_per_step != 1:
        raise SolverError(f"{base.name} has no AMED-Plugin; use {', '.join(plugin_bases())}")


class AMEDPlugin(Solver):
    """The AMED-Plugin of `base` with `predictor` (an `AMEDPredictor`); AMED-Solver when `base` is "amed".
    `bottleneck`: the model's module whose output feeds the predictor (None: the denoised estimate).
    Without a predictor the wrapper describes the method (NFE, grid) but cannot run."""

    name = "amed-plugin"
    summary = "AMED-Plugin: a learned intermediate point per interval of a base solver, 2 NFE per interval"
    evals_per_step = 2  # the base's own evaluation at t_n plus the one at s_n (a two-stage base: its own two)

    def __init__(self, base: Solver, predictor: Predictor | None = None, bottleneck: nn.Module | None = None,
                 final_denoise: bool | None = None):
        super().__init__()
        check_base(base)
        self.base, self.predictor, self.bottleneck = base, predictor, bottleneck
        # the run's ending the predictor was trained for (None: the run's own): a trailing 0 (k-diffusion,
        # ComfyUI) then adds the final call without changing the base's lower_order_final steps
        self.final_denoise = final_denoise
        self.history = base.history
        self.recommended_schedule = base.recommended_schedule

    def describe(self) -> str:
        """'AMED-Solver', or 'AMED-Plugin[base(options)]' with every option of the base that differs."""
        if isinstance(self.base, AMEDSolver):
            return "AMED-Solver"
        return f"AMED-Plugin[{self.base.describe()}]"

    def default_schedule(self, num_steps: int | None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                         model: Any = None) -> torch.Tensor:
        return self.base.default_schedule(num_steps, sigma_min, sigma_max, model)

    def check_grid(self, sigmas: torch.Tensor) -> None:
        self.base.check_grid(sigmas)

    def resolve_afs(self, afs: bool | None) -> bool:
        return self.base.resolve_afs(afs)

    def check_frame(self, frame: Frame) -> None:
        self.base.check_frame(frame)

    def afs_node(self, x: torch.Tensor, sigma: torch.Tensor, frame: Frame = EDM) -> Node:
        """The base's analytic first node, with zero features: no model call was made there."""
        node = self.base.afs_node(x, sigma, frame)
        feature_dim = self._predictor().feature_dim
        return Node(node.sigma, node.x, node.denoised, torch.zeros(x.shape[0], feature_dim, device=x.device))

    def eval_sigma(self, sigma: torch.Tensor, index: int) -> torch.Tensor | None:
        return self.base.eval_sigma(sigma, index)

    def node_features(self) -> AbstractContextManager[FeatureFn | None]:
        """The bottleneck's output, captured by a forward hook during each model call (removed after the run);
        without a bottleneck, the reduced denoised estimate."""
        return feature_source(self.bottleneck)

    def control(self, node: Node, t_next: torch.Tensor) -> Control:
        """The predictor's (r, c, a) for the interval from `node` (at t_n) to t_next."""
        features = node.features if node.features is not None else reduce_to_features(node.denoised)
        return self._predictor().control(features, node.sigma, t_next)

    def advance(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor,
                info: StepInfo) -> Generator[ModelRequest, Node | torch.Tensor, Substep]:
        """One interval as the plugin of the base (module docstring); returns the sub-step that ends at t_{n+1},
        so that the loop's evaluation there corrects it as it would the base's own step."""
        info = info.ending(self.final_denoise)
        control = self.control(hist[-1], t_next)
        c = bcast(control.c, x)
        s = midpoint_sigma(hist[-1].sigma, t_next, control.r)
        a = torch.minimum(control.a, info.frame.max_time / s.detach())  # a flow model is called at times ≤ 1
        base = self.base
        if isinstance(base, TwoStage):
            x_next = yield from base.ratio_stages(x, hist, t_next, info, control.r, c, a)
            return Substep(x_next, x, hist, info, c)
        first = replace(info, index=2 * info.index, steps_left=2 * info.steps_left)
        y = yield from base.stages(x, hist, s, first)
        hist = [*hist[-base.history :], (yield from request(y, s, info.index, model_sigma=a * s))]
        y = base.correct(x, y, hist, first)
        second = replace(info, index=2 * info.index + 1, steps_left=2 * info.steps_left - 1)
        x_next = yield from base.stages(y, hist, t_next, second, scale=c)
        return Substep(x_next, y, hist, second, c)

    def correct(self, x_prev: torch.Tensor, x_new: torch.Tensor, hist: list[Node], info: StepInfo,
                scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return self.base.correct(x_prev, x_new, hist, info.ending(self.final_denoise), scale)

    def _predictor(self) -> Predictor:
        if self.predictor is None:
            raise SolverError("this AMED-Plugin has no predictor: give one (AMEDPlugin(base, predictor)) or load a "
                              "checkpoint (fewstep.amed.checkpoint.load_checkpoint)")
        return self.predictor
