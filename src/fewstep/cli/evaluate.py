"""`fewstep fid ref|calc` (FID-style scores of image sets) and `fewstep analyze` (trajectory geometry)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.markup import escape

from ..conditioning import conditioned_model
from ..device import resolve_device, to_device
from ..errors import FewstepError
from ..evaluation.fid import (
    FEATURE_NETWORKS,
    INCEPTION_WEIGHTS_ENV,
    REFERENCE_FILES,
    FeatureStats,
    compute_stats,
    fid_score,
    reference_stats,
)
from ..io import check_output_dir, check_output_file, write_text
from ..methods import parse_options
from ..models import load_model
from .common import add_condition_args, add_device_arg, add_model_arg, console, from_args


def _device(name: str) -> str:
    """fid's --device: 'auto' (cuda when available), or a device that exists on this machine (fewstep.device)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(resolve_device(name))


def _feature_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--features", default=default, choices=list(FEATURE_NETWORKS),
                   help="feature network: digits (the project's digit classifier, 'FD-digits') or inception "
                        "(standard FID, needs pip install 'fewstep[fid]')"
                        + (f" (default {default})" if default else " (default: the reference's)"))
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"pytorch-fid Inception weights (.pth); else ${INCEPTION_WEIGHTS_ENV}, else the torch hub "
                        "cache (checkpoints/pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
    p.add_argument("--batch", type=int, default=128, help="images per feature-network call")
    p.add_argument("--device", default="auto", help="cpu, cuda, … (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_fid_ref(args: argparse.Namespace) -> int:
    check_output_file(args.dest, "--dest")
    start = time.perf_counter()
    stats = compute_stats(args.images, args.features, batch=args.batch, device=_device(args.device),
                          reservoir=args.kid_features, progress=not args.no_progress, weights=args.inception_weights)
    stats.save(args.dest, source=str(args.images))
    console.print(f"wrote {escape(args.dest)}: {stats.n} images, {stats.dim}-d {args.features} features"
                  + (f", {len(stats.kid_features)} kept for KID" if stats.kid_features is not None else "")
                  + f" ({time.perf_counter() - start:.1f} s)")
    return 0


def _resolve_ref(ref: str) -> FeatureStats:
    if not Path(ref).exists() and ref in REFERENCE_FILES:
        return reference_stats(ref)
    if not Path(ref).is_file():
        raise FewstepError(f"reference statistics {ref} not found (make them with `fewstep fid ref`, or use a "
                           f"shipped one: {', '.join(REFERENCE_FILES)})")
    return FeatureStats.load(ref)


def cmd_fid_calc(args: argparse.Namespace) -> int:
    if args.json not in (None, "-"):
        check_output_file(args.json, "--json")
    start = time.perf_counter()
    ref = _resolve_ref(args.ref)
    result = fid_score(args.images, ref, features=args.features, kid=args.kid, batch=args.batch,
                       device=_device(args.device), progress=not args.no_progress, weights=args.inception_weights,
                       reservoir=args.kid_features if args.kid else 0)
    result.update(images=str(args.images), ref=str(args.ref), seconds=time.perf_counter() - start)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            write_text(args.json, text + "\n")
    if args.json != "-":
        label = "FD-digits" if result["features"] == "digits" else "FID"
        line = f"{label} {result['fd']:.4f}  ({result['n']} images vs {result['n_ref']} reference)"
        if args.kid:
            line += f"   KID {result['kid']:.6f} ± {result['kid_std']:.6f}"
        console.print(line)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..evaluation.analysis import analyze, write_report

    check_output_dir(args.out, "--out")
    model, conditions = from_args(to_device(load_model(args.model), args.device), args)
    batch = args.batch
    # conditions bound for the seeds, run as one batch (docs/maths.md, "Conditions and guidance")
    if conditions.conditional:
        model = conditioned_model(model, conditions, range(args.first_seed, args.first_seed + args.n))
        batch = args.n
    result = analyze(model, args.solver, args.num_steps, args.n, first_seed=args.first_seed, schedule=args.schedule,
                     rho=args.rho, batch=batch, options=parse_options(args.opt), progress=not args.no_progress)
    files = write_report(result, args.out)
    s = result.summary()
    if args.json:
        print(json.dumps(s))
        return 0
    ev = s["explained_variance"]
    console.print(f"{escape(model.name)}, {escape(args.solver)}, {args.num_steps} points (NFE {s['nfe']}), "
                  f"{s['n']} trajectories, "
                  f"{result.seconds:.1f} s")
    for k, e in ev.items():
        err = s["relative_reconstruction_error"][k]
        console.print(f"  k = {k}: explained variance mean {e['mean'] * 100:.5f} % (min {e['min'] * 100:.5f} %), "
                      f"relative reconstruction error mean {err['mean']:.3g}, max {err['max']:.3g}")
    if "angle_d_vs_x_minus_end_deg" in s:
        console.print(f"  angle(d_i, x_i − x_end): mean {s['angle_d_vs_x_minus_end_deg']['mean']:.2f}°, "
                      f"max {s['angle_d_vs_x_minus_end_deg']['max']:.2f}°;  distance to the line x_T → x_end: "
                      f"max {s['line_deviation']['max_rel']:.3g} of its length")
    console.print(f"wrote {', '.join(f.name for f in files)} to {escape(args.out)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `fid` (with `ref` and `calc`) and `analyze`."""
    p = sub.add_parser("fid", help="FID-style scores: reference statistics and Fréchet distance / KID",
                       description="Fréchet distance (and KID) between images and reference statistics, from "
                                   "features streamed in float64. IMAGES is a folder of PNGs or an .npz with "
                                   "'images' (uint8 [N,H,W,C] or float in [-1,1]).")
    fs = p.add_subparsers(dest="fid_command", required=True)
    r = fs.add_parser("ref", help="compute reference statistics of a set of images")
    r.add_argument("--images", required=True,
                   help="folder of PNGs, .npz, or a built-in set: digits-train / digits-held (16x16 digits)")
    r.add_argument("--dest", required=True, help="output statistics .npz")
    _feature_args(r, "digits")
    r.add_argument("--kid-features", type=int, default=10_000, metavar="N",
                   help="feature rows kept (uniform random subset) for KID (default 10000; 0: none)")
    r.set_defaults(func=cmd_fid_ref)
    c = fs.add_parser("calc", help="score images against reference statistics")
    c.add_argument("--images", required=True,
                   help="folder of PNGs, .npz, or a built-in set: digits-train / digits-held (16x16 digits)")
    c.add_argument("--ref", required=True,
                   help="statistics .npz from `fewstep fid ref` (or pytorch-fid's mu/sigma), or 'digits' for the "
                        "shipped statistics of the built-in digit data")
    c.add_argument("--kid", action="store_true", help="also KID (needs a reference with kept feature rows)")
    c.add_argument("--kid-features", type=int, default=10_000, metavar="N", help="rows kept for KID")
    c.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="print the result as JSON (or write it to FILE)")
    _feature_args(c, None)
    c.set_defaults(func=cmd_fid_calc)

    a = sub.add_parser("analyze", help="trajectory geometry: PCA of sampling trajectories (the 2-D subspace)",
                       description="Sample n trajectories and measure, per trajectory, the PCA reconstruction error "
                                   "with k = 1…4 components at every step, the cumulative explained variance, the "
                                   "distance from the straight line x_T → x_end and the angle between d and "
                                   "x − x_end (docs/maths.md §9). Writes summary.json, per_trajectory.npz and PNG "
                                   "plots.")
    add_model_arg(a, "digits-opt", show_default=True)
    a.add_argument("--solver", default="heun", help="solver (default heun)")
    a.add_argument("--num-steps", type=int, default=41, help="grid points N (default 41: 40 Heun steps)")
    a.add_argument("--schedule", default=None, help="schedule (default: the solver's recommended one)")
    a.add_argument("--rho", type=float, default=None, help="schedule ρ")
    a.add_argument("--opt", action="append", default=[], metavar="K=V", help="solver option")
    a.add_argument("--n", type=int, default=1000, help="number of trajectories (seeds first-seed…)")
    a.add_argument("--first-seed", type=int, default=0, help="first noise seed")
    a.add_argument("--batch", type=int, default=None,
                   help="trajectories per batch (default: 64 MB of float64 trajectories, ~6x that at peak)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_condition_args(a)
    add_device_arg(a)
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a.set_defaults(func=cmd_analyze)
