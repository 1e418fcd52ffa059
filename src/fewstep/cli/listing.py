"""`fewstep solvers`, `fewstep models` and `fewstep cards`: what there is to run, as a table or as JSON."""

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


def cmd_cards(args: argparse.Namespace) -> int:
    from ..shipped import CARD_SETS, shipped_cards

    rows = []
    for c in shipped_cards(args.model):
        r = c.row or {}
        guidance = CARD_SETS[c.set].guidance
        rows.append([c.set, CARD_SETS[c.set].model, "–" if not c.conditions else f"classes, w={guidance:g}",
                     str(c.nfe), r.get("learned", "?"), *(f"{r[k]:.4f}" if k in r else "?" for k in
                                                          ("train_rmse", "val_rmse", "learned_rmse")),
                     r.get("best_classic", "?"), f"{r['best_classic_rmse']:.4f}" if r else "?",
                     f"{r['ratio']:.2f}" if r else "?", str(c.path)])
    keys = ["set", "model", "conditions", "nfe", "card", "train_rmse", "val_rmse", "test_rmse", "best_classic",
            "best_classic_rmse", "ratio", "path"]
    if args.json:
        return _show(args, keys, keys, rows)
    print_table(["set", "model", "conditions", "NFE", "card", "train", "val", "test", "best classic", "RMSE",
                 "ratio"], [r[:-1] for r in rows], "shipped solver cards (learned:FOLDER with `--json`'s path)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `solvers`, `models` and `cards`."""
    p = sub.add_parser("solvers", help="list the solvers, their options and recommended schedules")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_solvers)

    p = sub.add_parser("models", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("cards", help="list the shipped solver cards (what --solver auto uses) with their test RMSE "
                                     "beside the best classic configuration",
                       description="The solver cards shipped with fewstep (benchmarks/ship_cards.py fits them): per "
                                   "built-in model and conditions, NFE 3-8, the card's train / validation / test RMSE "
                                   "(test: evaluation seeds 0-511 analytic, 0-63 network, against the reference "
                                   "solve) beside the best classic solver × schedule × AFS on the same seeds.")
    p.add_argument("--model", default=None, choices=list(BUILTIN_MODELS), help="only the cards of this built-in model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_cards)
