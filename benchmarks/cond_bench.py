"""Classic solvers on the class-conditional `digits-cond` under classifier-free guidance.

For each guidance scale w: seeds 0…n−1, each with a class drawn uniformly per seed (the documented distribution
of `bench`/`train`/`learn`), every solver at each NFE with its recommended schedule, with and without AFS. Columns: RMSE to the guided
reference (500-step Heun on the same guided D_w, 998 NFE; a guided evaluation counts as one NFE) and the fraction
of samples the shipped digit classifier (models/classifier.py, which never saw the diffusion training images)
assigns to their intended class. Writes benchmarks/results/cond_digits-cond.{md,json}.

It also runs the acceptance command through the CLI's sampling job (PNG quantisation included) and classifies
the written images: `fewstep sample --model digits-cond --classes 0-9 --guidance 2 --solver deis --nfe 10
--seeds 0-99 --out DIR --npz FILE` (and the same at guidance 1 and 4).

    python benchmarks/cond_bench.py --guidance 1,2,4 --nfe 3,5,7,10 --n 200

`--amed-nfe 5 --amed-guidance 2` also trains the AMED-Plugin DEIS recipe (`plugin-deis`, training seeds from
1 000 000, classes uniform, at guidance 2) and evaluates it at every guidance (does it transfer?).

One intra-op thread by default (`--threads`): the shared 2-core machine stalls torch's thread pool.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fewstep.amed.recipes import recipe
from fewstep.amed.train import train
from fewstep.conditioning import ConditionSpec, conditioned_model, conditions_for_seeds
from fewstep.evaluation.bench import SolverSpec, best_per_nfe, run_bench
from fewstep.io import write_json, write_text
from fewstep.models import load_classifier, load_model
from fewstep.reference import reference_solution

SOLVERS = ("euler", "heun", "dpm2", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc")


def recognition(classifier, labels):
    """extra_metrics for run_bench: fraction of samples classified as their intended class."""
    def metric(x: torch.Tensor) -> dict[str, float]:
        pred, _ = classifier.predict(x.float())
        return {"recognised": float((pred == labels).float().mean())}
    return metric


def uniform(guidance: float) -> ConditionSpec:
    return ConditionSpec("classes", tuple(range(10)), "uniform", guidance)


def train_amed(model, nfe, guidance, kimg, out):
    """The plugin-deis recipe at one guidance over uniform classes (pool of 256 teacher runs)."""
    cfg = recipe("plugin-deis", nfe, kimg=kimg, pool=256, batch=64)
    start = time.perf_counter()
    train(model, cfg, out=out, progress=False, conditions=uniform(guidance))
    return time.perf_counter() - start


def bench_guidance(model, guidance, nfes, n, classifier, predictors=()):
    spec = uniform(guidance)
    seeds = list(range(n))
    bound = conditioned_model(model, spec, seeds)
    labels = conditions_for_seeds(spec, seeds)
    start = time.perf_counter()
    ref = reference_solution(bound, seeds)
    ref_s = time.perf_counter() - start
    ref_rec = recognition(classifier, labels)(ref)["recognised"]
    specs = [SolverSpec.parse(s) for s in SOLVERS]
    records = [r for afs in (False, True)
               for r in run_bench(bound, specs, nfes, n, 0, afs, progress=False,
                                  extra_metrics=recognition(classifier, labels))]
    records += run_bench(bound, [], [], n, 0, progress=False, predictors=predictors,
                         extra_metrics=recognition(classifier, labels))
    for r in records:
        r["guidance"] = guidance
    return records, {"guidance": guidance, "reference_recognised": ref_rec, "reference_seconds": round(ref_s, 1),
                     "conditions": spec.to_json()}


def acceptance(classifier, guidance: float) -> float:
    """Fraction of the CLI's samples (seeds 0-99, classes 0-9, DEIS, NFE 10) recognised as the intended class."""
    import tempfile

    import numpy as np

    from fewstep.sampling import SampleJob, run_sample_job

    with tempfile.TemporaryDirectory() as tmp:
        run_sample_job(SampleJob(model="digits-cond", out=f"{tmp}/png", solver="deis", nfe=10, seeds="0-99",
                                 npz=f"{tmp}/s.npz", classes="0-9", guidance=guidance, progress=False))
        imgs = torch.from_numpy(np.load(f"{tmp}/s.npz")["images"]).float()
    x = (imgs / 127.5 - 1).permute(0, 3, 1, 2)[:, :, ::2, ::2]  # PNGs are written 2x up-scaled (nearest)
    pred, _ = classifier.predict(x)
    return float((pred == torch.arange(100) % 10).float().mean())


