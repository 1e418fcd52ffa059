"""GITS vs polynomial ρ = 7 for iPNDM (max_order 4), with and without AFS (the README's GITS vs polynomial table).

For each model: one GITS warm-up (teacher iPNDM on the 61-point polynomial grid, seeds from 2 000 000) gives the
cost matrix; the DP cuts it to every NFE (with AFS: the authors' inserted free first point). Every schedule is
evaluated on seeds 0…n−1 against the Heun reference (1000 steps; 500 for networks) (RMSE). Writes benchmarks/results/gits_<model>.{md,json}.

    python benchmarks/gits_bench.py --models gmm,digits-opt,digits --nfe 4,5,6

`--sweep` instead runs the tuning sweep behind the defaults: γ × metric × grid on *validation* seeds
3 000 000… (never the evaluation seeds), for three disjoint warm-up seed sets, printing RMSE(GITS)/RMSE(poly)
per (AFS, NFE) cell.

Timings use one intra-op thread by default (`--threads`): the tensors are small and the shared 2-core machine
makes torch's thread pool stall; GITS compute time = warm-up + cost matrix + DP (+ the AFS point search).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

import fewstep
from fewstep.errors import ModelError
from fewstep.gits import DEFAULT_GAMMA, GitsSearch
from fewstep.io import write_json, write_text
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.reference import reference_solution, rmse
from fewstep.solvers import num_steps_for_nfe

SOLVER, OPTIONS = "ipndm", {"max_order": 4}
VALIDATION_SEED = 3_000_000


def evaluate(model, noise, ref, sched, afs):
    return rmse(fewstep.sample(model.denoiser, noise, SOLVER, sched, afs=afs, **OPTIONS), ref)


def bench_model(model, nfes, n, warmup):
    seeds = list(range(n))
    ref = reference_solution(model, seeds)
    noise = seeded_noise(seeds, model.shape)
    search = GitsSearch.run(model, warmup=warmup, progress=False)
    timing = {"warmup_and_cost_s": search.seconds}
    rows = []
    for afs in (False, True):
        for nfe in nfes:
            steps = num_steps_for_nfe(SOLVER, nfe, afs=afs, **OPTIONS)
            poly = fewstep.get_schedule("polynomial", steps, model.sigma_min, model.sigma_max, rho=7.0)
            start = time.perf_counter()
            gits, path = search.schedule(steps, afs=afs, solver=SOLVER, solver_options=OPTIONS)
            dp_s = time.perf_counter() - start
            timing[f"schedule_nfe{nfe}{'_afs' if afs else ''}_s"] = dp_s
            row = {"nfe": nfe, "afs": afs, "num_steps": steps, "poly": evaluate(model, noise, ref, poly, afs),
                   "gits": evaluate(model, noise, ref, gits, afs), "gits_sigmas": [round(v, 5) for v in gits.tolist()],
                   "gits_indices": path, "gits_seconds": search.seconds + dp_s}
            rows.append(row)
            print(f"  {model.name} NFE {nfe}{' +AFS' if afs else ''}: poly {row['poly']:.4f}  GITS {row['gits']:.4f}"
                  f"  σ={row['gits_sigmas']}", flush=True)
    return rows, timing


def table(model_name, rows, timing, n, warmup):
    lines = [f"## {model_name}: iPNDM (max_order 4), RMSE to the Heun reference (1000 steps; 500 for networks), seeds 0…{n - 1}", "",
             "| NFE | AFS | polynomial ρ=7 | GITS | GITS / poly | GITS schedule σ |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nfe']} | {'yes' if r['afs'] else 'no'} | {r['poly']:.4f} | {r['gits']:.4f} | "
                     f"{r['gits'] / r['poly']:.2f} | {', '.join(f'{v:.4g}' for v in r['gits_sigmas'])} |")
    worst = max(t for k, t in timing.items() if k.startswith("schedule_"))
    lines += ["", f"GITS compute time: warm-up ({warmup} samples × iPNDM on 61 points) + cost matrix "
              f"{timing['warmup_and_cost_s']:.2f} s; DP (+ AFS point search) per schedule ≤ {worst:.2f} s; "
              f"one `fewstep gits` run ≤ {timing['warmup_and_cost_s'] + worst:.2f} s.", ""]
    return "\n".join(lines)


def sweep(model, nfes, warmup, n_val=256):
    """γ × metric × grid on validation seeds, for three warm-up seed sets; prints GITS/poly ratios."""
    seeds = list(range(VALIDATION_SEED, VALIDATION_SEED + n_val))
    ref = reference_solution(model, seeds)
    noise = seeded_noise(seeds, model.shape)
    cells = [(afs, nfe) for afs in (False, True) for nfe in nfes]
    poly = {c: evaluate(model, noise, ref, fewstep.get_schedule(
        "polynomial", num_steps_for_nfe(SOLVER, c[1], afs=c[0], **OPTIONS), model.sigma_min, model.sigma_max), c[0])
        for c in cells}
    print(f"{model.name}: cells (AFS, NFE) = {cells}; ratio RMSE(GITS)/RMSE(polynomial)")
    for grid, metric, first in itertools.product((21, 41, 61), ("l2", "l1", "dev"), (2_000_000, 2_100_000, 2_200_000)):
        search = GitsSearch.run(model, grid=grid, metric=metric, warmup=warmup, first_seed=first, progress=False)
        for gamma in (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3):
            ratios = [evaluate(model, noise, ref, search.schedule(
                num_steps_for_nfe(SOLVER, nfe, afs=afs, **OPTIONS), gamma, afs, solver=SOLVER,
                solver_options=OPTIONS)[0], afs) / poly[(afs, nfe)] for afs, nfe in cells]
            print(f"grid={grid} metric={metric} warm-up seeds {first}… γ={gamma}: worst {max(ratios):.3f}  "
                  + " ".join(f"{r:.2f}" for r in ratios), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gmm,digits-opt,digits")
    ap.add_argument("--nfe", default="4,5,6")
    ap.add_argument("--n", type=int, default=512, help="evaluation seeds 0…n-1")
    ap.add_argument("--warmup", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--sweep", action="store_true", help="run the tuning sweep on validation seeds instead")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nfes = [int(v) for v in args.nfe.split(",")]
    for name in args.models.split(","):
        try:
            model = load_model(name)
        except ModelError as e:
            print(f"skipping {name}: {e}")
            continue
        if args.sweep:
            sweep(model, nfes, args.warmup)
            continue
        rows, timing = bench_model(model, nfes, args.n, args.warmup)
        md = table(name, rows, timing, args.n, args.warmup)
        print(md)
        out = Path(args.out)
        write_text(out / f"gits_{name}.md", f"# GITS vs polynomial ρ=7 (γ = {DEFAULT_GAMMA})\n\n" + md)
        write_json(out / f"gits_{name}.json", {"rows": rows, "timing": timing, "n": args.n, "warmup": args.warmup})


if __name__ == "__main__":
    main()
