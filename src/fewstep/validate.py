"""Argument types for the command line: numbers that are checked where they are parsed.

Each factory returns an `argparse` type function; a bad value raises `argparse.ArgumentTypeError`, which the
parser turns into one line naming the option (`argument --n: must be an integer >= 1, got '0'`) and exit code 2.
They are plain functions of a string, so library code can reuse them (they raise ArgumentTypeError, a ValueError).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

from .errors import FewstepError

MAX_THREADS = 1024  # torch crashes (segfault) on absurd thread counts; no machine has more cores than this


def int_in(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bound = (f"in {low}…{high}" if low is not None and high is not None
                     else f">= {low}" if low is not None else f"<= {high}")
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    return parse


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (`low_open`/`high_open`: exclude that end); NaN and ±inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (low is not None and (value < low or (low_open and value == low))) or \
                (high is not None and (value > high or (high_open and value == high))):
            lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
            raise argparse.ArgumentTypeError(f"must be in {lo or '(-inf'}, {hi or 'inf)'}, got {text!r}")
        return value

    return parse


positive_int = int_in(1)
nonnegative_int = int_in(0)
seed_int = int_in(0, 2**63 - 1)
positive_float = float_in(0.0, low_open=True)
threads_int = int_in(1, MAX_THREADS)


def int_list(text: str) -> list[int]:
    """'3,5,7' → [3, 5, 7]: a non-empty comma-separated list of integers >= 1 (NFE budgets)."""
    values = [positive_int(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def env_threads(name: str = "FEWSTEP_THREADS") -> int | None:
    """The thread count in the environment variable `name` (None when unset or empty); raises an error
    naming the variable when it is not an integer in 1…MAX_THREADS (0 means unset too): FewstepError."""
    text = os.environ.get(name, "").strip()
    if not text or text == "0":
        return None
    try:
        return threads_int(text)
    except argparse.ArgumentTypeError as e:
        raise FewstepError(f"${name}: {e}") from None
