"""`fewstep sample`: sample a model with any solver, an AMED predictor or a learned card to PNGs / .npz."""

from __future__ import annotations

import argparse

from rich.markup import escape

from ..methods import parse_options
from ..validate import int_in, positive_float, positive_int
from .common import add_condition_args, add_device_arg, add_model_arg, console


def cmd_sample(args: argparse.Namespace) -> int:
    from ..sampling import SampleJob, run_sample_job

    job = SampleJob(model=args.model, solver=args.solver, nfe=args.nfe, num_steps=args.num_steps,
                    schedule=args.schedule, rho=args.rho, afs=args.afs, seeds=args.seeds, out=args.out,
                    grid=args.grid, npz=args.npz, batch=args.batch, predictor=args.predictor,
                    options=parse_options(args.opt), progress=not args.no_progress, overwrite=args.overwrite,
                    classes=args.classes, prompts=args.prompts, guidance=args.guidance,
                    classifier_scale=args.classifier_guidance, device=args.device, cards=tuple(args.cards))
    written = run_sample_job(job, log=lambda line: console.print(escape(line)))
    console.print(f"wrote {written} new sample(s) to {escape(args.out)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `sample`."""
    p = sub.add_parser("sample", help="sample a model with any solver (or an AMED predictor) to PNGs / .npz")
    add_model_arg(p)
    p.add_argument("--solver", default="auto",
                   help="default auto: the card fitted to this model, NFE and conditions (yours from --cards, else "
                        "the shipped ones: `fewstep cards`), else the best classic rule for the model's kind "
                        "(printed, and recorded in the manifest). Or a solver name or method spec "
                        "'name[:opt=val,...][@schedule[:rho]][+afs]' (ignored with --predictor); learned:DIR for a "
                        "learned solver card (fewstep learn) or amed:DIR for an AMED checkpoint, which bring their "
                        "own grid, AFS and NFE")
    p.add_argument("--cards", action="append", default=[], metavar="DIR",
                   help="with --solver auto: a folder of your own cards (searched recursively, e.g. a `fewstep "
                        "tune` output), preferred to the shipped ones; repeatable")
    p.add_argument("--nfe", type=positive_int, default=None, help="NFE budget (sets num_steps; needed by auto)")
    p.add_argument("--num-steps", type=int_in(2), default=None, help="grid points N instead of --nfe")
    p.add_argument("--schedule", default=None, help="schedule (default: the solver's recommended one)")
    p.add_argument("--rho", type=positive_float, default=None, help="schedule ρ")
    p.add_argument("--afs", action="store_true", help="analytical first step")
    p.add_argument("--opt", action="append", default=[], metavar="K=V", help="solver option, e.g. max_order=3")
    p.add_argument("--seeds", default="0-63", help="seed list, e.g. 0-63 or 1,5,10-12 (one sample per seed)")
    p.add_argument("--out", required=True,
                   help="output folder: one PNG per seed and manifest.json (the settings); a rerun with the same "
                        "settings resumes (existing PNGs are kept), other settings are refused")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the samples and manifest of --out first (when it was made with other settings)")
    p.add_argument("--grid", default=None, metavar="PNG", help="also write a grid image of all samples")
    p.add_argument("--npz", default=None, metavar="FILE", help="also write all samples as an .npz array")
    p.add_argument("--batch", type=positive_int, default=64,
                   help="samples per model call (results do not depend on it)")
    p.add_argument("--predictor", default=None, metavar="DIR", help="AMED checkpoint: sample with its settings")
    add_condition_args(p, sampling=True)
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_sample)
