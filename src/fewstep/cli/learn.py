"""`fewstep learn` (fit a learned solver card; `learn export DIR --sigmas` prints its grid) and `fewstep tune` (fit the
card families for several NFEs and keep the best on validation pairs)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rich.markup import escape

from ..conditioning import bind, conditions_for_seeds
from ..device import to_device
from ..errors import FewstepError
from ..io import check_output_dir
from ..learned.card import FORMAT_VERSION, PARAMETER_FAMILIES, load_card
from ..learned.solver import BASES
from ..learned.train import LOSSES, LearnConfig, learn, learn_plan
from ..methods import parse_options
from ..models import load_model
from ..models.registry import ModelInfo
from ..seeds import CARD_TRAINING, run_seed_type
from ..solvers.base import Denoiser
from ..tune import FAMILIES, OPTIONAL_FAMILIES, Family
from ..validate import int_list, positive_float, positive_int
from .common import add_condition_args, add_device_arg, add_model_arg, console, from_args
from .plan import add_memory_args, log, memory_from_args, show_plan


def _params(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARAMETER_FAMILIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown parameter families {bad}; choose from "
                                         f"{', '.join(PARAMETER_FAMILIES)}")
    return parts


def _conditions(args: argparse.Namespace, model: ModelInfo) -> tuple[ModelInfo, dict[str, Any] | None,
                                                                   Callable[[list[int]], Denoiser] | None]:
    """The model (prompt models get their prompts), the condition distribution to record in the card (None:
    unconditional) and the per-seed binder of conditional models (docs/maths.md, "Conditions and guidance")."""
    model, spec = from_args(model, args)
    if not spec.conditional:
        return model, None, None

    def binder(seeds: list[int]) -> Denoiser:
        return bind(model, conditions_for_seeds(spec, seeds), spec.guidance, spec.classifier_scale)

    return model, spec.to_json(), binder


def cmd_learn(args: argparse.Namespace) -> int:
    if args.action == "export":
        return cmd_export(args)
    if args.action is not None or args.card is not None:
        raise FewstepError("learn: the only sub-action is `fewstep learn export DIR --sigmas`")
    if not args.out and not args.dry_run:
        raise FewstepError("learn: --out DIR is required (the card folder)")
    if args.out:
        check_output_dir(args.out, "--out")

    model, conditions, binder = _conditions(args, to_device(load_model(args.model), args.device))
    cfg = LearnConfig(base=args.base, base_options=parse_options(args.base_opt), nfe=args.nfe, afs=args.afs,
                      params=args.params, init_schedule=args.init_schedule or "", window=args.window, loss=args.loss,
                      soft_radius=args.soft_radius, teacher=args.teacher,
                      teacher_options=parse_options(args.teacher_opt), teacher_steps=args.teacher_steps,
                      pairs=args.pairs, val_pairs=args.val_pairs, iters=args.iters, batch=args.batch, lr=args.lr,
                      seed=args.seed, conditions=conditions)
    memory = memory_from_args(args)
    show_plan(learn_plan(model, cfg, memory))
    if args.dry_run:
        return 0
    card = learn(model, cfg, out=args.out, progress=not args.no_progress, bind=binder, memory=memory, log=log)
    t = card.training
    console.print(f"{escape(card.label)} on {escape(model.name)}: NFE {card.nfe}, validation RMSE "
                  f"{t['val_rmse_initial']:.4g} → {t['val_rmse']:.4g} (train {t['train_rmse']:.4g}) in "
                  f"{t['seconds']:.1f} s; wrote {escape(str(args.out))}/card.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.card is None:
        raise FewstepError("learn export: give the card folder, e.g. `fewstep learn export runs/card --sigmas`")
    card = load_card(args.card)
    if args.sigmas:
        print(json.dumps(card.sigmas))
    else:
        print(json.dumps({"format": FORMAT_VERSION, **asdict(card)}, indent=2))
    return 0


def _families(text: str) -> tuple[Family, ...]:
    """'unipc,deis' → those entries of tune's FAMILIES (or OPTIONAL_FAMILIES), in the given order."""
    by_base = {f.base: f for f in (*FAMILIES, *OPTIONAL_FAMILIES)}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in by_base]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(by_base)}, got {text!r}")
    return tuple(by_base[n] for n in names)


