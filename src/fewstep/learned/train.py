"""Fitting a solver card by final-sample distillation (docs/maths.md, "Learned global solvers").

Teacher pairs (z, x_teacher(z)) come from a fine solve on training seeds (disjoint from evaluation seeds 0, 1, …)
and are cached on disk; validation pairs on other seeds select the state to keep. One iteration runs the card's
whole N-step rollout through the driver (`fewstep.solvers.integrate`, the one sampling loop) on a batch of pairs,
with the network frozen and gradients flowing through every model call to the card's parameters:

    steps    θ ∈ ℝ^N: log σ_i = log σ_max + u_i·(log σ_min − log σ_max), u = [0, cumsum(softmax θ)]
    offsets  ξ ∈ ℝ^N: the model is called at σ_i·exp(ξ_i)
    weights  Δw ∈ ℝ^{N×K}, coeffs Δβ ∈ ℝ^{N×K}: additive corrections of the update (learned/solver.py)
    mean     μ ∈ ℝ^dim (AFS only): a shift of AFS's analytic first node, D_0 ← D_0 + μ

`CardParameters` and the card name each quantity by its family, except two: the family `steps` is stored as the
grid `sigmas` (the parameter `steps` holds θ), and the family `mean` learns `afs_shift` (μ).

The loss is the mean over the batch of ‖x_N − x_teacher‖²/dim (`l2`), of its square root (`rmse`, the benchmark's
metric) or of |x_N − x_teacher| (`l1`); with
`soft_radius` r > 0 (LD3's soft teacher) the student starts from z + δ_p with a learned ‖δ_p‖ ≤ r·√dim per pair.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..costs import CostPlan, training_cost
from ..errors import FewstepError
from ..fitted import fitted_weights
from ..frames import get_frame
from ..memory import MemoryPlan, checkpointed, frozen, network_dtype
from ..models.registry import ModelInfo
from ..noise import seeded_noise
from ..schedules import get_schedule
from ..seeds import CARD_TRAINING, VALIDATION
from ..shards import SeedTensors
from ..solvers import SOLVERS, Evaluator, get_solver, integrate, nfe, num_steps_for_nfe
from ..solvers.base import Denoiser
from ..training import Step, Trainer
from .card import PARAMETER_FAMILIES, Card, save_card
from .pairs import cached_count, teacher_nfe, teacher_pair_view, teacher_pairs, teacher_setup
from .solver import BASES, LearnedSolver

__all__ = ["LOSSES", "CardParameters", "LearnConfig", "learn", "learn_plan", "rollout", "sample_error",
           "teacher_pairs", "teacher_setup"]

LOSSES = ("l2", "rmse", "l1")


@dataclass
class LearnConfig:
    """Everything that defines a card's training (recorded in the card and checked on resume)."""

    base: str = "dpmpp"
    base_options: dict[str, Any] = field(default_factory=dict)
    nfe: int = 5
    afs: bool = True
    params: tuple[str, ...] = ("steps", "offsets", "coeffs")
    init_schedule: str = ""  # '' = the base's recommended schedule; else 'name' or 'name:rho'
    window: int = 3  # K: history nodes each correction row reaches
    loss: str = "l2"
    soft_radius: float = 0.0
    teacher: str = "auto"  # 'auto': see `teacher_setup`
    teacher_options: dict[str, Any] = field(default_factory=dict)
    teacher_steps: int = 0  # grid points of the teacher (polynomial ρ = 7); 0 = the teacher's default
    pairs: int = 512
    val_pairs: int = 128
    iters: int = 300
    batch: int = 64
    lr: float = 0.02
    seed: int = 0
    conditions: dict[str, Any] | None = None  # condition distribution + guidance of a conditional model
    frame: str = "edm"  # the model's frame, set by `learn` (a flow card's rollout ends with the step to t = 0)

    def validate(self) -> None:
        def bad(name: str, problem: str) -> FewstepError:
            return FewstepError(f"learn: {name} {problem}")

        if self.base not in BASES:
            raise bad("--base", f"must be one of {', '.join(BASES)}, not {self.base!r}")
        get_solver(self.base, **self.base_options)  # unknown or out-of-range options: an error now, not later
        if self.teacher != "auto":
            get_solver(self.teacher, **self.teacher_options)
        if not (isinstance(self.nfe, int) and 1 <= self.nfe <= 50):
            raise bad("--nfe", f"must be an integer in 1…50, got {self.nfe!r}")
        if self.num_intervals < 1:
            raise bad("--nfe", "with --afs must be at least 1")
        if not self.params:
            raise bad("--params", f"must name at least one family of {', '.join(PARAMETER_FAMILIES)}")
        unknown = set(self.params) - set(PARAMETER_FAMILIES)
        if unknown:
            raise bad("--params", f"has unknown families {sorted(unknown)}; choose from "
                                  f"{', '.join(PARAMETER_FAMILIES)}")
        if self.loss not in LOSSES:
            raise bad("--loss", f"must be one of {', '.join(LOSSES)}")
        for name, v, low in (("--pairs", self.pairs, 1), ("--val-pairs", self.val_pairs, 1), ("--iters", self.iters, 0),
                             ("--batch", self.batch, 1), ("--window", self.window, 1)):
            if not isinstance(v, int) or v < low:
                raise bad(name, f"must be an integer >= {low}, got {v!r}")
        for name, v in (("--lr", self.lr), ("--soft-radius", self.soft_radius)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise bad(name, f"must be a finite number >= 0, got {v!r}")
        if self.lr == 0 and self.iters:
            raise bad("--lr", "must be positive")
        CARD_TRAINING.seeds(self.pairs, self.seed, "--pairs")  # the run's pairs stay among its training seeds
        VALIDATION.seeds(self.val_pairs, option="--val-pairs")

    @property
    def num_intervals(self) -> int:
        return num_steps_for_nfe(self.base, self.nfe, self.afs, get_frame(self.frame).final_denoise,
                                 **self.base_options) - 1


class CardParameters(torch.nn.Module):
    """The trainable numbers of a card; all zero-correction at initialisation (the card is then its base).

    Named as the card names them: `steps` (θ, the logits of the grid's normalised log-σ gaps; `grid()` is the
    card's `sigmas`), `offsets` (ξ), `weights` (Δw), `coeffs` (Δβ) and `afs_shift` (μ, learned by the family
    `mean`). `tensors()` gives the values the card stores (history and AFS masks applied)."""

    def __init__(self, init_grid: torch.Tensor, families: tuple[str, ...], window: int, afs: bool,
                 data_dim: int = 0, free_end: bool = False):
        super().__init__()
        n = len(init_grid) - 1
        log = init_grid.log()
        self.log_max, self.log_min = float(log[0]), float(log[-1])
        self.ends = (float(init_grid[0]), float(init_grid[-1]))
        gaps = (log[:-1] - log[1:]) / (self.log_max - self.log_min)
        self.families, self.afs = tuple(families), afs
        self.steps = torch.nn.Parameter(gaps.log(), requires_grad="steps" in families)
        # `free_end` (runs that end with D(x, σ_N), flow models): the last grid point σ_N = σ_min·(σ_{N−1}/σ_min)^e,
        # e = clamp(end, 0, 0.95), learned with the steps; at σ_min that final call is nearly D(x) = x, higher it
        # makes a real last step to 0 (docs/maths.md, "Learned global solvers"). e = 0 at initialisation.
        self.end = (torch.nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad="steps" in families)
                    if free_end else None)
        self.offsets = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64), requires_grad="offsets" in families)
        k = min(window, n)
        self.weights = torch.nn.Parameter(torch.zeros(n, k, dtype=torch.float64)) if "weights" in families else None
        self.coeffs = torch.nn.Parameter(torch.zeros(n, k, dtype=torch.float64)) if "coeffs" in families else None
        self.afs_shift = None  # the shift of AFS's first D_0 (docs/maths.md, "Learned global solvers")
        if "mean" in families:
            if not afs:
                raise FewstepError("learn: the 'mean' family shifts AFS's first node: it needs --afs")
            self.afs_shift = torch.nn.Parameter(torch.zeros(data_dim, dtype=torch.float64))
        # interval i has nodes 0…i: entry j of row i needs j ≤ i; AFS's first point is never evaluated
        self.register_buffer("history_mask", (torch.arange(k)[None, :] <= torch.arange(n)[:, None]).double())
        self.register_buffer("offset_mask", torch.ones(n, dtype=torch.float64).index_fill(0, torch.tensor([0]),
                                                                                              0.0 if afs else 1.0))

    def grid(self) -> torch.Tensor:
        u = torch.cat([self.steps.new_zeros(1), torch.cumsum(torch.softmax(self.steps, 0), 0)])
        log_sigma = self.log_max + u * (self.log_min - self.log_max)
        grid = log_sigma.exp()
        # pin the endpoints exactly (the cumulative sum ends at 1 only up to rounding)
        last = grid.new_tensor(self.ends[1:])
        if self.end is not None:
            e = torch.where(self.end >= 0, self.end.clamp_max(0.95), 0.0)  # clamp(0, 0.95), with a gradient at 0
            last = last * torch.exp((log_sigma[-2:-1] - self.log_min) * e)
        return torch.cat([grid.new_tensor(self.ends[:1]), grid[1:-1], last])

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "grid": self.grid(),
            "offsets": self.offsets * self.offset_mask,
            "weights": None if self.weights is None else self.weights * self.history_mask,
            "coeffs": None if self.coeffs is None else self.coeffs * self.history_mask,
            "afs_shift": self.afs_shift,
        }

    def solver(self, base: str, base_options: dict[str, Any]) -> LearnedSolver:
        t = self.tensors()
        return LearnedSolver(base, base_options, t["grid"], self.afs, t["offsets"], t["weights"], t["coeffs"],
                             afs_shift=t["afs_shift"])


