"""Derive `--solver auto`'s classic rule: the safest classic configuration per frame and NFE.

On every built-in model (and condition set of `fewstep.shipped.CARD_SETS`) this runs the best-classic sweep
(every classic solver × the frame's schedules × AFS off/on, on the test seeds against the reference) at NFE 3–8,
divides each configuration's RMSE by the best one of that model and NFE, and keeps per frame and NFE the
configuration whose worst ratio over the models is lowest (minimax: the one that is never far from the best).
Writes `benchmarks/results/auto_rule.json` / `.md`; `fewstep.auto.CLASSIC_RULE` must equal its rule
(tests/test_auto.py checks).

    python benchmarks/auto_rule.py
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from fewstep.conditioning import conditioned_model
from fewstep.evaluation.bench import markdown_table, run_best_classic
from fewstep.io import write_json, write_text
from fewstep.models import load_model
from fewstep.seeds import EVALUATION
from fewstep.shipped import CARD_SETS, set_model

NFES = [3, 4, 5, 6, 7, 8]
OUT = Path(__file__).parent / "results"


def spec_of(record: dict) -> str:
    """The method spec of a sweep row: 'deis' on 'time_uniform(rho=2)' with AFS → 'deis@time_uniform:2+afs'."""
    schedule = re.sub(r"\(rho=([^)]*)\)", r":\1", record["schedule"])
    return f"{record['solver']}@{schedule}" + ("+afs" if record["afs"] else "")


def sweep(name: str) -> list[dict]:
    """The best-classic sweep of one card set's model and conditions on its test seeds."""
    model, spec = set_model(name)
    n = 512 if model.exact else 64
    return run_best_classic(conditioned_model(model, spec, list(EVALUATION.seeds(n))), NFES, n, progress=False)


def main() -> None:
    by_frame: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for name, card_set in CARD_SETS.items():
        frame = load_model(card_set.model).frame.name
        by_frame[frame][name] = sweep(name)
        print(f"swept {name}", flush=True)
    rule: dict[str, dict[str, dict]] = {}
    lines = []
    for frame, sets in by_frame.items():
        rule[frame] = {}
        for nfe in NFES:
            ratios: dict[str, dict[str, float]] = defaultdict(dict)
            for name, records in sets.items():
                rows = [r for r in records if r["nfe"] == nfe]
                best = min(r["rmse"] for r in rows)
                for r in rows:
                    ratios[spec_of(r)][name] = r["rmse"] / best
            complete = {s: v for s, v in ratios.items() if len(v) == len(sets)}  # reaches this NFE everywhere
            spec = min(complete, key=lambda s: (max(complete[s].values()), s))
            rule[frame][str(nfe)] = {"spec": spec, "worst_ratio": max(complete[spec].values()),
                                     "ratios": complete[spec]}
            lines.append([frame, str(nfe), spec, f"{max(complete[spec].values()):.2f}",
                          ", ".join(f"{k} {v:.2f}" for k, v in complete[spec].items())])
    keep = ("solver", "nfe", "schedule", "afs", "rmse")
    write_json(OUT / "auto_rule.json", {"nfes": NFES, "rule": rule, "sweeps": {
        f: {name: [{k: r[k] for k in keep} for r in records] for name, records in sets.items()}
        for f, sets in by_frame.items()}})
    write_text(OUT / "auto_rule.md", "# `--solver auto`'s classic rule (python benchmarks/auto_rule.py)\n\n"
               "Per frame and NFE, the classic configuration whose worst RMSE ratio to the best configuration of "
               "each built-in model (and condition set) is lowest.\n\n"
               + markdown_table(["frame", "NFE", "rule", "worst ratio", "ratio per model"], lines))
    print(json.dumps({f: {k: v["spec"] for k, v in r.items()} for f, r in rule.items()}, indent=1))


if __name__ == "__main__":
    main()
