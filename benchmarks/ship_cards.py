"""Fit the shipped solver cards (`fewstep cards`) and re-measure their table.

For every card set (a built-in model and a condition distribution) and NFE 3–8 this runs `fewstep tune` with one
card family, a fixed number of iterations (no time budget: the result does not depend on the machine's speed)
and the project's recipe, then copies each NFE's best card into the package (`src/fewstep/data/cards/SET/nfeN/`)
and writes `SET/table.json`: train / validation / test RMSE of the card beside the best classic configuration
(solvers × schedules × AFS) on the same test seeds, and each test seed's own error (`test_errors`, whose mean is
the test RMSE: tests/test_shipped.py recomputes some of them). Work folders under `runs/ship/` make it
resumable.

    python benchmarks/ship_cards.py                    # every set, in order
    python benchmarks/ship_cards.py --sets digits,gmm  # some
    python benchmarks/ship_cards.py --classic-from benchmarks/results/auto_rule.json
                                                       # re-read the best classic (new solvers or schedules)

The best classic of a table is `tune`'s sweep on the test seeds, the same sweep as benchmarks/auto_rule.py's:
`--classic-from` takes it from that file's sweeps instead of refitting (after a classic solver or schedule was
added to the sweep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from fewstep.conditioning import bind, conditioned_model, conditions_for_seeds
from fewstep.io import write_json
from fewstep.learned.card import load_card
from fewstep.methods import SolverSpec, resolve_method
from fewstep.noise import seeded_noise
from fewstep.reference import reference_solution
from fewstep.seeds import EVALUATION
from fewstep.solvers import sample
from fewstep.shipped import CARD_SETS, SHIPPED_DIR, set_model
from fewstep.tune import FAMILIES, OPTIONAL_FAMILIES, Family, classic_label, default_config, tune

NFES = [3, 4, 5, 6, 7, 8]
FAMILY = {f.base: f for f in (*FAMILIES, *OPTIONAL_FAMILIES)}


def test_errors(name: str, folder: Path, nfe: int) -> list[float]:
    """Each test seed's RMSE (the benchmark's per-sample error) of the card in `folder` against the reference."""
    model, spec = set_model(name)
    seeds = list(EVALUATION.seeds(512 if model.exact else 64))
    model = conditioned_model(model, spec, seeds)
    ref = reference_solution(model, seeds)
    method = resolve_method(SolverSpec("learned", path=str(folder)), model, nfe=nfe)
    with torch.no_grad():
        x = sample(model.denoiser, seeded_noise(seeds, model.shape, model.state_dtype), method.solver, method.grid,
                   afs=method.afs)
    return (x.double() - ref.double()).reshape(len(seeds), -1).pow(2).mean(1).sqrt().tolist()


def add_test_errors(name: str, dest: Path) -> None:
    """Fill in `test_errors` of every row of a shipped set's table."""
    table = json.loads((dest / name / "table.json").read_text())
    for row in table["rows"]:
        row["test_errors"] = test_errors(name, dest / name / f"nfe{row['nfe']}", row["nfe"])
        mean = sum(row["test_errors"]) / len(row["test_errors"])
        assert abs(mean - row["learned_rmse"]) <= 1e-6 * row["learned_rmse"], (name, row["nfe"], mean)
    write_json(dest / name / "table.json", table)