def cmd_tune(args: argparse.Namespace) -> int:
    from ..tune import default_config, tune, tune_plan

    check_output_dir(args.out, "--out")
    model, conditions, binder = _conditions(args, to_device(load_model(args.model), args.device))
    base_config = None
    if args.pairs or args.iters:
        base_config = default_config(model, pairs=args.pairs, iters=args.iters)
    families, memory = args.families or FAMILIES, memory_from_args(args)
    show_plan(tune_plan(model, args.nfe, args.budget, n_test=args.n, conditions=conditions, base_config=base_config,
                        families=families, memory=memory))
    if args.dry_run:
        return 0
    tune(model, args.nfe, args.out, budget_s=args.budget, n_test=args.n, progress=not args.no_progress,
         conditions=conditions, bind=binder, log=log, base_config=base_config, families=families, memory=memory)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `learn` (with `learn export`) and `tune`."""
    p = sub.add_parser(
        "learn", help="fit a learned global solver card (time steps, offsets, weights, coefficients)",
        description="Final-sample distillation of a solver card (docs/maths.md, 'Learned global solvers'): the base "
                    "solver's grid, evaluation offsets and update corrections are fitted to a fine teacher on "
                    "training seeds; validation seeds pick the state to keep. `fewstep learn export DIR --sigmas` "
                    "prints a card's σ grid as JSON.")
    p.add_argument("action", nargs="?", choices=["export"], help="export: print a card (or its σ grid)")
    p.add_argument("card", nargs="?", help="the card folder (with export)")
    p.add_argument("--sigmas", action="store_true", help="with export: print only the σ list")
    add_model_arg(p)
    p.add_argument("--base", default="dpmpp", choices=BASES, help="base solver (default dpmpp)")
    p.add_argument("--base-opt", action="append", default=[], metavar="K=V",
                   help="base solver option, e.g. max_order=2")
    p.add_argument("--nfe", type=int, default=5, help="model calls per sample (default 5)")
    p.add_argument("--afs", action="store_true", help="analytical first step (one call fewer per interval count)")
    p.add_argument("--params", type=_params, default=("steps", "offsets", "coeffs"),
                   help=f"comma-separated families to learn from {','.join(PARAMETER_FAMILIES)} "
                        "(default steps,offsets,coeffs)")
    p.add_argument("--init-schedule", default=None, metavar="NAME[:RHO]",
                   help="grid to start from (default: the base's recommended schedule), e.g. time_uniform:2")
    p.add_argument("--window", type=int, default=3, help="history nodes per correction row K (default 3)")
    p.add_argument("--loss", default="l2", choices=LOSSES,
                   help="final-sample loss: l2, rmse (its square root per sample, the benchmark's metric) or l1 "
                        "(default l2)")
    p.add_argument("--soft-radius", type=float, default=0.0,
                   help="LD3 soft teacher: the student may start within r·sqrt(dim) of each training noise (0: off)")
    p.add_argument("--teacher", default="auto",
                   help="teacher solver on a polynomial rho 7 grid (default auto: Heun with 1000 points on analytic "
                        "models, DEIS-tAB order 4 with 60 points on networks)")
    p.add_argument("--teacher-opt", action="append", default=[], metavar="K=V", help="teacher solver option")
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="teacher grid points (default: 1000 for heun, 60 for the auto network teacher)")
    p.add_argument("--pairs", type=int, default=512, help="training teacher pairs (default 512)")
    p.add_argument("--val-pairs", type=int, default=128, help="validation teacher pairs (default 128)")
    p.add_argument("--iters", type=int, default=300, help="Adam iterations (default 300)")
    p.add_argument("--batch", type=int, default=64, help="pairs per iteration (default 64)")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate, cosine-decayed (default 0.02)")
    p.add_argument("--seed", type=run_seed_type(CARD_TRAINING), default=0,
                   help=f"run seed 0…{CARD_TRAINING.runs - 1}: selects the training pairs (seeds "
                        f"{CARD_TRAINING.first()} + {CARD_TRAINING.block}·seed + i)")
    add_condition_args(p)
    add_device_arg(p)
    add_memory_args(p)
    p.add_argument("--out", default=None, help="card folder (resumes from its learn_state.pt)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("tune", help="fit card families per NFE within a time budget; keep the best on validation",
                       description="For each NFE: the best classic solver over solvers × schedules × AFS on "
                                   "validation pairs, then card families on the strongest bases, initialised from "
                                   "the best classic grid; writes the cards, table.md/json and a plot.")
    add_model_arg(p)
    p.add_argument("--nfe", type=int_list, default=[3, 4, 5], help="comma-separated NFEs (default 3,4,5)")
    p.add_argument("--budget", type=positive_float, default=600.0, help="seconds of training per NFE (default 600)")
    p.add_argument("--families", type=_families, default=None,
                   help="comma-separated base solvers whose card families to try, in order (default: "
                        f"{','.join(f.base for f in FAMILIES)}; also "
                        f"{','.join(f.base for f in OPTIONAL_FAMILIES)})")
    p.add_argument("--n", type=positive_int, default=None,
                   help="test samples, seeds 0…n-1 (default 512 analytic / 64 network)")
    p.add_argument("--pairs", type=positive_int, default=None,
                   help="training pairs (default 2048)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help="iterations per card (default 400)")
    add_condition_args(p)
    add_device_arg(p)
    add_memory_args(p)
    p.add_argument("--out", default="runs/tune", help="output folder (default runs/tune)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_tune)