def init_grid(model: ModelInfo, cfg: LearnConfig) -> torch.Tensor:
    """The grid training starts from: `init_schedule` ('name' or 'name:rho'), else the base's recommended one."""
    name, rho = SOLVERS[cfg.base].recommended_schedule
    if cfg.init_schedule.partition(":")[0] in ("flow", "oss"):  # their ':' part is an argument, not ρ
        return get_schedule(cfg.init_schedule, cfg.num_intervals + 1, model.sigma_min, model.sigma_max, model=model)
    if cfg.init_schedule:
        name, _, r = cfg.init_schedule.partition(":")
        try:
            rho = float(r) if r else None
        except ValueError:
            raise FewstepError(f"learn: --init-schedule {cfg.init_schedule!r}: rho must be a number") from None
    return get_schedule(name, cfg.num_intervals + 1, model.sigma_min, model.sigma_max, rho=rho, model=model)


def rollout(params: CardParameters, cfg: LearnConfig, denoiser: Denoiser, noise: torch.Tensor,
            dtype: torch.dtype, checkpoint: bool = False) -> torch.Tensor:
    """x_N of the card on `noise` through the driver (gradients flow to `params` and through the model; with
    `checkpoint` every model call's activations, the flow frame's final denoise included, are recomputed in the
    backward pass instead of kept)."""
    solver = params.solver(cfg.base, cfg.base_options)
    grid = solver.grid
    x = noise.to(dtype) * grid[0].to(dtype)
    frame = get_frame(cfg.frame)
    return integrate(solver, Evaluator(checkpointed(denoiser, checkpoint)), x, grid, afs=cfg.afs,
                     denoise_to_zero=frame.final_denoise, frame=frame)


