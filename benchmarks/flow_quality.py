"""Sample quality of the shipped `digits-flow` model, judged by the independent digit classifier.

    python benchmarks/flow_quality.py [--n 200] [--out benchmarks/results/flow_quality.json]

Samples seeds 0…n−1 with Heun on 51 points of polynomial ρ = 7 in flow time t over [0.001, 1] (from t = 1
exactly, plus the final step to t = 0: 101 NFE), unconditionally (null label) and with seed s conditioned on
class s mod 10 at guidance 1, 2 and 4, and reports the fraction the shipped classifier (trained on the held-out
digits the model never saw) recognises with confidence ≥ 0.5, the fraction of the intended class, and the
recognised fraction of the real digits the model was trained on (which the classifier never saw) for comparison.
"""

from __future__ import annotations

import argparse
import json

import torch

from fewstep.conditioning import conditioned_model, resolve
from fewstep.io import write_json
from fewstep.models import load_classifier, load_model
from fewstep.models.digits import digits_split
from fewstep.noise import seeded_noise
from fewstep.schedules import get_schedule
from fewstep.solvers import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="samples per setting (default 200)")
    ap.add_argument("--out", default="benchmarks/results/flow_quality.json", help="JSON output")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_model("digits-flow")
    clf = load_classifier()
    seeds = list(range(args.n))
    grid = get_schedule("polynomial", 51, model.sigma_min, model.sigma_max, rho=7.0)
    noise = seeded_noise(seeds, model.shape)
    report: dict[str, object] = {"model": model.name, "fingerprint": model.fingerprint, "samples": args.n,
                                 "solver": "heun, 51 points polynomial rho=7 in t over [0.001, 1] + final denoise"}
    settings = [("unconditional", None, 0.0), *[(f"guidance_{w:g}", "0-9", w) for w in (1.0, 2.0, 4.0)]]
    for name, classes, w in settings:
        bound, spec = resolve(model, classes, None, w if classes else None)
        den = conditioned_model(bound, spec, seeds).denoiser if classes else model.denoiser
        with torch.no_grad():
            x = sample(den, noise, "heun", grid)
        labels, conf = clf.predict(x.float())
        row = {"recognised_fraction_conf_0.5": float((conf >= 0.5).float().mean()),
               "mean_confidence": float(conf.mean())}
        if classes:
            row["intended_class_fraction"] = float((labels == torch.tensor(seeds) % 10).float().mean())
        else:
            row["class_histogram"] = torch.bincount(labels[conf >= 0.5], minlength=10).tolist()
        report[name] = row
        print(name, json.dumps(row))
    real = digits_split(16)["train_x"]  # the model's training digits (the classifier never saw them)
    _, conf = clf.predict(real)
    report["real_digits_recognised_fraction_conf_0.5"] = float((conf >= 0.5).float().mean())
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
