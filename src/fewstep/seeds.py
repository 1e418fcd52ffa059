"""Noise seeds by purpose: disjoint named ranges, defined once.

A sample's noise is a function of its seed alone (`fewstep.noise.seeded_noise`), so a seed that trains or selects
something must never be a seed that a benchmark measures on. Every purpose owns one range here. A training command's
`--seed` is a *run seed* r: `SeedRange.seeds(count, r)` gives that run's `count` seeds, and refuses any run seed or
count that would leave the range, so no accepted value reaches another purpose's seeds.

Layout: the seed space is cut into periods of PERIOD = 10 000 000 seeds and each range owns one window of the
periods (a fixed set, without run seeds, only the window of period 0); run r of a range with k blocks per window
takes block r mod k of period r div k:

    window (offset in a period)   range           run seeds r     the seeds of run r (i < the range's block)
    0 … 999 999                   evaluation      —               i                   (bench, tune's test, sample)
    1 000 000 … 1 999 999         amed-training   0 … 999 999     1 000 000 + r·10 000 000 + i   (i < 1 000 000)
    2 000 000 … 2 999 999         gits-warmup     —               2 000 000 + i
    3 000 000 … 3 999 999         card-training   0 … 9           3 000 000 + r·100 000 + i      (i < 100 000)
    4 000 000 … 4 999 999         validation      —               4 000 000 + i       (card validation pairs)
    5 000 000 … 9 999 999         (free)

The windows do not overlap and every run's block lies inside its range's window, so two ranges never share a seed
and two runs of one range never share a seed. These are the numbers fewstep has always used for the run seeds it
accepted: earlier results reproduce.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import FewstepError

PERIOD = 10_000_000


class SeedError(FewstepError, ValueError):
    """A run seed or a number of seeds that would take a run outside its range of seeds."""


@dataclass(frozen=True)
class SeedRange:
    """One purpose's seeds: a window [offset, offset + block·per_period) of every period, one block per run.

    `runs` is the number of accepted run seeds (1: a fixed set, the window of period 0); `per_period` is the
    number of runs whose blocks share one period's window."""

    name: str
    purpose: str
    offset: int
    block: int
    per_period: int = 1
    runs: int = 1

    @property
    def window(self) -> range:
        """The offsets within a period that this range owns."""
        return range(self.offset, self.offset + self.block * self.per_period)

    def first(self, run: int = 0) -> int:
        """The first seed of run `run` (checked)."""
        self.check_run(run)
        period, slot = divmod(run, self.per_period)
        return period * PERIOD + self.offset + slot * self.block

    def run_problem(self, run: object) -> str | None:
        """Why `run` is not an accepted run seed of this range (None: it is one)."""
        if not isinstance(run, bool) and isinstance(run, int) and 0 <= run < self.runs:
            return None
        if self.runs == 1:
            return f"must be 0: the {self.name} seeds are one fixed set, got {run!r}"
        return (f"must be an integer in 0…{self.runs - 1} (a run seed: each selects its own {self.name} seeds, "
                f"disjoint from evaluation and validation seeds), got {run!r}")

    def check_run(self, run: int, option: str = "--seed") -> None:
        """Refuse a run seed outside 0 … runs − 1 (naming `option`)."""
        problem = self.run_problem(run)
        if problem:
            raise SeedError(f"{option} {problem}")

    def seeds(self, count: int, run: int = 0, option: str = "the number of seeds") -> range:
        """The first `count` seeds of run `run`; refuses a count beyond the run's block (naming `option`)."""
        first = self.first(run)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= self.block:
            bound = f"at most {self.block}" if isinstance(count, int) and count > 0 else f"in 0…{self.block}"
            owner = f"the {self.name} seeds" + (" of this run" if self.runs > 1 else "")
            raise SeedError(f"{option} must be {bound}: {owner} are {first}…{first + self.block - 1} "
                            f"({self.purpose}), got {count!r}")
        return range(first, first + count)

    def check_span(self, first: int, count: int, option: str = "the seeds") -> range:
        """Seeds first … first + count − 1 of a fixed set (evaluation, gits-warmup, validation), refused unless
        they all lie in it (naming `option`)."""
        start = self.first(0)
        if count < 1 or not start <= first <= first + count <= start + self.block:
            raise SeedError(f"{option} {first}…{first + count - 1} leave the {self.name} seeds "
                            f"{start}…{start + self.block - 1} ({self.purpose})")
        return range(first, first + count)

    def record(self, count: int, run: int | None = None) -> dict[str, Any]:
        """What a card or checkpoint records of the seeds it used: range name, (run seed,) first seed, count."""
        first = self.seeds(count, run or 0).start
        return {"range": self.name, **({} if run is None else {"run": run}), "first": first, "count": count}


EVALUATION = SeedRange("evaluation", "benchmarks, tune's test seeds, sampling", 0, 1_000_000)
AMED_TRAINING = SeedRange("amed-training", "AMED predictor training noise and teacher pools", 1_000_000, 1_000_000,
                          runs=1_000_000)
GITS_WARMUP = SeedRange("gits-warmup", "GITS warm-up trajectories", 2_000_000, 1_000_000)
CARD_TRAINING = SeedRange("card-training", "learned-card teacher pairs", 3_000_000, 100_000, per_period=10,
                          runs=10)
VALIDATION = SeedRange("validation", "learned-card validation pairs", 4_000_000, 1_000_000)
RANGES = {r.name: r for r in (EVALUATION, AMED_TRAINING, GITS_WARMUP, CARD_TRAINING, VALIDATION)}


def owner(seed: int) -> str | None:
    """The name of the range that `seed` belongs to (None: a seed no range owns)."""
    if seed < 0:
        return None
    period, offset = divmod(seed, PERIOD)
    for r in RANGES.values():
        if offset in r.window and period * r.per_period + (offset - r.offset) // r.block < r.runs:
            return r.name
    return None


def run_seed_type(seeds: SeedRange) -> Callable[[str], int]:
    """The argparse type of a training command's --seed: a run seed of `seeds` (0 … runs − 1)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        problem = seeds.run_problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse
