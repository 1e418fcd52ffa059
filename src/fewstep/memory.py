"""Memory-bounded training of cards and AMED predictors (README, "Memory-bounded training").

A card's or predictor's gradient flows through every model call of a rollout, so autograd keeps the network's
activations of NFE calls × batch samples until the backward pass. Two settings bound that, without changing what is
fitted beyond float round-off:

* `micro_batch` m: every iteration's batch (this rank's share of it) runs as consecutive micro-batches of at most m
  samples whose gradients accumulate (each micro-batch's loss weighted by its share of the batch), so the harness
  updates once per batch as before; teacher solves and validations run in chunks of m too;
* `checkpoint`: every model call of a rollout runs under `torch.utils.checkpoint` (`Checkpointed`): its activations
  are dropped after the forward pass and recomputed in the backward pass (one more forward call per model call).

With both, peak memory is about one forward + backward of the network at m samples plus the solver states of the
rollout, independent of NFE and batch. The network's own parameters are frozen for the duration of a fit (`frozen`):
no gradient buffers for the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .errors import FewstepError
from .frames import Frame, frame_of

EVAL_CHUNK = 256  # samples per no-gradient model call (teacher solves, validation) without a micro-batch


@dataclass(frozen=True)
class MemoryPlan:
    """`micro_batch`: samples per forward/backward pass (0: the whole batch); `checkpoint`: recompute every model
    call's activations in the backward pass instead of keeping them."""

    micro_batch: int = 0
    checkpoint: bool = False

    def validate(self, batch: int, command: str) -> None:
        """Refuse a micro-batch that is not an integer in 1…batch (0 = off)."""
        m = self.micro_batch
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise FewstepError(f"{command}: --micro-batch must be a positive integer, got {m!r}")
        if m > batch:
            raise FewstepError(f"{command}: --micro-batch {m} is larger than the batch ({batch}); give at most "
                               f"{batch}")

    def split(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """`indices` as consecutive micro-batches (one piece without a micro-batch)."""
        if not self.micro_batch or len(indices) <= self.micro_batch:
            return [indices]
        return list(torch.split(indices, self.micro_batch))

    @property
    def eval_chunk(self) -> int:
        """Samples per model call where no gradient is kept (teacher solves, validation)."""
        return min(self.micro_batch, EVAL_CHUNK) if self.micro_batch else EVAL_CHUNK

    def describe(self) -> str:
        parts = [f"micro-batch {self.micro_batch}" if self.micro_batch else "whole batch",
                 "activation checkpointing" if self.checkpoint else "activations kept"]
        return ", ".join(parts)


class Checkpointed:
    """A denoiser whose calls under autograd keep no activations: `torch.utils.checkpoint` (non-reentrant) runs
    it without saving them and runs it again in the backward pass. Calls without gradients go straight through."""

    def __init__(self, denoiser: Any):
        self.denoiser = denoiser

    @property
    def frame(self) -> Frame:
        return frame_of(self.denoiser)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.denoiser(x, sigma)
        return checkpoint(self.denoiser, x, sigma, use_reentrant=False)


def checkpointed(denoiser: Any, enabled: bool) -> Any:
    """`Checkpointed(denoiser)` when `enabled`, else the denoiser itself."""
    return Checkpointed(denoiser) if enabled else denoiser


def networks(model: Any, depth: int = 3) -> list[torch.nn.Module]:
    """The torch modules behind a model (its denoiser, conditional denoiser, classifier, bottleneck), found through
    bound methods and wrapper attributes up to `depth` levels deep; outermost first, each once."""
    found: dict[int, torch.nn.Module] = {}

    def visit(obj: Any, level: int) -> None:
        if obj is None or level > depth:
            return
        if isinstance(obj, torch.nn.Module):
            found.setdefault(id(obj), obj)
            return
        if hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # a bound method: its instance
            visit(obj.__self__, level + 1)
            return
        for value in list(getattr(obj, "__dict__", {}).values()):
            if not isinstance(value, (str, bytes, int, float, torch.Tensor, type)):
                visit(value, level + 1)

    for name in ("denoiser", "cond_denoiser", "noisy_classifier", "bottleneck"):
        visit(getattr(model, name, None), 0)
    return list(found.values())


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """The model's network parameters with requires_grad off for the duration (restored afterwards): a fit's
    gradients flow through the network to the card or predictor, never into the weights."""
    saved = [(p, p.requires_grad) for net in networks(model) for p in net.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def network_dtype(model: Any, fallback: torch.dtype = torch.float32) -> str:
    """The dtype of the model's network weights ('float16', …); models without weights: `fallback`'s name."""
    for net in networks(model):
        for p in net.parameters():
            if p.is_floating_point():
                return str(p.dtype).removeprefix("torch.")
    return str(fallback).removeprefix("torch.")