def sample_error(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample RMSE (the benchmark's metric) [B]."""
    return (x.to(torch.float64) - target).reshape(x.shape[0], -1).pow(2).mean(1).sqrt()


def card_nfe(cfg: LearnConfig) -> int:
    """Model calls of one rollout of the card."""
    frame = get_frame(cfg.frame)
    return nfe(get_solver(cfg.base, **cfg.base_options), cfg.num_intervals + 1, afs=cfg.afs,
               denoise_to_zero=frame.final_denoise)


def learn_plan(model: ModelInfo, cfg: LearnConfig, memory: MemoryPlan | None = None) -> CostPlan:
    """The model calls `learn` will make (fewstep.costs): teacher pairs not cached yet, the optimisation, the
    validations (at the start and every 25 iterations) and the final training error. Validates everything first."""
    cfg = replace(cfg, frame=model.frame.name)
    cfg.validate()
    memory = memory or MemoryPlan()
    memory.validate(cfg.batch, "learn")
    calls, tcalls = card_nfe(cfg), teacher_nfe(model, cfg)
    teacher, options, steps = teacher_setup(model, cfg)
    cached = (cached_count(model, list(CARD_TRAINING.seeds(cfg.pairs, cfg.seed)), cfg)
              + cached_count(model, list(VALIDATION.seeds(cfg.val_pairs)), cfg))
    todo = cfg.pairs + cfg.val_pairs - cached
    plan = CostPlan(f"learn {cfg.base} NFE {cfg.nfe} on {model.name} ({memory.describe()})")
    plan.add("teacher pairs", todo * tcalls, formula=f"{todo:,} pairs × {tcalls} calls of {teacher} on "
                                                     f"{steps} points; {cached:,} of {cfg.pairs + cfg.val_pairs:,} "
                                                     "cached")
    training_cost(plan, "training", cfg.iters, cfg.batch, calls, memory.checkpoint, "calls (the card's NFE)")
    checks = 1 + cfg.iters // 25 + (1 if cfg.iters % 25 else 0)
    plan.add("validation", checks * cfg.val_pairs * calls, formula=f"{checks} × {cfg.val_pairs:,} pairs × {calls}")
    plan.add("final train error", cfg.pairs * calls, formula=f"{cfg.pairs:,} pairs × {calls}")
    m = memory.micro_batch or cfg.batch
    plan.notes.append(f"activations held at once: {m} samples × "
                      + ("1 model call (checkpointed)" if memory.checkpoint else f"{calls} model calls"))
    return plan


def learn(model: ModelInfo, cfg: LearnConfig, out: str | Path | None = None, progress: bool = True,
          bind: Callable[[list[int]], Denoiser] | None = None, time_limit: float | None = None,
          memory: MemoryPlan | None = None, log: Callable[[str], None] | None = None) -> Card:
    """Fit a card; with `out`, write `card.json` there (and resume from `out/learn_state.pt`).

    `bind(seeds)` returns the denoiser for a batch of seeds (a conditional model binds each seed's condition);
    by default the model's own denoiser. The loop is `fewstep.training.Trainer`: validates and checkpoints every 25
    iterations, saves on Ctrl-C/SIGTERM, keeps the best validated state. With `time_limit` (seconds, teacher pairs
    excluded) training stops early. `memory` (fewstep.memory) bounds the memory of an iteration by micro-batches
    and activation checkpointing without changing the card beyond round-off; `log` receives the ETA lines.
    """
    cfg = replace(cfg, frame=model.frame.name)
    cfg.validate()
    memory = memory or MemoryPlan()
    memory.validate(cfg.batch, "learn")
    bind = bind or (lambda seeds: model.denoiser)
    rank, world = distributed.world()
    if world > 1 and cfg.soft_radius > 0:
        raise FewstepError("learn: --soft-radius is single-process only (its per-pair offsets live on one rank)")
    dtype = torch.float64 if model.exact else torch.float32
    device = _device(model)
    train_seeds = list(CARD_TRAINING.seeds(cfg.pairs, cfg.seed))
    val_seeds = list(VALIDATION.seeds(cfg.val_pairs))
    began = time.perf_counter()
    chunk = memory.eval_chunk
    targets = teacher_pair_view(model, train_seeds, cfg, bind, chunk, progress, log)
    val_targets = teacher_pair_view(model, val_seeds, cfg, bind, chunk, progress, log)
    teacher_seconds = time.perf_counter() - began
    torch.manual_seed(cfg.seed)
    params = CardParameters(init_grid(model, cfg), cfg.params, cfg.window, cfg.afs, math.prod(model.shape),
                            free_end=model.frame.final_denoise)
    dim = math.prod(model.shape)
    delta = torch.zeros(cfg.pairs, *model.shape, dtype=torch.float64, device=device,
                        requires_grad=cfg.soft_radius > 0)
    trainable = [p for p in params.parameters() if p.requires_grad] + ([delta] if cfg.soft_radius > 0 else [])
    opt = torch.optim.Adam(trainable, lr=cfg.lr)
    identity = {"name": model.name, "shape": list(model.shape), "fingerprint": model.fingerprint,
                "sigma_min": model.sigma_min, "sigma_max": model.sigma_max, "frame": model.frame.name}

    def validation() -> float:
        return _mean_error(params, cfg, model, bind, val_seeds, val_targets, dtype, chunk)

    trainer = Trainer(params, opt, cfg.iters, cfg.batch, seed=cfg.seed, items=cfg.pairs, name="params",
                      state_path=Path(out) / "learn_state.pt" if out is not None else None,
                      identity={"config": asdict(cfg), "model": identity}, extra={"delta": delta},
                      checkpoint_every=25, validate=validation, metric="train", desc=f"learn {cfg.base} NFE {cfg.nfe}",
                      progress=progress, log=log)
    trainer.resume()

    def cosine(step: int) -> float:  # lr factor at iteration start + step (a resumed run continues the curve)
        done = min(trainer.start + step, cfg.iters) / max(cfg.iters, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))

    def step(it: int, mine: torch.Tensor) -> Step:
        """The card's rollout on this rank's pairs (in micro-batches); backpropagates their mean loss; reports
        their mean RMSE."""
        errors = []
        for part in memory.split(mine):
            seeds = [train_seeds[int(i)] for i in part]
            target = targets.take(part).to(device)
            noise = seeded_noise(seeds, model.shape, device=device)
            if cfg.soft_radius > 0:
                noise = noise + delta[part.to(device)]
            x = rollout(params, cfg, bind(seeds), noise, dtype, memory.checkpoint)
            diff = (x.to(torch.float64) - target).reshape(len(part), -1)
            (_loss(diff, cfg.loss).mean() * (len(part) / len(mine))).backward()  # × 1 without micro-batches
            errors.append(sample_error(x.detach(), target))
        return Step(float(torch.cat(errors).mean()))

    def project() -> None:  # δ back onto its ball
        with torch.no_grad():
            norm = delta.reshape(cfg.pairs, -1).norm(dim=1).clamp(min=1e-12)
            scale = (cfg.soft_radius * math.sqrt(dim) / norm).clamp(max=1.0)
            delta.mul_(scale.reshape(-1, *([1] * len(model.shape))))

    with frozen(model):
        trainer.run(step, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, cosine),
                    after_update=project if cfg.soft_radius > 0 else None, time_limit=time_limit)
        best = trainer.best
        train_err = _mean_error(params, cfg, model, bind, train_seeds, targets, dtype, chunk)
    t = params.tensors()
    as_list = lambda v: None if v is None else v.detach().tolist()
    fitted = {"dtype": network_dtype(model, dtype), "device": str(device)}  # what it was fitted at (shape: above)
    if fitted_weights(model):
        fitted["weights"] = fitted_weights(model)
    card = Card(
        base=cfg.base, base_options=dict(cfg.base_options), afs=cfg.afs, sigmas=as_list(t["grid"]),
        offsets=as_list(t["offsets"]), weights=as_list(t["weights"]), coeffs=as_list(t["coeffs"]),
        afs_shift=as_list(t["afs_shift"]),
        params=[p for p in PARAMETER_FAMILIES if p in cfg.params], model={**identity, **fitted},
        conditions=cfg.conditions,
        training=_plain({**asdict(cfg), "train_rmse": train_err, "val_rmse": best["val"],
                         "val_rmse_initial": trainer.initial_val, "best_iteration": best["iteration"],
                         "seconds": time.perf_counter() - began, "teacher_seconds": teacher_seconds,
                         "val_curve": trainer.val_curve, "micro_batch": memory.micro_batch,
                         "checkpoint": memory.checkpoint,
                         "seeds": {"training": CARD_TRAINING.record(cfg.pairs, cfg.seed),
                                   "validation": VALIDATION.record(cfg.val_pairs)}}),
    )
    if out is not None and rank == 0:
        save_card(out, card)
    distributed.barrier()
    return card