def markdown(all_records, refs, nfes):
    lines = []
    for ref in refs:
        w = ref["guidance"]
        recs = [r for r in all_records if r["guidance"] == w]
        best = best_per_nfe([r for r in recs if "predictor" not in r])  # the best classic solver per NFE
        lines += [f"### guidance {w:g}", "",
                  f"Reference (500-step Heun, guided): recognised {ref['reference_recognised']:.1%}.", "",
                  "| solver | AFS | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|---|" + "---|" * len(nfes)]
        for solver in SOLVERS:
            for afs in (False, True):
                cells = []
                for n in nfes:
                    r = next((r for r in recs if r["solver"] == solver and r["afs"] == afs
                              and r["nfe"] == n), None)
                    if r is None:
                        cells.append("–")
                        continue
                    mark = "**" if best.get(n) is r else ""
                    cells.append(f"{mark}{r['rmse']:.4f}{mark} / {r['recognised']:.0%}")
                lines.append(f"| {solver} | {'yes' if afs else 'no'} | " + " | ".join(cells) + " |")
        for r in (r for r in recs if "predictor" in r):
            classic = best.get(r["nfe"])
            ratio = (f", ratio to the best classic ({classic['solver']}{' +AFS' if classic['afs'] else ''}) "
                     f"{r['rmse'] / classic['rmse']:.2f}") if classic else ""
            lines.append(f"\n{r['solver']} (trained at guidance {r['trained_guidance']:g}, NFE {r['nfe']}): RMSE "
                         f"{r['rmse']:.4f}, recognised {r['recognised']:.0%}{ratio}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--guidance", default="1,2,4")
    p.add_argument("--nfe", default="3,5,7,10")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amed-nfe", type=int, default=0, help="also train an AMED-Plugin DEIS predictor at this NFE")
    p.add_argument("--amed-guidance", type=float, default=2.0)
    p.add_argument("--amed-kimg", type=float, default=5.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cond_digits-cond"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, classifier = load_model("digits-cond"), load_classifier()
    nfes = [int(v) for v in args.nfe.split(",")]
    all_records, refs, predictors = [], [], []
    start = time.perf_counter()
    if args.amed_nfe:
        folder = f"{args.out}_amed_w{args.amed_guidance:g}"
        sec = train_amed(model, args.amed_nfe, args.amed_guidance, args.amed_kimg, folder)
        print(f"AMED trained in {sec:.0f} s: {folder}", flush=True)
        predictors.append(folder)
    for w in (float(v) for v in args.guidance.split(",")):
        recs, ref = bench_guidance(model, w, nfes, args.n, classifier, predictors)
        for r in recs:
            if "predictor" in r:
                r["trained_guidance"] = args.amed_guidance
        all_records += recs
        refs.append(ref)
        print(f"guidance {w:g}: reference recognised {ref['reference_recognised']:.1%} "
              f"({time.perf_counter() - start:.0f} s so far)", flush=True)
    accept = {w: acceptance(classifier, w) for w in (1.0, 2.0, 4.0)}
    print(f"acceptance (CLI, DEIS NFE 10, seeds 0-99): {accept}", flush=True)
    amed = f" --amed-nfe {args.amed_nfe} --amed-kimg {args.amed_kimg:g}" if args.amed_nfe else ""
    header = (f"# Classic solvers on digits-cond under classifier-free guidance\n\n"
              f"`python benchmarks/cond_bench.py --guidance {args.guidance} --nfe {args.nfe} --n {args.n}{amed}`: "
              f"seeds 0–{args.n - 1}, classes uniform per seed. Cells: RMSE to the guided reference / fraction recognised "
              f"as the intended class by the shipped classifier; bold = best RMSE per NFE. "
              f"Total {time.perf_counter() - start:.0f} s.\n\n"
              "Acceptance, through the CLI (`fewstep sample --model digits-cond --classes 0-9 --guidance W --solver "
              "deis --nfe 10 --seeds 0-99`, PNGs classified): "
              + ", ".join(f"w = {w:g}: **{a:.0%}**" for w, a in accept.items()) + ".\n\n")
    write_text(args.out + ".md", header + markdown(all_records, refs, nfes))
    write_json(args.out + ".json", {"references": refs, "records": all_records, "n": args.n,
                                    "acceptance_cli_deis_nfe10_seeds0-99": {str(w): a for w, a in accept.items()}})
    print(header + markdown(all_records, refs, nfes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
