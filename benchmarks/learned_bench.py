"""Learned solver cards vs the best classic solver (solvers × schedules × AFS) per model and NFE.

    python benchmarks/learned_bench.py --models gmm,digits-opt,digits --nfe 3,4,5

runs `fewstep tune` per model (training pairs from seed 3 000 000, validation from 4 000 000, test seeds 0–511,
0–63 for the `digits` network), and writes benchmarks/results/learned_<model>.md/.json with the train,
validation and test RMSE of the chosen card, the best classic solver and the ratio. The cards are kept under
runs/learned_bench/<model>/nfe<N>/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fewstep.io import write_json, write_text
from fewstep.models import load_model
from fewstep.tune import tune

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gmm,digits-opt,digits", help="comma-separated built-in models")
    p.add_argument("--nfe", default="3,4,5", help="comma-separated NFEs")
    p.add_argument("--budget", type=float, default=None,
                   help="training seconds per model and NFE (default 150 analytic, 600 network)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="runs/learned_bench", help="where the cards go")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nfes = [int(v) for v in args.nfe.split(",")]
    for name in args.models.split(","):
        model = load_model(name)
        budget = args.budget or (150.0 if model.exact else 600.0)
        rows = tune(model, nfes, Path(args.out) / name, budget_s=budget, progress=sys.stderr.isatty())
        write_json(RESULTS / f"learned_{name}.json", rows)
        text = (Path(args.out) / name / "table.md").read_text()
        write_text(RESULTS / f"learned_{name}.md", f"# Learned cards on `{name}` (test seeds 0–"
                                                   f"{(512 if model.exact else 64) - 1})\n\n{text}")
        print(f"\n{name}\n{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