def _device(model: ModelInfo) -> torch.device:
    """Where the model runs (`fewstep learn --device`); the card's parameters stay float64 on the CPU."""
    return torch.device(getattr(model, "device", None) or "cpu")


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """The record as JSON will read it back (tuples become lists), so that a card round-trips equal."""
    return json.loads(json.dumps(record))


def _loss(diff: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample loss of the flattened final-state error [B, dim]: squared (`l2`), its root (`rmse`: the
    benchmark's metric, less dominated by the few samples that land on another mode) or absolute (`l1`)."""
    if kind == "l1":
        return diff.abs().mean(1)
    mse = diff.pow(2).mean(1)
    return mse if kind == "l2" else (mse + 1e-20).sqrt()


def _mean_error(params: CardParameters, cfg: LearnConfig, model: ModelInfo, bind: Callable[[list[int]], Denoiser],
                seeds: list[int], targets: SeedTensors, dtype: torch.dtype, chunk: int = 256) -> float:
    """The card's mean per-sample RMSE to `targets` over `seeds` (no gradients; chunks of `chunk`)."""
    device = _device(model)
    with torch.no_grad():
        errs = [sample_error(rollout(params, cfg, bind(seeds[i : i + chunk]),
                                     seeded_noise(seeds[i : i + chunk], model.shape, device=device), dtype),
                             targets.take(range(i, min(i + chunk, len(seeds)))).to(device))
                for i in range(0, len(seeds), chunk)]
    return float(torch.cat(errs).mean())
