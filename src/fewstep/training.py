"""One training harness for fewstep's distillations: AMED predictors (`amed.train`) and learned solver cards
(`learned.train`).

Both fit a small module with an optimizer on batches of a training set; `Trainer` does everything around the
gradient computation once, so both behave alike:

* data order (`epoch_batch`): every epoch a fresh permutation seeded by the run seed and the epoch, a function of
  the iteration alone, so a resumed run and every torchrun rank draw the same batches; a stream (fresh noise for
  every batch) takes items it·batch … (it + 1)·batch − 1. Rank r trains on the share batch[r::world];
* gradients: the mean over the ranks weighted by their shares (`distributed.average_gradients`: the
  single-process gradient of the batch mean), then non-finite entries set to 0, so that one stiff sample cannot
  poison the parameters;
* checkpoints: every `checkpoint_every` iterations, at the end, and on Ctrl-C or SIGTERM (`signals.interrupts`),
  the state file gets the run's identity, the module, the optimizer, the iteration and the curves (an interrupt
  inside an update keeps the last checkpoint); a run resumes only a state of its own identity;
* with a validation function: the module is validated at every checkpoint, and the best validated state is the
  one left in the module at the end;
* with a `log` function: once the first iterations are timed, the expected time of the rest (an ETA).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .costs import format_seconds
from .errors import FewstepError
from .io import atomic_write
from .signals import interrupts


class TrainingStateError(FewstepError):
    """A training state file that is corrupt, damaged or saved by another run."""


def epoch_batch(n: int, batch: int, seed: int, iteration: int) -> torch.Tensor:
    """The indices into n items of iteration `iteration`: batch k of epoch e's permutation, seeded by (seed, e)."""
    per_epoch = max(1, n // batch)
    epoch, k = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch : (k + 1) * batch]


@dataclass
class Step:
    """What one iteration reports: this rank's value of the tracked metric on its share of the batch (the batch
    mean, e.g. of the loss) and extra progress-bar fields."""

    value: float
    info: dict[str, str] = field(default_factory=dict)


