"""AMED vs the classic solvers on the analytic models (the README's AMED results table).

For each model and NFE: every classic solver (with and without AFS, recommended schedules), the paper's two
AMED recipes, and this project's improved recipes, all evaluated on seeds 0…n−1 (training uses seeds from
1 000 000 on) against the same 1000-step Heun reference. Writes benchmarks/results/amed_<model>.{md,json}.

    python benchmarks/amed_bench.py --models gmm,digits-opt --nfe 3,5,7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fewstep
from fewstep.amed.checkpoint import sample_checkpoint
from fewstep.amed.recipes import recipe
from fewstep.amed.train import train
from fewstep.evaluation.bench import DEFAULT_SOLVERS, SolverSpec
from fewstep.io import write_json, write_text
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.reference import reference_solution, rmse
from fewstep.solvers import num_steps_for_nfe

# table label → recipe name in fewstep.amed.recipes ("paper" rows follow docs/maths.md §8 exactly)
RECIPE_ROWS = {
    "AMED-Solver (paper)": "paper-solver",
    "AMED-Plugin iPNDM (paper)": "paper-plugin",
    "AMED-Plugin iPNDM (improved)": "plugin-ipndm",
    "AMED-Plugin DEIS (improved)": "plugin-deis",
    "AMED-Plugin iPNDM (improved, GITS)": "plugin-ipndm-gits",
    "AMED-Plugin DEIS (improved, GITS)": "plugin-deis-gits",
}


def classic_rows(model, noise, ref, nfes):
    rows = []
    for name in DEFAULT_SOLVERS:
        spec = SolverSpec.parse(name)
        for afs in (False, True):
            for nfe in nfes:
                steps = num_steps_for_nfe(spec.solver, nfe, afs=afs, **spec.options)
                if steps is None:
                    continue
                sched = fewstep.get_schedule(spec.schedule, steps, model.sigma_min, model.sigma_max, rho=spec.rho)
                x = fewstep.sample(model.denoiser, noise, spec.solver, sched, afs=afs, **spec.options)
                rows.append({"method": spec.label + (" +AFS" if afs else ""), "nfe": nfe, "rmse": rmse(x, ref),
                             "kind": "classic"})
    return rows


def amed_rows(model, noise, ref, nfes, kimg, out_dir, only=None):
    rows = []
    for label, name in RECIPE_ROWS.items():
        if only and name not in only:
            continue
        for nfe in nfes:
            cfg = recipe(name, nfe, kimg=kimg)
            start = time.perf_counter()
            folder = out_dir / f"{name}_nfe{nfe}_kimg{kimg:g}"  # an identical rerun resumes: no retraining
            predictor, settings, stats = train(model, cfg, out=folder, progress=False)
            x = sample_checkpoint(model, noise, predictor, settings)
            rows.append({"method": label, "nfe": nfe, "rmse": rmse(x, ref), "kind": "amed",
                         "train_seconds": time.perf_counter() - start, "loss_first": stats["loss_first"],
                         "loss_last": stats["loss_last"]})
            print(f"  {label} NFE {nfe}: {rows[-1]['rmse']:.4f} ({rows[-1]['train_seconds']:.0f} s)", flush=True)
    return rows


def summary(rows, nfes):
    lines = ["| NFE | best classic | RMSE | best AMED | RMSE | ratio | AMED-Plugin iPNDM / iPNDM+AFS |",
             "|---|---|---|---|---|---|---|"]
    for nfe in nfes:
        classic = min((r for r in rows if r["nfe"] == nfe and r["kind"] == "classic"), key=lambda r: r["rmse"])
        amed = min((r for r in rows if r["nfe"] == nfe and r["kind"] == "amed"), key=lambda r: r["rmse"])
        ipndm = next(r for r in rows if r["nfe"] == nfe and r["method"] == "ipndm +AFS")
        plugin = min((r for r in rows if r["nfe"] == nfe and r["method"].startswith("AMED-Plugin iPNDM")),
                     key=lambda r: r["rmse"])
        lines.append(f"| {nfe} | {classic['method']} | {classic['rmse']:.4f} | {amed['method']} | {amed['rmse']:.4f} "
                     f"| {amed['rmse'] / classic['rmse']:.2f} | {plugin['rmse'] / ipndm['rmse']:.2f} |")
    return "\n".join(lines) + "\n"


def full_table(rows, nfes):
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for m in methods:
        cells = []
        for n in nfes:
            r = next((r for r in rows if r["method"] == m and r["nfe"] == n), None)
            cells.append(f"{r['rmse']:.4f}" if r else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gmm,digits-opt")
    ap.add_argument("--nfe", default="3,5,7")
    ap.add_argument("--n", type=int, default=512, help="evaluation samples (seeds 0…n−1)")
    ap.add_argument("--kimg", type=float, default=20.0, help="training trajectories (thousands) per predictor")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small models)")
    ap.add_argument("--recipes", default="", help="comma-separated recipe names to run (default: all rows)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    nfes = [int(v) for v in args.nfe.split(",")]
    out = Path(args.out)
    for name in args.models.split(","):
        model = load_model(name)
        seeds = list(range(args.n))
        ref, noise = reference_solution(model, seeds), seeded_noise(seeds, model.shape)
        print(f"== {name}", flush=True)
        rows = classic_rows(model, noise, ref, nfes)
        only = set(filter(None, args.recipes.split(",")))
        new_rows = amed_rows(model, noise, ref, nfes, args.kimg, Path("runs/amed_bench") / name, only)
        previous = out / f"amed_{name}.json"
        if only and previous.exists():  # keep the earlier AMED rows of the recipes not rerun now
            rerun = {label for label, recipe_name in RECIPE_ROWS.items() if recipe_name in only}
            rows += [r for r in json.loads(previous.read_text()) if r["kind"] == "amed" and r["method"] not in rerun]
        rows += new_rows
        text = (f"# AMED vs classic solvers on `{name}` ({args.n} evaluation seeds, RMSE to the reference)\n\n"
                + summary(rows, nfes) + "\n" + full_table(rows, nfes))
        write_text(out / f"amed_{name}.md", text)
        write_json(out / f"amed_{name}.json", rows)
        print(text, flush=True)


if __name__ == "__main__":
    main()
