"""`fewstep train`: distil an AMED predictor from a teacher trajectory (docs/maths.md §8)."""

from __future__ import annotations

import argparse

from rich.markup import escape

from ..device import to_device
from ..errors import FewstepError
from ..io import check_output_dir
from ..methods import parse_options
from ..models import load_model
from ..seeds import AMED_TRAINING, run_seed_type
from ..validate import float_in, int_in, nonnegative_int, positive_float, positive_int
from .common import add_condition_args, add_device_arg, add_model_arg, console, from_args
from .plan import add_memory_args, log, memory_from_args, show_plan


def cmd_train(args: argparse.Namespace) -> int:
    from ..amed.train import TrainConfig, train, train_plan

    if not args.out and not args.dry_run:
        raise FewstepError("train: --out DIR is required (the checkpoint folder)")
    if args.out:
        check_output_dir(args.out, "--out")
    model = to_device(load_model(args.model), args.device)
    student_opts = parse_options(args.student_opt)
    if args.max_order is not None:
        student_opts["max_order"] = args.max_order
    teacher_opts = parse_options(args.teacher_opt)
    cfg = TrainConfig(
        student=args.student, teacher=args.teacher, num_steps=args.num_steps, M=args.M, afs=args.afs,
        schedule=args.schedule, rho=args.rho, scale_dir=args.scale_dir, scale_time=args.scale_time,
        student_options=student_opts, teacher_options=teacher_opts, batch=args.batch, kimg=args.kimg,
        lr=args.lr, loss=args.loss, seed=args.seed, pool=args.pool,
    )
    model, conditions = from_args(model, args)
    memory = memory_from_args(args)
    show_plan(train_plan(model, cfg, memory, conditions))
    if args.dry_run:
        return 0
    _, settings, stats = train(model, cfg, out=args.out, progress=not args.no_progress, conditions=conditions,
                               memory=memory, log=log)
    console.print(f"{escape(settings.label)} on {escape(model.name)}: NFE {settings.nfe}, "
                  f"loss {stats['loss_first']:.4g} → "
                  f"{stats['loss_last']:.4g} in {stats['seconds']:.1f} s; wrote {escape(args.out)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `train`."""
    p = sub.add_parser("train", help="distil an AMED predictor from a teacher trajectory",
                       description="Trajectory distillation (docs/maths.md §8). Paper recipes: AMED-Solver = "
                                   "--student amed --teacher heun --M 1 --schedule time_uniform --rho 1 --afs "
                                   "--scale-dir 0.01; AMED-Plugin = --student ipndm --max-order 4 --teacher ipndm "
                                   "--M 2 --schedule polynomial --rho 7 --afs --scale-dir 0.01 --scale-time 0.2.")
    add_model_arg(p)
    p.add_argument("--student", default="amed", help="amed (AMED-Solver) or a solver to plug AMED into")
    p.add_argument("--teacher", default="heun", help="teacher solver run on the refined grid")
    p.add_argument("--num-steps", type=int_in(2), default=4, help="student grid points N (NFE = 2(N-1), -1 with AFS)")
    p.add_argument("--M", type=nonnegative_int, default=1, help="teacher points inserted in every student interval")
    p.add_argument("--afs", action="store_true", help="analytical first step (saves one NFE)")
    p.add_argument("--schedule", default="time_uniform", help="schedule family of student and teacher")
    p.add_argument("--rho", type=positive_float, default=None,
                   help="schedule ρ (polynomial default 7, time_uniform 1)")
    p.add_argument("--scale-dir", type=float_in(0, 1, high_open=True), default=0.01,
                   help="bound s_dir: c ∈ [1-s_dir, 1+s_dir] (0: c = 1; below 1)")
    p.add_argument("--scale-time", type=float_in(0, 1, high_open=True), default=0.0,
                   help="bound s_time: a ∈ [1-s_time, 1+s_time] (0: a = 1; below 1)")
    p.add_argument("--max-order", type=positive_int, default=None, help="max_order of a multistep student")
    p.add_argument("--student-opt", action="append", default=[], metavar="K=V", help="other student option")
    p.add_argument("--teacher-opt", action="append", default=[], metavar="K=V", help="teacher option, e.g. max_order=4")
    p.add_argument("--loss", default="step", choices=["step", "e2e", "step+e2e"],
                   help="step: the paper's per-interval loss; e2e: final state only, through the whole rollout; "
                        "step+e2e: both")
    p.add_argument("--batch", type=positive_int, default=128, help="trajectories per iteration")
    p.add_argument("--kimg", type=positive_float, default=10.0, help="thousands of training trajectories")
    p.add_argument("--lr", type=positive_float, default=5e-3, help="Adam learning rate")
    p.add_argument("--seed", type=run_seed_type(AMED_TRAINING), default=0,
                   help=f"run seed 0…{AMED_TRAINING.runs - 1}: selects the training noise (seeds "
                        f"{AMED_TRAINING.first()} + {AMED_TRAINING.first(1) - AMED_TRAINING.first()}·seed + i)")
    p.add_argument("--pool", type=nonnegative_int, default=0,
                   help="0: a fresh teacher run for every batch (the paper); N: run the teacher once on N seeds "
                        "and reuse them (much faster with a network teacher)")
    add_memory_args(p)
    p.add_argument("--out", default=None, help="checkpoint folder (resumes from its train_state.pt; required but with "
                                               "--dry-run)")
    add_condition_args(p)
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)