class Trainer:
    """Runs `iterations` updates of `module` by `optimizer` (see the module docstring for what it takes care of).

    `items`: the size of the training set (None: a stream); `name`: the module's key in the state file; `extra`:
    more tensors to save and restore (not validated); `identity`: what a resumed state must have been saved with.
    """

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, iterations: int, batch: int, *,
                 seed: int, items: int | None = None, name: str = "module", state_path: Path | None = None,
                 identity: dict[str, Any] | None = None, extra: dict[str, torch.Tensor] | None = None,
                 checkpoint_every: int = 50, validate: Callable[[], float] | None = None, metric: str = "loss",
                 desc: str = "train", progress: bool = True, log_every: int = 0,
                 log: Callable[[str], None] | None = None, eta_after: int = 3) -> None:
        self.module, self.optimizer, self.iterations, self.batch = module, optimizer, iterations, batch
        self.seed, self.items, self.name, self.state_path = seed, items, name, state_path
        self.identity, self.extra = dict(identity or {}), dict(extra or {})
        self.checkpoint_every, self.validate, self.metric = checkpoint_every, validate, metric
        self.desc, self.progress, self.log_every = desc, progress, log_every
        self.log, self.eta_after = log, eta_after
        self.rank, self.world = distributed.world()
        self.start = 0
        self.history: list[float] = []  # the tracked metric of every iteration (mean over the whole batch)
        self.val_curve: list[tuple[int, float]] = []  # (iteration, validation value) at every checkpoint
        self.best: dict[str, Any] | None = None  # {"val", "state", "iteration"}: the best validated module
        self.initial_val: float | None = None

    def resume(self) -> bool:
        """Load the state file if there is one (True), else validate the initial module (False)."""
        if self.state_path is not None and self.state_path.exists():
            self._load(self.state_path)
            return True
        if self.validate is not None:
            self.initial_val = self.validate()
            self.best = {"val": self.initial_val, "state": self._snapshot(), "iteration": 0}
        return False

    def batch_indices(self, iteration: int) -> torch.Tensor:
        """The whole batch of `iteration` (indices into the training set, or stream positions)."""
        if self.items is None:
            return torch.arange(iteration * self.batch, (iteration + 1) * self.batch)
        return epoch_batch(self.items, self.batch, self.seed, iteration)

    def run(self, step: Callable[[int, torch.Tensor], Step], scheduler: Any = None,
            after_update: Callable[[], None] | None = None, time_limit: float | None = None) -> None:
        """Train from `self.start`: `step(iteration, mine)` computes this rank's gradients (of its share's mean)
        for the batch indices `mine`; then the harness reduces them, updates, steps `scheduler`, calls
        `after_update`, checkpoints. `time_limit` (seconds) stops early, after at least one iteration."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        bar = tqdm(range(self.start, self.iterations), desc=self.desc, initial=self.start, total=self.iterations,
                   disable=not self.progress or self.rank > 0)
        stop_at = time.perf_counter() + time_limit if time_limit is not None else math.inf
        completed = saved = self.start
        updating = False
        began, announced = time.perf_counter(), self.log is None or self.rank > 0
        with interrupts():
            try:
                for it in bar:
                    if time.perf_counter() > stop_at and completed > self.start:
                        break
                    batch = self.batch_indices(it)
                    mine = batch[self.rank :: self.world]
                    self.optimizer.zero_grad(set_to_none=True)
                    result = step(it, mine)
                    value = result.value
                    if self.world > 1:  # the batch mean: each rank's mean weighted by its share
                        distributed.average_gradients(params, len(mine))
                        value = distributed.sum_scalar(value * len(mine) / len(batch))
                    for p in params:  # a non-finite gradient (a stiff region) must not poison the parameters
                        if p.grad is not None:
                            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
                    updating = True  # an interrupt inside the update leaves no consistent state to save
                    self.optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    if after_update is not None:
                        after_update()
                    self.history.append(value)
                    completed, updating = it + 1, False
                    if completed % self.checkpoint_every == 0 or completed == self.iterations:
                        self._checkpoint(completed)
                        saved = completed
                    shown = {self.metric: f"{value:.4g}", **result.info}
                    if self.best is not None:
                        shown["val"] = f"{self.best['val']:.4g}"
                    bar.set_postfix(**shown)
                    if not announced and completed < self.iterations and (
                            completed - self.start >= self.eta_after or time.perf_counter() - began > 60):
                        announced = True
                        self._announce_eta(completed, time.perf_counter() - began)
                    if self.log_every and completed % self.log_every == 0 and self.rank == 0:
                        print(json.dumps({"iteration": completed, self.metric: value, **result.info}), flush=True)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the finished iterations; the next run resumes
                if completed > saved and not updating:
                    self._save(completed)
                raise
        if completed > saved:  # stopped by the time limit between checkpoints
            self._checkpoint(completed)
        if self.best is not None:
            self.module.load_state_dict(self.best["state"])

    def _announce_eta(self, completed: int, seconds: float) -> None:
        """Log the time per iteration of the iterations run so far and the expected time of the rest."""
        done, left = completed - self.start, self.iterations - completed
        per = seconds / done
        eta = time.strftime("%H:%M", time.localtime(time.time() + per * left))
        self.log(f"{self.desc}: {per:.3g} s per iteration over the first {done}; about "
                 f"{format_seconds(per * left)} for the {left} left (done near {eta})")

    def _checkpoint(self, iteration: int) -> None:
        """Validate (keeping the best state) and save."""
        if self.validate is not None:
            val = self.validate()
            self.val_curve.append((iteration, val))
            if val < self.best["val"]:
                self.best = {"val": val, "state": self._snapshot(), "iteration": iteration}
        self._save(iteration)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def _save(self, iteration: int) -> None:
        if self.state_path is None or self.rank != 0:
            return
        state = {**self.identity, self.name: self.module.state_dict(),
                 **{k: v.detach() for k, v in self.extra.items()}, "optimizer": self.optimizer.state_dict(),
                 "iteration": iteration, "history": self.history}
        if self.validate is not None:
            state.update(val_curve=self.val_curve, best=self.best, initial_val=self.initial_val)
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp))

    def _load(self, path: Path) -> None:
        """Restore a saved state; it must carry this run's identity, else TrainingStateError names what differs."""
        try:
            state = torch.load(path, weights_only=False)
        except Exception as e:  # truncated, foreign or unpicklable: torch raises many types
            raise TrainingStateError(f"{path} is corrupt or not a training state ({type(e).__name__}: {e}); delete "
                                     "it to start afresh") from e
        if not isinstance(state, dict):
            raise TrainingStateError(f"{path} is not a training state; delete it to start afresh")
        differ = [k for k in self.identity if state.get(k) != self.identity[k]]
        if differ:
            mine = self.identity
            detail = [f"{k}.{s}" for k in differ if isinstance(mine[k], dict) and isinstance(state.get(k), dict)
                      for s in sorted(set(mine[k]) | set(state[k])) if mine[k].get(s) != state[k].get(s)]
            raise TrainingStateError(f"{path} belongs to another training run (different "
                                     f"{', '.join(detail or differ)}); use another --out, or delete it to start "
                                     "afresh")
        try:
            self.module.load_state_dict(state[self.name])
            for key, tensor in self.extra.items():
                tensor.data.copy_(state[key])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start, self.history = int(state["iteration"]), list(state["history"])
            if self.validate is not None:
                self.val_curve, self.best = list(state["val_curve"]), state["best"]
                self.initial_val = state["initial_val"]
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise TrainingStateError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to start afresh") from e

