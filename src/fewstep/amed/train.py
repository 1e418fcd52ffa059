"""Training AMED predictors by trajectory distillation (docs/maths.md §8).

The teacher runs a base solver on the same schedule family with M extra points in every student interval
and is read at the student's grid points. The student takes one interval at a time from the teacher's point
(single-step students: teacher forcing) or from its own previous output (multistep students: self-forcing,
so that their history stays consistent), and the loss is ‖x_student − x_teacher‖² summed per sample,
averaged over the batch. Loss modes: `step` (the paper: one backward per interval, states detached between
intervals), `e2e` (only the final state, gradients through the whole rollout) and `step+e2e` (both).

A conditional model is trained over a distribution of conditions (`conditions`, a ConditionSpec: each training
seed gets its own class or prompt and the run's guidance scale), recorded in the checkpoint's `amed.json`.

A teacher pool (`pool` N > 0) is computed once per model, conditions, teacher and grid and kept on disk in shards
(fewstep.shards: `$FEWSTEP_CACHE/amed-pool/<digest>/`, resumable, dealt to the torchrun ranks). `memory`
(fewstep.memory) runs each batch in micro-batches and recomputes the model calls' activations in the backward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..conditioning import ConditionSpec, conditioned_model
from ..costs import CostPlan, training_cost
from ..errors import FewstepError, SolverError
from ..fitted import fitted_weights
from ..memory import MemoryPlan, checkpointed, frozen, network_dtype
from ..models.registry import ModelInfo
from ..noise import seeded_noise
from ..schedules import get_schedule
from ..seeds import AMED_TRAINING
from ..shards import SeedTensors, ShardStore
from ..solvers import Evaluator, GridPoint, ModelRequest, Node, answer, get_solver, nfe, run, sample
from ..training import Step, Trainer
from .checkpoint import SamplingSettings, check_no_predictor, model_identity, save_checkpoint
from .features import feature_source
from .predictor import AMEDPredictor
from .solver import AMEDPlugin

SINGLE_STEP = ("amed", "dpm2", "euler")
LOSS_MODES = ("step", "e2e", "step+e2e")


@dataclass
class TrainConfig:
    """A distillation run. Defaults: the paper's AMED-Solver recipe."""

    student: str = "amed"
    teacher: str = "heun"
    num_steps: int = 4
    M: int = 1
    afs: bool = True
    schedule: str = "time_uniform"
    rho: float | None = 1.0
    scale_dir: float = 0.01
    scale_time: float = 0.0
    student_options: dict[str, Any] = field(default_factory=dict)
    teacher_options: dict[str, Any] = field(default_factory=dict)
    batch: int = 128
    kimg: float = 10.0
    lr: float = 5e-3
    loss: str = "step"
    seed: int = 0
    pool: int = 0  # 0: fresh noise and teacher run every batch (the paper); N > 0: N teacher runs, reused


    def validate(self) -> None:
        if self.loss not in LOSS_MODES:
            raise FewstepError(f"loss must be one of {LOSS_MODES}, got {self.loss!r}")
        for name in ("M", "num_steps", "batch", "pool", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise FewstepError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.M < 0 or self.num_steps < 2 or self.batch < 1 or self.pool < 0:
            raise FewstepError("need M >= 0, num_steps >= 2, batch >= 1 and pool >= 0")
        numbers = {"kimg": self.kimg, "lr": self.lr, "scale_dir": self.scale_dir, "scale_time": self.scale_time,
                   "rho": 1.0 if self.rho is None else self.rho}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FewstepError(f"{name} must be a finite number, got {value!r}")
        if self.kimg <= 0 or self.lr <= 0 or numbers["rho"] <= 0:
            raise FewstepError(f"need kimg > 0, lr > 0 and rho > 0, got {self.kimg}, {self.lr}, {self.rho}")
        if not (0 <= self.scale_dir < 1 and 0 <= self.scale_time < 1):
            raise FewstepError(f"scale_dir and scale_time bound c and a in [1-s, 1+s]: need 0 <= s < 1, got "
                               f"{self.scale_dir} and {self.scale_time}")
        if self.student == "heun":
            raise SolverError("heun has no AMED-Plugin; choose amed, euler, dpm2, ipndm, ipndm_v, deis, dpmpp or unipc")
        get_solver(self.student, **self.student_options)
        get_solver(self.teacher, **self.teacher_options)
        self.training_seeds()

    @property
    def iterations(self) -> int:
        return max(1, math.ceil(self.kimg * 1000 / self.batch))

    def training_seeds(self) -> range:
        """The run's noise seeds: the pool, or a fresh batch for every iteration (checked to stay in its range)."""
        if self.pool:
            return AMED_TRAINING.seeds(self.pool, self.seed, "--pool")
        return AMED_TRAINING.seeds(self.iterations * self.batch, self.seed,
                                   "the training trajectories (--kimg × 1000, in whole batches)")


def _detached(hist: list[Node]) -> list[Node]:
    return [Node(n.sigma.detach(), n.x.detach(), n.denoised.detach(), n.features) for n in hist]


def student_schedule(model: ModelInfo, cfg: TrainConfig) -> torch.Tensor:
    """The student's grid; `gits` searches a GITS schedule for this model and N (default search settings);
    `card:DIR` takes the σ grid of a learned solver card (AMED-Plugin on a learned grid)."""
    if cfg.schedule.startswith("card:"):
        from ..learned import load_card

        card = load_card(cfg.schedule[5:], model)
        if card.num_steps != cfg.num_steps:
            raise FewstepError(f"the card {cfg.schedule[5:]} has a {card.num_steps}-point grid; AMED needs "
                               f"num_steps={cfg.num_steps}")
        return torch.tensor(card.sigmas, dtype=torch.float64)
    if cfg.schedule == "gits":
        from ..gits import cached_search

        return cached_search(model).schedule(cfg.num_steps, solver=cfg.student, solver_options=cfg.student_options)[0]
    return get_schedule(cfg.schedule, cfg.num_steps, model.sigma_min, model.sigma_max, rho=cfg.rho, model=model)


def teacher_schedule(model: ModelInfo, cfg: TrainConfig) -> torch.Tensor:
    """The student's grid with M points inserted per interval: the same family with (M+1)(N−1)+1 points, or,
    for file/table schedules (gits:FILE, ays:TABLE, discrete), points uniform in σ^{1/7} inside each interval."""
    if cfg.schedule in ("polynomial", "logsnr", "time_uniform"):
        return get_schedule(cfg.schedule, (cfg.M + 1) * (cfg.num_steps - 1) + 1, model.sigma_min, model.sigma_max,
                            rho=cfg.rho)
    from ..gits import refine_schedule

    return refine_schedule(student_schedule(model, cfg), cfg.M)


def teacher_states(model: ModelInfo, noise: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The teacher's states at the student's grid points: [N, B, …]."""
    fine = teacher_schedule(model, cfg)
    with torch.no_grad():
        traj = sample(model.denoiser, noise, cfg.teacher, fine, return_trajectory=True, denoise_to_zero=False,
                      **cfg.teacher_options)  # states at the grid points (a flow run's final step to 0 comes after)
    return traj[:: cfg.M + 1]


def rollout(model: ModelInfo, predictor: AMEDPredictor, cfg: TrainConfig, sigmas: torch.Tensor,
            targets: torch.Tensor, features: Any, weight: float = 1.0,
            checkpoint: bool = False) -> tuple[torch.Tensor, list[float], list[Any]]:
    """One student rollout against the teacher states; backpropagates the configured loss times `weight` (a
    micro-batch's share of the batch).

    A consumer of the driver (`fewstep.solvers.run`): single-step students answer each grid request at the
    teacher's state (teacher forcing), and with the `step` loss every interval's graph is cut at its grid point.
    With `checkpoint` the model calls' activations are recomputed in the backward pass instead of kept.
    Returns the final state, the per-interval losses (times `weight`) and the controls used (for the progress bar).
    """
    ev = Evaluator(checkpointed(model.denoiser, checkpoint), features=features)
    forcing = cfg.student in SINGLE_STEP
    per_step = cfg.loss in ("step", "step+e2e")
    losses, controls = [], []

    class Recorded(AMEDPlugin):  # the plugin, keeping every choice for the progress bar
        def control(self, node: Node, t_next: torch.Tensor) -> Any:
            controls.append(super().control(node, t_next))
            return controls[-1]

    def evaluate(req: ModelRequest) -> Node:
        x = targets[req.index] if forcing and req.grid_point else req.x  # teacher forcing: restart from the teacher
        return ev(x, req.sigma, req.index, model_sigma=req.model_sigma)

    def on_grid_point(point: GridPoint) -> GridPoint | None:
        if point.index == 0:
            return None
        x = point.stepped if forcing else point.x  # the student's own state (before forcing replaced it)
        loss = (x - targets[point.index]).pow(2).reshape(x.shape[0], -1).sum(1).mean() * weight
        losses.append(float(loss.detach()))
        if per_step:
            loss.backward(retain_graph=cfg.loss == "step+e2e")
        if cfg.loss == "step":
            return replace(point, x=point.x.detach(), hist=_detached(point.hist))
        return None

    student = Recorded(get_solver(cfg.student, **cfg.student_options), predictor)
    x = answer(run(student, targets[0], sigmas, afs=cfg.afs), evaluate, on_grid_point)
    if cfg.loss in ("e2e", "step+e2e"):
        ((x - targets[-1]).pow(2).reshape(x.shape[0], -1).sum(1).mean() * weight).backward()
    return x, losses, controls


def teacher_calls(cfg: TrainConfig) -> int:
    """Model calls of one teacher run (on the refined grid of (M + 1)(N − 1) + 1 points)."""
    return nfe(get_solver(cfg.teacher, **cfg.teacher_options), (cfg.M + 1) * (cfg.num_steps - 1) + 1, afs=False,
               denoise_to_zero=False)


def student_calls(cfg: TrainConfig) -> int:
    """Model calls of one student rollout."""
    return nfe(AMEDPlugin(get_solver(cfg.student, **cfg.student_options), None), cfg.num_steps, afs=cfg.afs,
               denoise_to_zero=False)


def pool_store(model: ModelInfo, cfg: TrainConfig, spec: ConditionSpec, fine: torch.Tensor) -> ShardStore:
    """The disk store of teacher pools: teacher states at the student's grid points [N, *shape] per seed."""
    key = {"model": model.name, "fingerprint": model.fingerprint, "shape": list(model.shape),
           "frame": model.frame.name, "sigma_min": model.sigma_min, "sigma_max": model.sigma_max,
           "conditions": spec.to_json() if spec.conditional else None, "teacher": cfg.teacher,
           "teacher_options": dict(sorted(cfg.teacher_options.items())), "grid": [float(s) for s in fine],
           "read_every": cfg.M + 1}
    return ShardStore("amed-pool", key, (cfg.num_steps, *model.shape))


def _teacher_pool(model: ModelInfo, cfg: TrainConfig, first_seed: int, progress: bool, spec: ConditionSpec,
                  chunk: int, log: Callable[[str], None] | None = None) -> SeedTensors:
    """Teacher states for seeds first_seed…first_seed + pool − 1 (rows [N, …]), computed once where missing, in
    chunks of `chunk` seeds (a network teacher is the costly part)."""
    store = pool_store(model, cfg, spec, teacher_schedule(model, cfg))
    seeds = list(range(first_seed, first_seed + cfg.pool))

    def solve(part: list[int]) -> torch.Tensor:
        states = teacher_states(conditioned_model(model, spec, part),
                                seeded_noise(part, model.shape, device=model.device), cfg)
        return states.transpose(0, 1)

    store.fill(seeds, solve, chunk, desc="teacher pool", progress=progress, log=log)
    return store.view(seeds)


def train_plan(model: ModelInfo, cfg: TrainConfig, memory: MemoryPlan | None = None,
               conditions: ConditionSpec | None = None) -> CostPlan:
    """The model calls `train` will make (fewstep.costs): the teacher runs (the pool's missing seeds, or a fresh
    run for every trajectory) and the student rollouts. Validates the settings first."""
    cfg.validate()
    memory = memory or MemoryPlan()
    memory.validate(cfg.batch, "train")
    spec = conditions or ConditionSpec()
    tcalls, calls = teacher_calls(cfg), student_calls(cfg)
    plan = CostPlan(f"train {cfg.student} (AMED) on {model.name}: {cfg.iterations:,} iterations ({memory.describe()})")
    if cfg.pool:
        cached = 0
        if cfg.schedule != "gits":  # a GITS grid would be searched first: counted as not cached
            store = pool_store(model, cfg, spec, teacher_schedule(model, cfg))
            first = cfg.training_seeds().start
            have = store.present()
            cached = sum(s in have for s in range(first, first + cfg.pool))
        todo = cfg.pool - cached
        plan.add("teacher pool", todo * tcalls, formula=f"{todo:,} of {cfg.pool:,} trajectories × {tcalls} calls of "
                                                        f"{cfg.teacher}; {cached:,} cached")
    else:
        n = cfg.iterations * cfg.batch
        plan.add("teacher", n * tcalls, formula=f"{cfg.iterations:,} iterations × batch {cfg.batch} × {tcalls} "
                                                f"calls of {cfg.teacher}")
    training_cost(plan, "student", cfg.iterations, cfg.batch, calls, memory.checkpoint, "calls (the student's NFE)")
    m = memory.micro_batch or cfg.batch
    plan.notes.append("backward counts are upper bounds (a call whose output no loss reads runs no backward); "
                      f"activations held at once: {m} samples × "
                      + ("1 model call (checkpointed)" if memory.checkpoint else f"up to {calls} model calls"))
    return plan


def _stats(controls: list[Any]) -> dict[str, str]:
    out = {}
    for key in ("r", "c", "a"):
        v = torch.cat([getattr(c, key).detach().reshape(-1) for c in controls]).float()
        out[key] = f"{v.mean():.3f}±{v.std():.3f}" if v.numel() > 1 else f"{v.mean():.3f}"
    return out


def train(model: ModelInfo, cfg: TrainConfig, out: str | Path | None = None, progress: bool = True,
          log_every: int = 0, conditions: ConditionSpec | None = None, memory: MemoryPlan | None = None,
          log: Callable[[str], None] | None = None) -> tuple[AMEDPredictor, SamplingSettings, dict[str, Any]]:
    """Distil a predictor; with `out`, checkpoint it (and resume from `out/train_state.pt` if present).

    The loop is `fewstep.training.Trainer`: checkpoints every 50 iterations, at the end and on Ctrl-C or SIGTERM;
    under torchrun (WORLD_SIZE > 1) rank r trains on the share seeds[r::world] of every batch and the gradients
    are averaged with weights share/batch, which gives the single-process gradient; rank 0 writes the files.
    `memory` bounds an iteration's memory (micro-batches, activation checkpointing) without changing the predictor
    beyond round-off; `log` receives the ETA lines.
    """
    cfg.validate()
    memory = memory or MemoryPlan()
    memory.validate(cfg.batch, "train")
    spec = conditions or ConditionSpec()
    conditioned_model(model, spec, [])  # refuses conditions for an unconditional model and vice versa
    rank, world = distributed.world()
    if world > min(cfg.batch, cfg.pool or cfg.batch):
        raise FewstepError(f"{world} ranks need a batch (and pool) of at least {world}")
    torch.manual_seed(cfg.seed)
    sigmas = student_schedule(model, cfg)
    predictor = AMEDPredictor(cfg.scale_dir, cfg.scale_time)
    # what a resumed run must share with the saved state: every setting, the conditions and the model itself
    identity = {"config": asdict(cfg), "conditions": spec.to_json(), "model": model_identity(model)}
    trainer = Trainer(predictor, torch.optim.Adam(predictor.parameters(), lr=cfg.lr), cfg.iterations, cfg.batch,
                      seed=cfg.seed, items=cfg.pool or None, name="predictor",
                      state_path=Path(out) / "train_state.pt" if out is not None else None, identity=identity,
                      checkpoint_every=50, desc="train AMED", progress=progress, log_every=log_every, log=log)
    if not trainer.resume() and out is not None:
        check_no_predictor(out)
    began = time.perf_counter()
    first_seed = cfg.training_seeds().start
    chunk = min(cfg.batch, memory.micro_batch or cfg.batch)
    pool = _teacher_pool(model, cfg, first_seed, progress, spec, chunk, log) if cfg.pool else None

    with feature_source(model.bottleneck) as features, frozen(model):

        def step(it: int, mine: torch.Tensor) -> Step:
            """This rank's share of the batch (in micro-batches): fresh noise and teacher runs, or its columns of
            the pool."""
            total, controls = 0.0, []
            for part in memory.split(mine):
                seeds = [first_seed + int(j) for j in part]
                bound = conditioned_model(model, spec, seeds)
                if pool is None:
                    targets = teacher_states(bound, seeded_noise(seeds, model.shape, device=model.device), cfg)
                else:
                    targets = pool.take(part).transpose(0, 1).contiguous().to(model.device)
                _, losses, used = rollout(bound, predictor, cfg, sigmas, targets, features, len(part) / len(mine),
                                          memory.checkpoint)
                total += sum(losses)
                controls += used
            return Step(total, _stats(controls))

        trainer.run(step)
    history = trainer.history
    stats = {"iterations": cfg.iterations, "seconds": time.perf_counter() - began,
             "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
             "loss_curve": history[:: max(1, len(history) // 50)]}
    settings = SamplingSettings(
        model=model.name, model_shape=list(model.shape), model_fingerprint=model.fingerprint, frame=model.frame.name,
        num_steps=cfg.num_steps, student=cfg.student,
        student_options=dict(cfg.student_options), schedule=cfg.schedule, rho=cfg.rho,
        sigma_min=model.sigma_min, sigma_max=model.sigma_max, afs=cfg.afs, scale_dir=cfg.scale_dir,
        scale_time=cfg.scale_time, teacher=cfg.teacher, M=cfg.M, sigmas=sigmas.tolist(),
        guidance=spec.guidance if spec.conditional else None, conditions=spec.to_json() if spec.conditional else None,
        training={**asdict(cfg), **{k: v for k, v in stats.items() if k != "loss_curve"},
                  "micro_batch": memory.micro_batch, "checkpoint": memory.checkpoint,
                  "seeds": {"training": AMED_TRAINING.record(len(cfg.training_seeds()), cfg.seed)}},
        model_dtype=network_dtype(model, torch.float64 if model.exact else torch.float32),
        model_weights=fitted_weights(model),
    )
    if out is not None and rank == 0:
        save_checkpoint(out, predictor, settings)
    distributed.barrier()
    return predictor.eval(), settings, stats
