"""Know the cost before paying it: the model calls a `learn`, `tune` or `train` run plans to make.

Each line counts network calls (one call = one batch row through the network): forward calls without gradients
(teacher solves, validation), forward calls whose activations feed a backward pass, the backward passes (about two
forward calls of work each) and, with activation checkpointing, the forward calls recomputed in the backward pass.
`--dry-run` prints the plan and exits; a real run prints it first, then an ETA once its first iterations are timed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Cost:
    """One line of a plan: `forward` calls (of which `backward` also run backward), `recompute` extra forward
    calls of activation checkpointing; `formula` says how the numbers arise."""

    what: str
    forward: int
    backward: int = 0
    recompute: int = 0
    formula: str = ""

    @property
    def work(self) -> int:
        """Forward-call equivalents (a backward pass ≈ 2 forward calls)."""
        return self.forward + 2 * self.backward + self.recompute


@dataclass
class CostPlan:
    """The planned model calls of a run, printed before it starts."""

    title: str
    lines: list[Cost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, forward: int, backward: int = 0, recompute: int = 0, formula: str = "") -> None:
        self.lines.append(Cost(what, forward, backward, recompute, formula))

    @property
    def work(self) -> int:
        return sum(c.work for c in self.lines)

    def text(self) -> str:
        width = max((len(c.what) for c in self.lines), default=0)
        out = [f"plan: {self.title}"]
        for c in self.lines:
            calls = f"{c.forward:,} forward"
            if c.backward:
                calls += f" + {c.backward:,} backward"
            if c.recompute:
                calls += f" + {c.recompute:,} recomputed"
            out.append(f"  {c.what:<{width}}  {calls}" + (f"  ({c.formula})" if c.formula else ""))
        forward = sum(c.forward + c.recompute for c in self.lines)
        backward = sum(c.backward for c in self.lines)
        out.append(f"  {'total':<{width}}  {forward:,} forward + {backward:,} backward model calls "
                   f"(≈ {self.work:,} forward calls of work, a backward ≈ 2)")
        out += [f"  {note}" for note in self.notes]
        return "\n".join(out)


def training_cost(plan: CostPlan, what: str, iterations: int, batch: int, calls: int, checkpoint: bool,
                  unit: str = "calls", runs: int = 1) -> None:
    """The optimisation line of `runs` fits: every call of every rollout runs forward and backward (and once more
    forward with activation checkpointing)."""
    n = runs * iterations * batch * calls
    plan.add(what, n, n, n if checkpoint else 0,
             (f"{runs} fits × " if runs > 1 else "") + f"{iterations:,} iterations × batch {batch} × {calls} {unit}"
             + (" × forward/backward/recompute" if checkpoint else " × forward/backward"))


def format_seconds(seconds: float) -> str:
    """'42 s', '3.5 min', '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
