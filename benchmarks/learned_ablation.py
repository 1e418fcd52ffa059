"""Which part of a learned card buys what: the same base trained with the parameter families added one at a time.

    python benchmarks/learned_ablation.py --model gmm --nfe 5 --base unipc

Each row is a card trained from the same init grid (`--init`) with the same settings, evaluated on test seeds
0–511 (0–63 for a network) against the benchmark reference; writes benchmarks/results/ablation_<model>_nfe<N>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fewstep.evaluation.bench import markdown_table
from fewstep.io import write_text
from fewstep.learned.train import LearnConfig, learn
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.reference import reference_solution, rmse
from fewstep.schedules import get_schedule
from fewstep.solvers import sample

RESULTS = Path(__file__).parent / "results"
STAGES = (("steps",), ("steps", "offsets"), ("steps", "offsets", "coeffs"), ("steps", "offsets", "coeffs", "weights"),
          ("steps", "offsets", "coeffs", "weights", "mean"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gmm")
    p.add_argument("--nfe", type=int, default=5)
    p.add_argument("--base", default="unipc")
    p.add_argument("--init", default="time_uniform:1", help="init schedule name:rho (default time_uniform:1)")
    p.add_argument("--iters", type=int, default=None, help="default 400 analytic, 200 network")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model)
    seeds = list(range(512 if model.exact else 64))
    ref, noise = reference_solution(model, seeds), seeded_noise(seeds, model.shape)
    name, _, rho = args.init.partition(":")
    grid = get_schedule(name, args.nfe + 2, model.sigma_min, model.sigma_max, rho=float(rho) if rho else None)
    rows = [["none (the base on the init grid)", "–", "–", f"{rmse(sample(model.denoiser, noise, args.base, grid, afs=True), ref):.4f}"]]
    for families in STAGES:
        cfg = LearnConfig(base=args.base, nfe=args.nfe, afs=True, params=families, init_schedule=args.init,
                          loss="rmse", lr=0.01, iters=args.iters or (400 if model.exact else 200))
        card = learn(model, cfg, progress=False)
        test = rmse(sample(model.denoiser, noise, card.solver()), ref)
        rows.append(["+".join(families), f"{card.training['train_rmse']:.4f}", f"{card.training['val_rmse']:.4f}",
                     f"{test:.4f}"])
        print(rows[-1], flush=True)
    text = (f"# Card ablation: {args.base} + AFS on `{args.model}`, NFE {args.nfe}, init {args.init}\n\n"
            + markdown_table(["learned families", "train", "val", "test RMSE"], rows))
    write_text(RESULTS / f"ablation_{args.model}_nfe{args.nfe}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
