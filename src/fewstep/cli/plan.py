"""What `learn`, `tune` and `train` share: the memory options (--micro-batch, --activation-checkpointing), the plan of
model calls printed before a run, and --dry-run (fewstep.memory, fewstep.costs)."""

from __future__ import annotations

import argparse

from rich.markup import escape

from .. import distributed
from ..costs import CostPlan
from ..memory import MemoryPlan
from ..validate import positive_int
from .common import console


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """--micro-batch, --activation-checkpointing and --dry-run."""
    p.add_argument("--micro-batch", type=positive_int, default=None, metavar="M",
                   help="run each batch as micro-batches of at most M samples with accumulated gradients (teacher "
                        "and validation in chunks of M too); the result is the same up to float round-off "
                        "(default: the whole batch)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep no activations of the model calls of a rollout: recompute each in the backward "
                        "pass (one more forward call per call); with --micro-batch, peak memory is about one "
                        "forward + backward of the network at M samples, whatever the NFE and batch")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned model calls and exit, computing and writing nothing")


def memory_from_args(args: argparse.Namespace) -> MemoryPlan:
    return MemoryPlan(args.micro_batch or 0, args.activation_checkpointing)


def log(text: str) -> None:
    """A line of progress on stdout (rank 0 only under torchrun)."""
    if distributed.world()[0] == 0:
        console.print(escape(text), highlight=False)


def show_plan(plan: CostPlan) -> None:
    """Print the plan (rank 0 only)."""
    log(plan.text())
