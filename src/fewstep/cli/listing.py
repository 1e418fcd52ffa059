"""`fewstep solvers` and `fewstep models`: what there is to run, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..models import BUILTIN_MODELS, load_model
from ..solvers import SOLVERS
from .common import print_table


def _show(args: argparse.Namespace, keys: Sequence[str], header: Sequence[str], rows: list[list[str]]) -> int:
    """--json: one object per row under `keys`; otherwise a table under `header`."""
    if args.json:
        print(json.dumps([dict(zip(keys, r)) for r in rows]))
    else:
        print_table(header, rows)
    return 0


def cmd_solvers(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in SOLVERS.items():
        opts = ", ".join(f"{k}={o.default}" for k, o in cls.options.items()) or "–"
        sched, rho = cls.recommended_schedule
        rows.append([name, cls.summary, str(cls.evals_per_step), opts, sched + (f" ρ={rho:g}" if rho else "")])
    return _show(args, ["name", "summary", "nfe_per_step", "options", "schedule"],
                 ["solver", "what", "NFE/step", "options (defaults)", "recommended schedule"], rows)


def cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name in BUILTIN_MODELS:
        m = load_model(name)
        rows.append([name, "×".join(map(str, m.shape)), m.frame.name, f"{m.sigma_min:g}–{m.sigma_max:g}",
                     "yes" if m.bottleneck is not None else "no", m.description])
    return _show(args, ["name", "shape", "frame", "sigma_range", "bottleneck", "description"],
                 ["model", "shape", "frame", "σ range (flow: t)", "bottleneck", "description"], rows)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `solvers` and `models`."""
    p = sub.add_parser("solvers", help="list the solvers, their options and recommended schedules")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_solvers)

    p = sub.add_parser("models", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)
