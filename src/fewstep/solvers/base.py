"""The shared machinery of every solver: model evaluations, history nodes, the registry and options.

A solver is one small class registered by name. It sees the probability-flow ODE dx/dσ = (x − D(x, σ))/σ
only through *nodes* (σ, x, D) that the driver (`fewstep.solvers.driver.run`) requests at every grid point, and
implements `step` (one interval t_n → t_{n+1}) and, for predictor–corrector methods, `correct`. A solver with
more model calls per interval (Heun, DPM-Solver-2) implements `stages` instead: a generator that yields a
`ModelRequest` for each extra call and receives its node.
Node σ's are float64 tensors of shape [1] or [B] (per-sample times, which a solver wrapper may choose).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import torch

from ..errors import DenoiserError, SolverError
from ..frames import EDM, Frame
from ..schedules import get_schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, D) → per-sample features [B, F]


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample value [B] or [1] so that it broadcasts against x [B, …] (in x's dtype)."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class Node:
    """One model evaluation: the state x at time σ, and D = D(x, σ_model) (σ_model = σ unless the solver moves
    the model's time)."""

    sigma: torch.Tensor  # float64, [1] or [B]
    x: torch.Tensor
    denoised: torch.Tensor
    features: torch.Tensor | None = None  # [B, F] when the evaluator extracts features (see `Evaluator`)

    @cached_property
    def d(self) -> torch.Tensor:
        """The ODE direction d = (x − D)/σ (= ε̂ in σ-space), computed once per node."""
        return (self.x - self.denoised) / bcast(self.sigma, self.x)


@dataclass
class ModelRequest:
    """A model call the driver needs: the state x at node time σ, the network called at `model_sigma` (σ unless
    the solver moves it, e.g. a learned card's offsets); `index` names the step in messages. `grid_point`: x is
    the state at grid point `index`, so a consumer may answer with a node at an edited state, which the run then
    continues from."""

    x: torch.Tensor
    sigma: torch.Tensor
    model_sigma: torch.Tensor
    index: int
    grid_point: bool = False


Stages = Generator[ModelRequest, "Node | torch.Tensor", torch.Tensor]


def request(x: torch.Tensor, sigma: torch.Tensor, index: int, model_sigma: torch.Tensor | None = None,
            grid_point: bool = False) -> Generator[ModelRequest, Node | torch.Tensor, Node]:
    """Yield one model request and return its answer as a node (a bare D is taken as D(x, σ_model))."""
    reply = yield ModelRequest(x, sigma, sigma if model_sigma is None else model_sigma, index, grid_point)
    return reply if isinstance(reply, Node) else Node(sigma, x, reply)


@dataclass(frozen=True)
class StepInfo:
    """Where a step sits in the run: its index, how many intervals remain (this one included), the schedule's σ
    range (DEIS-tAB fits its VP time to it), the frame the run integrates in (its α and λ for the exponential
    integrators, docs/maths.md §15) and whether the run ends with a final denoise (one more step to σ = 0).

    `index` and `steps_left` count intervals, as `Solver.evals_per_step` does (calls per interval), while a
    `num_steps` argument elsewhere counts grid points: a grid of num_steps points has num_steps − 1 intervals
    (docs/maths.md §1)."""

    index: int
    steps_left: int
    sigma_min: float
    sigma_max: float
    frame: Frame = EDM
    final_denoise: bool = False

    def ending(self, final_denoise: bool | None) -> StepInfo:
        """This step in a run that ends with (or without) a final denoise: a learned solver (a card, a learned
        plugin) takes the steps it was fitted with whatever the run's ending (None: keep this run's)."""
        if final_denoise is None or final_denoise == self.final_denoise:
            return self
        return replace(self, final_denoise=final_denoise)


PLAN_LIMIT = 65536  # cached coefficient sets (a grid of N points uses about N per solver configuration)
_PLANS: dict[tuple, Any] = {}


def affine(x: torch.Tensor, a: torch.Tensor | float, terms: list[tuple[torch.Tensor | float, torch.Tensor]],
           scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """a·x + scale·Σ b·y over the (b, y) terms. With Python-float coefficients (a cached plan) this is one
    multiply and one in-place add per term, the fewest full passes; otherwise per-sample tensors broadcast."""
    if isinstance(a, float) and isinstance(scale, float) and all(isinstance(b, float) for b, _ in terms):
        if a == 1.0 and terms:
            (b, y), *terms = terms
            out = torch.add(x, y, alpha=b * scale)
        else:
            out = x * a
        for b, y in terms:
            out.add_(y, alpha=b * scale)
        return out
    out = x * (bcast(a, x) if isinstance(a, torch.Tensor) else a)
    for b, y in terms:
        out = out + (bcast(b, x) if isinstance(b, torch.Tensor) else b) * scale * y
    return out


def afs_node(x: torch.Tensor, sigma: torch.Tensor, frame: Frame = EDM) -> Node:
    """Analytical first step (docs/maths.md §7, §15): d_0 = x_0/√(1 + t_0²), i.e. D_0 = x_0 − t_0·d_0, in the
    EDM frame (the flow frame's D_0 is that rule mapped through σ = t/(1 − t), 0 at t = 1), no model."""
    return Node(sigma, x, frame.afs_denoised(x, bcast(sigma, x)), features=None)


class Evaluator:
    """Calls the denoiser: counts NFE, checks shape and finiteness, names the step and σ on failure.

    `threshold_ratio` enables dynamic thresholding of D (clip at that quantile of |D|, at least 1, rescale):
    meaningful only for pixel data in [−1, 1], so it is off unless asked for. `features` (x, D) → [B, F], when
    set, is stored on every node for a solver that reads them (`Solver.node_features`; it may read a network's
    inner activations captured by a forward hook).
    """

    def __init__(self, denoiser: Denoiser, threshold_ratio: float | None = None,
                 features: FeatureFn | None = None):
        self.denoiser = denoiser
        self.threshold_ratio = threshold_ratio
        self.features = features
        self.calls = 0

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, step: int, model_sigma: torch.Tensor | None = None
    ) -> Node:
        s_model = sigma if model_sigma is None else model_sigma
        s_arg = s_model.to(device=x.device, dtype=x.dtype).expand(x.shape[0])

        def where() -> str:  # built only for an error message
            return f"at step {step} (sigma={_fmt(s_model)})"

        try:
            out = self.denoiser(x, s_arg)
        except DenoiserError:
            raise
        except Exception as e:  # any failure inside user code: say where it happened
            raise DenoiserError(f"denoiser raised {type(e).__name__} {where()}: {e}") from e
        self.calls += 1
        if not isinstance(out, torch.Tensor):
            raise DenoiserError(f"denoiser returned {type(out).__name__}, not a tensor, {where()}")
        if out.shape != x.shape:
            raise DenoiserError(f"denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)} {where()}")
        out = out.to(x.dtype)
        # one reduction instead of isfinite's 4 full passes (a measurable share of the driver's own time);
        # a non-finite sum is rechecked element-wise (a finite output may overflow the sum)
        if not math.isfinite(out.detach().sum()) and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise DenoiserError(f"denoiser returned {bad} non-finite values (NaN/Inf) {where()}")
        if self.threshold_ratio is not None:
            out = dynamic_threshold(out, self.threshold_ratio)
        return Node(sigma, x, out, self.features(x, out) if self.features is not None else None)

    def answer(self, req: ModelRequest) -> Node:
        """Answer one of the driver's model requests."""
        return self(req.x, req.sigma, req.index, model_sigma=req.model_sigma)


def dynamic_threshold(denoised: torch.Tensor, ratio: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = max(1, quantile_ratio |D|) per sample; D ← clip(D, −s, s)/s."""
    flat = denoised.reshape(denoised.shape[0], -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1).to(denoised.dtype)
    s = s.reshape(-1, *([1] * (denoised.ndim - 1)))
    return torch.clamp(denoised, -s, s) / s


def _fmt(sigma: torch.Tensor) -> str:
    s = sigma.reshape(-1)
    if s.numel() == 1 or bool((s == s[0]).all()):
        return f"{s[0].item():.6g}"
    return f"{s.min().item():.4g}..{s.max().item():.4g}"  # per-sample σ


@dataclass(frozen=True)
class Option:
    """A solver option: its default, and the values or range it accepts."""

    default: Any
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    help: str = ""

    def validate(self, solver: str, name: str, value: Any) -> Any:
        if self.choices is not None and value not in self.choices:
            raise SolverError(f"{solver}: option {name}={value!r} not in {list(self.choices)}")
        if self.low is not None or self.high is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SolverError(f"{solver}: option {name} must be a finite number, got {value!r}")

            if isinstance(self.default, int) and not isinstance(value, int):
                raise SolverError(f"{solver}: option {name} must be an integer, got {value!r}")
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                raise SolverError(f"{solver}: option {name}={value!r} out of range [{self.low}, {self.high}]")
        return value


def order_option(high: int, default: int | None = None) -> Option:
    return Option(default if default is not None else high, low=1, high=high, help=f"maximal order (1–{high})")


class Solver:
    """Base class: subclasses set `name`, `options`, `evals_per_step` and implement `step`."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    evals_per_step: ClassVar[int] = 1  # model calls per interval (the node evaluation included)
    history: ClassVar[int] = 1  # how many newest nodes `step` reads
    summary: ClassVar[str] = ""
    recommended_schedule: ClassVar[tuple[str, float | None]] = ("polynomial", 7.0)  # (name, ρ; None: its default)

    def __init__(self, **opts: Any):
        unknown = set(opts) - set(self.options)
        if unknown:
            known = ", ".join(self.options) or "none"
            raise SolverError(f"{self.name}: unknown option(s) {sorted(unknown)}; options: {known}")
        for key, opt in self.options.items():
            setattr(self, key, opt.validate(self.name, key, opts.get(key, opt.default)))

    def default_schedule(self, num_steps: int | None, sigma_min: float = 0.002, sigma_max: float = 80.0,
                         model: Any = None) -> torch.Tensor:
        """The grid this solver runs on when the caller gives none: its `recommended_schedule` with `num_steps`
        points (a learned card returns its own grid). `model` serves model-based schedules (`discrete`)."""
        if num_steps is None:
            raise SolverError("give a schedule or num_steps")
        name, rho = self.recommended_schedule
        return get_schedule(name, num_steps, sigma_min, sigma_max, rho=rho, model=model)

    def check_grid(self, sigmas: torch.Tensor) -> None:
        """Refuse a grid this solver cannot run on; the loop asks once per run. Any grid by default; a learned
        card runs on its own grid only."""

    def resolve_afs(self, afs: bool | None) -> bool:
        """The AFS setting of a run: the caller's (default off); a learned card fixes its own."""
        return bool(afs)

    def check_frame(self, frame: Frame) -> None:
        """Refuse a frame this solver cannot integrate in; the loop asks once per run. Any frame by default."""

    def afs_node(self, x: torch.Tensor, sigma: torch.Tensor, frame: Frame = EDM) -> Node:
        """The first node under AFS (no model call): `afs_node`'s analytic D_0; a learned card may refine it."""
        return afs_node(x, sigma, frame)

    def eval_sigma(self, sigma: torch.Tensor, index: int) -> torch.Tensor | None:
        """The σ at which the driver calls the model for grid point `index` (None: σ itself). A learned card's
        evaluation offsets ξ move it to σ·exp(ξ) while the update still uses σ (docs/maths.md, learned solvers)."""
        return None

    def step(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor, info: StepInfo,
             scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Advance x from hist[-1].sigma to t_next with no model call (extra calls belong in `stages`); `scale`
        multiplies the model terms (a wrapper's per-sample direction scale; 1 in a plain run)."""
        raise NotImplementedError

    def stages(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor, info: StepInfo,
               scale: torch.Tensor | float = 1.0) -> Stages:
        """One interval as a generator of the interval's extra model requests (none by default: `step`)."""
        yield from ()
        return self.step(x, hist, t_next, info, scale)

    def correct(self, x_prev: torch.Tensor, x_new: torch.Tensor, hist: list[Node], info: StepInfo,
                scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Refine the state of step `info` with the evaluation at its end (hist[-1]); default: keep it."""
        return x_new

    def advance(self, x: torch.Tensor, hist: list[Node], t_next: torch.Tensor,
                info: StepInfo) -> Generator[ModelRequest, Node | torch.Tensor, Substep]:
        """One interval as the loop runs it: the solver's `stages`. A wrapper that splits the interval into
        sub-steps returns the last one, which the loop's evaluation at t_{n+1} then corrects like any step."""
        x_next = yield from self.stages(x, hist, t_next, info)
        return Substep(x_next, x, hist, info)

    def node_features(self) -> AbstractContextManager[FeatureFn | None]:
        """For the length of a run: the function (x, D) → [B, F] whose value the evaluator stores on every node
        as `features`, or None (the default: this solver reads no features)."""
        return nullcontext()

    def plan(self, sigmas: list[torch.Tensor], extra: tuple, compute: Callable[[], tuple]) -> tuple:
        """Coefficients that depend only on the grid: `compute()` (float64 tensors, nested tuples allowed) once per
        grid as Python floats, reused across batches, when every σ is a single value outside autograd;
        otherwise computed as they are (per-sample σ's, a learned grid in training)."""
        if any(s.numel() != 1 or s.requires_grad for s in sigmas):
            return compute()
        key = (type(self), *(getattr(self, name) for name in self.options), *(float(s) for s in sigmas), *extra)
        found = _PLANS.get(key)
        if found is None:
            if len(_PLANS) >= PLAN_LIMIT:
                _PLANS.clear()
            found = _PLANS[key] = _as_floats(compute())
        return found

    def describe(self) -> str:
        """Name plus the options that differ from their defaults, e.g. 'dpmpp(max_order=2)'."""
        changed = [f"{k}={getattr(self, k)}" for k, o in self.options.items() if getattr(self, k) != o.default]
        return f"{self.name}({', '.join(changed)})" if changed else self.name


@dataclass
class Substep:
    """The last sub-step of an interval: its result, its start state and history, for the driver's corrector."""

    x_next: torch.Tensor
    x_prev: torch.Tensor
    hist: list[Node]
    info: StepInfo
    scale: torch.Tensor | float = 1.0


def _as_floats(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_as_floats(v) for v in value)
    return value


def midpoint_sigma(t_cur: torch.Tensor, t_next: torch.Tensor, r: torch.Tensor | float) -> torch.Tensor:
    """s = t_{n+1}^r · t_n^{1−r}: the geometric intermediate time of DPM-Solver-2 (r may be per sample)."""
    return t_next**r * t_cur ** (1 - r)


SOLVERS: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make a solver available by its `name`."""
    SOLVERS[cls.name] = cls
    return cls


def get_solver(name: str, **options: Any) -> Solver:
    """Instantiate a registered solver with validated options."""
    if name not in SOLVERS:
        raise SolverError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name](**options)