def ship(name: str, work: Path, dest: Path, nfes: list[int] = NFES) -> None:
    """Tune one card set at `nfes` and copy its best cards into `dest`, their rows into its table (rows of other
    NFEs already there are kept: a set can be fitted by several processes, one per group of NFEs)."""
    card_set = CARD_SETS[name]
    model, spec = set_model(name)
    conditions = bind_fn = None
    if spec.conditional:
        conditions = spec.to_json()
        bind_fn = lambda seeds: bind(model, conditions_for_seeds(spec, seeds), spec.guidance, spec.classifier_scale)
    cfg = default_config(model, pairs=card_set.pairs, iters=card_set.iters)
    cfg = replace(cfg, batch=card_set.batch or cfg.batch, lr=card_set.lr or cfg.lr)
    began = time.perf_counter()
    families = tuple(Family(base, card_set.params or FAMILY[base].params) for base in card_set.bases)
    rows = tune(model, nfes, work / name, budget_s=1e9, conditions=conditions, bind=bind_fn, families=families,
                base_config=cfg, progress=False)
    for row in rows:
        src = work / name / f"nfe{row['nfe']}" / "best" / "card.json"
        load_card(src, model)  # validates before it is shipped
        target = dest / name / f"nfe{row['nfe']}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target / "card.json")
    table = dest / name / "table.json"
    kept = [r for r in json.loads(table.read_text())["rows"] if r["nfe"] not in nfes] if table.exists() else []
    write_json(table, {
        "set": name, "model": card_set.model, "conditions": conditions, "family": ",".join(card_set.bases),
        "params": list(families[0].params), "command": f"python benchmarks/ship_cards.py --sets {name}",
        "seconds": time.perf_counter() - began, "rows": sorted(kept + rows, key=lambda r: r["nfe"])})
    add_test_errors(name, dest)
    print(f"{name}: " + ", ".join(f"NFE {r['nfe']} {r['learned_rmse']:.4f} ({r['ratio']:.2f}x)" for r in rows),
          flush=True)


def refresh_classic(name: str, dest: Path, sweeps: dict) -> None:
    """Set the best classic configuration of each row of a shipped set's table from benchmarks/auto_rule.py's
    sweep of that set (the same test seeds and reference), and the card's ratio to it."""
    records = sweeps[set_model(name)[0].frame.name][name]
    path = dest / name / "table.json"
    table = json.loads(path.read_text())
    for row in table["rows"]:
        best = min((r for r in records if r["nfe"] == row["nfe"]), key=lambda r: r["rmse"])
        row["best_classic"] = classic_label(best)
        row["best_classic_rmse"] = best["rmse"]
        row["ratio"] = row["learned_rmse"] / best["rmse"]
    write_json(path, table)
    print(f"{name}: " + ", ".join(f"NFE {r['nfe']} best classic {r['best_classic']} {r['best_classic_rmse']:.4f}, "
                                  f"card {r['ratio']:.2f}x" for r in table["rows"]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(CARD_SETS), help="comma-separated card sets (default: all)")
    p.add_argument("--work", default="runs/ship", help="work folder (resumable)")
    p.add_argument("--dest", default=str(SHIPPED_DIR), help="where the cards are shipped")
    p.add_argument("--redo", action="store_true", help="refit sets that are already shipped")
    p.add_argument("--nfe", default=",".join(map(str, NFES)), help="comma-separated NFEs (default 3-8)")
    p.add_argument("--classic-from", metavar="JSON", help="only re-read each table's best classic from this "
                   "benchmarks/auto_rule.py result (its sweeps)")
    args = p.parse_args()
    for name in args.sets.split(","):
        if name not in CARD_SETS:
            p.error(f"--sets: unknown set {name!r}; choose from {', '.join(CARD_SETS)}")
    if args.classic_from:
        sweeps = json.loads(Path(args.classic_from).read_text())["sweeps"]
        for name in args.sets.split(","):
            refresh_classic(name, Path(args.dest), sweeps)
        return
    for name in args.sets.split(","):
        table = Path(args.dest) / name / "table.json"
        if table.exists() and not args.redo:
            if "test_errors" not in json.loads(table.read_text())["rows"][0]:
                add_test_errors(name, Path(args.dest))
            print(f"{name}: shipped already (--redo refits)", flush=True)
            continue
        ship(name, Path(args.work), Path(args.dest), [int(n) for n in args.nfe.split(",")])


if __name__ == "__main__":
    main()
