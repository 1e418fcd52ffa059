"""`fewstep gits`: search a GITS schedule for a model and write it as a schedule file (docs/maths.md §10).

Use the file with any solver: `fewstep sample --schedule gits:FILE`, `fewstep bench --solvers 'ipndm@gits:FILE'`,
or `get_schedule("gits", num_steps, path=FILE)`.
"""

from __future__ import annotations

import argparse
import time

from rich.markup import escape

from ..conditioning import conditioned_model
from ..errors import FewstepError
from ..gits import (
    DEFAULT_GAMMA,
    DEFAULT_GRID,
    DEFAULT_METRIC,
    DEFAULT_TEACHER,
    DEFAULT_WARMUP,
    METRICS,
    GitsSearch,
    nfe_to_num_steps,
)
from ..device import to_device
from ..methods import parse_options
from ..models import load_model
from ..schedules import save_schedule
from ..seeds import GITS_WARMUP
from ..solvers import get_solver, nfe
from ..validate import positive_int
from .common import add_condition_args, add_device_arg, add_model_arg, console, from_args


def cmd_gits(args: argparse.Namespace) -> int:
    model, conditions = from_args(to_device(load_model(args.model), args.device), args)
    batch = args.batch
    warmup_seeds = GITS_WARMUP.seeds(args.warmup, option="--warmup")
    # conditions bound for the warm-up seeds, run as one batch (docs/maths.md, "Conditions and guidance")
    if conditions.conditional:
        model = conditioned_model(model, conditions, warmup_seeds)
        batch = args.warmup
    options = parse_options(args.opt)
    get_solver(args.solver, **options)
    if args.num_steps is not None:
        steps = args.num_steps
    elif args.nfe is not None:
        steps = nfe_to_num_steps(args.solver, args.nfe, afs=args.afs, **options)
    else:
        raise FewstepError("give --nfe (or --num-steps)")
    start = time.perf_counter()
    search = GitsSearch.run(model, teacher=args.teacher, grid=args.grid, warmup=args.warmup, metric=args.metric,
                            teacher_options=parse_options(args.teacher_opt), batch=batch,
                            progress=not args.no_progress)
    sigmas, path = search.schedule(steps, args.gamma, afs=args.afs, afs_mode=args.afs_mode, solver=args.solver,
                                   solver_options=options)
    total = time.perf_counter() - start
    meta = search.metadata(steps, args.gamma, args.afs, path, solver=args.solver,
                           nfe=nfe(args.solver, steps, afs=args.afs, **options))
    meta.update(afs_mode=args.afs_mode if args.afs else None, solver_options=options, seconds=round(total, 3))
    if conditions.conditional:
        meta["conditions"] = conditions.to_json()
    save_schedule(args.out, sigmas, meta)
    console.print(escape(f"GITS schedule for {model.name}, {args.solver} at NFE {meta['nfe']}"
                         f"{' (AFS)' if args.afs else ''}: {steps} points, grid indices {path}"))
    console.print(escape("σ = [" + ", ".join(f"{v:.4g}" for v in sigmas.tolist()) + "]"))
    console.print(escape(f"wrote {args.out} (warm-up {args.warmup} × {args.teacher} on {len(search.grid)} points: "
                  f"{total:.1f} s)"))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `gits`."""
    p = sub.add_parser(
        "gits", help="search a GITS time schedule (geometry-inspired, by dynamic programming) for a model",
        description="Run a teacher on a fine grid for warm-up samples (seeds from "
                    f"{GITS_WARMUP.first()}), build the cost matrix of one-step Euler jumps and pick the schedule "
                    "by dynamic programming (docs/maths.md §10). Use the file with --schedule gits:FILE.")
    add_model_arg(p, help="model (as for `fewstep bench`)")
    p.add_argument("--nfe", type=int, default=None, help="NFE budget of the student solver (sets num_steps)")
    p.add_argument("--num-steps", type=int, default=None, help="grid points N instead of --nfe")
    p.add_argument("--solver", default="ipndm", help="student solver: maps NFE to points and picks the AFS point")
    p.add_argument("--opt", action="append", default=[], metavar="K=V", help="student solver option")
    p.add_argument("--afs", action="store_true", help="the student uses AFS (a free first step)")
    p.add_argument("--afs-mode", default="insert", choices=["insert", "cost"],
                   help="with --afs: insert the free point by final error after the DP (the authors' method, "
                        "default) or use AFS's first direction in the cost matrix")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help=f"teacher solver (default {DEFAULT_TEACHER})")
    p.add_argument("--teacher-opt", action="append", default=[], metavar="K=V", help="teacher option")
    p.add_argument("--grid", type=int, default=DEFAULT_GRID,
                   help=f"fine grid points, polynomial ρ=7 (default {DEFAULT_GRID})")
    p.add_argument("--warmup", type=positive_int, default=DEFAULT_WARMUP,
                   help=f"warm-up samples (default {DEFAULT_WARMUP})")
    p.add_argument("--gamma", type=float, default=DEFAULT_GAMMA,
                   help=f"DP discount γ: V[j][k] = min C[j][i] + γ·V[i][k-1] (default {DEFAULT_GAMMA})")
    p.add_argument("--metric", default=DEFAULT_METRIC, choices=list(METRICS),
                   help=f"cost of a jump: l2 (RMSE), l1, dev (deviation change) (default {DEFAULT_METRIC})")
    p.add_argument("--batch", type=int, default=64, help="warm-up samples per teacher batch")
    p.add_argument("--out", required=True, help="schedule file to write (JSON)")
    add_condition_args(p)
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_gits)
