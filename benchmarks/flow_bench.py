"""Flow models: learned cards vs the best classic solver and vs diffusers' default FlowMatchEuler (shift 3).

    python benchmarks/flow_bench.py --models gmm-flow,digits-flow --nfe 3,4,5
    python benchmarks/flow_bench.py --shipped --nfe 3,4,5,6,7,8    # the shipped cards (`fewstep cards`)

Per model: `fewstep tune` (cards of every family fitted on training seeds, chosen on validation seeds, measured
on test seeds 0–511, 0–63 for the network, beside the best classic over solvers × flow schedules × AFS), then
`fewstep bench` of diffusers' default FlowMatchEuler grid with shift 3 (`euler@flow:shift=3,diffusers`: what an
SD3 pipeline does at that step count) on the same test seeds and conditions. Every run starts at t = 1 and ends
with the step to t = 0; every model call counts. The reference is a 1 000-point (analytic) / 500-point (network)
Heun solve in t from t = 1. Writes benchmarks/results/flow_<model>.md/.json; cards go to runs/flow_bench/<model>.
With --shipped the cards are the shipped ones (their table, fitted by benchmarks/ship_cards.py) instead of tune's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fewstep.cli import main as fewstep
from fewstep.io import write_json, write_text
from fewstep.models import load_model
from fewstep.shipped import SHIPPED_DIR

RESULTS = Path(__file__).parent / "results"
FLOW_MATCH_EULER = "euler@flow:shift=3,diffusers"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gmm-flow,digits-flow", help="comma-separated built-in flow models")
    p.add_argument("--nfe", default="3,4,5", help="comma-separated NFEs")
    p.add_argument("--budget", type=float, default=None,
                   help="training seconds per model and NFE (default 150 analytic, 600 network)")
    p.add_argument("--families", default=None, help="tune --families (default: all)")
    p.add_argument("--iters", default=None, help="tune --iters (default: tune's)")
    p.add_argument("--out", default="runs/flow_bench", help="where the cards go")
    p.add_argument("--shipped", action="store_true", help="the shipped cards instead of fitting with tune")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        model = load_model(name)
        n = 512 if model.exact else 64
        budget = args.budget or (150.0 if model.exact else 600.0)
        out = Path(args.out) / name
        extra = [*(["--families", args.families] if args.families else []),
                 *(["--iters", args.iters] if args.iters else [])]
        if args.shipped:
            nfes = {int(k) for k in args.nfe.split(",")}
            table = json.loads((SHIPPED_DIR / name / "table.json").read_text())
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "table.json", [{k: v for k, v in r.items() if k != "test_errors"}
                                            for r in table["rows"] if r["nfe"] in nfes])
        elif fewstep(["tune", "--model", name, "--nfe", args.nfe, "--out", str(out), "--budget", str(budget),
                      "--no-progress", *extra]):
            return 1
        fme_json = out / "flow_match_euler.json"
        if fewstep(["bench", "--model", name, "--nfe", args.nfe, "--solvers", FLOW_MATCH_EULER, "--n", str(n),
                    "--json", str(fme_json), "--no-progress"]):
            return 1
        tuned = json.loads((out / "table.json").read_text())
        fme = {r["nfe"]: r["rmse"] for r in json.loads(fme_json.read_text())}
        rows = [{**row, "flow_match_euler_rmse": fme[row["nfe"]],
                 "ratio_vs_flow_match_euler": row["learned_rmse"] / fme[row["nfe"]]} for row in tuned]
        write_json(RESULTS / f"flow_{name}.json", rows)
        lines = [f"# Flow model `{name}`: learned card vs best classic vs diffusers' FlowMatchEuler (shift 3)",
                 "", f"Test seeds 0–{n - 1}; RMSE to the reference; every run from t = 1, all model calls counted.",
                 "", "| NFE | card (train / val / test) | best classic | ratio | FlowMatchEuler shift 3 | ratio |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['nfe']} | {r['learned']} {r['train_rmse']:.4f} / {r['val_rmse']:.4f} / "
                         f"**{r['learned_rmse']:.4f}** | {r['best_classic']} {r['best_classic_rmse']:.4f} | "
                         f"**{r['ratio']:.2f}** | {r['flow_match_euler_rmse']:.4f} | "
                         f"**{r['ratio_vs_flow_match_euler']:.2f}** |")
        write_text(RESULTS / f"flow_{name}.md", "\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
