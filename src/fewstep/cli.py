"""The `fewstep` command line: benchmarks, listings and the demo (run `fewstep COMMAND --help`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .conditioning import add_condition_args, check_artifacts, conditioned_model, from_args
from .errors import FewstepError
from .evaluation.bench import (DEFAULT_NFES, DEFAULT_SOLVERS, SolverSpec, best_per_nfe, expand_schedules,
                               parse_options, run_best_classic, run_bench, table_rows)
from .io import check_output_dir, check_output_file, write_json
from .device import DEVICE_HELP, to_device
from .models import BUILTIN_MODELS, DEFAULT_MODEL, load_model
from .signals import exit_code, interrupts
from .solvers import SOLVERS
from .validate import (env_threads, float_in, int_in, int_list, nonnegative_int, positive_float, positive_int,
                       seed_int, threads_int)

console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)  # errors: stderr, one line however long



def model_arg(text: str) -> str:
    """--model: a built-in model name, or `package.module:factory` / `path/file.py:factory` (a user model)."""
    if text in BUILTIN_MODELS or ":" in text:
        return text
    raise argparse.ArgumentTypeError(f"unknown model {text!r}: use a built-in model ({', '.join(BUILTIN_MODELS)}) "
                                     "or package.module:factory")


MODEL_HELP = "built-in model ({}) or package.module:factory returning a denoiser (docs/integrations.md)"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
    table = Table(title=escape(title) or None)
    for i, h in enumerate(header):
        table.add_column(escape(h), justify="left" if i < 2 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(escape(c) for c in r))
    console.print(table)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, type=model_arg,
                   help=MODEL_HELP.format(", ".join(BUILTIN_MODELS)) + f"; default {DEFAULT_MODEL}")
    p.add_argument("--nfe", type=int_list, default=list(DEFAULT_NFES),
                   help="comma-separated NFE budgets (default 3,4,5,6,7,8,10)")
    p.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                   help="solvers to run, ';'-separated specs 'name[:opt=val,...][@schedule[:rho]]', or a "
                        "plain comma list of names; each uses its recommended schedule unless given "
                        "(e.g. 'ipndm;dpmpp:max_order=2;deis:deis_mode=rhoab@polynomial:7')")
    p.add_argument("--n", type=positive_int, default=512, help="number of samples (seeds first-seed…first-seed+n-1)")
    p.add_argument("--first-seed", type=seed_int, default=0, help="first noise seed (default 0)")
    p.add_argument("--afs", action="store_true", help="analytical first step for every solver (saves one NFE)")
    p.add_argument("--schedules", default=None,
                   help="comma-separated schedules to run every solver on (solver × schedule × NFE): polynomial, "
                        "logsnr, time_uniform, discrete (optionally name:rho), gits (searched per NFE for the "
                        "model), gits:FILE, ays:TABLE; default: each solver's own schedule")
    p.add_argument("--predictor", action="append", default=[], metavar="DIR",
                   help="an AMED predictor checkpoint folder to add as a row (repeatable); it runs with its "
                        "own stored settings at its own NFE")
    p.add_argument("--learned", action="append", default=[], metavar="DIR",
                   help="a learned solver card folder (fewstep learn) to add as a row (repeatable), at its own NFE")
    p.add_argument("--best-classic", action="store_true",
                   help="run every classic solver on polynomial ρ 5 and 7, logsnr, time_uniform ρ 1 and 2, with and "
                        "without AFS, and mark the best per NFE (the yardstick of learned-vs-classic ratios)")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON to FILE")
    p.add_argument("--fid", action="store_true", help="also the FD score of each row's samples against the shipped "
                   "reference statistics (models with a feature network: digits, digits-opt)")
    p.add_argument("--plot", metavar="FILE", help="write an error (and FD) vs NFE chart, log scale, to FILE (PNG)")
    add_condition_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parse_specs(text: str) -> list[SolverSpec]:
    parts = text.split(";") if (";" in text or ":" in text or "@" in text) else text.split(",")
    return [SolverSpec.parse(p.strip()) for p in parts if p.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from .evaluation.commands import bench_extra_metrics, bench_report

    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    model, conditions = from_args(to_device(load_model(args.model), args.device), args)
    check_artifacts([*args.predictor, *args.learned], conditions)
    model = conditioned_model(model, conditions, range(args.first_seed, args.first_seed + args.n))
    start = time.perf_counter()
    specs = _parse_specs(args.solvers)
    if args.schedules:
        specs = expand_schedules(specs, args.schedules.split(","))
    extra = bench_extra_metrics(args, model)
    if args.best_classic:  # the sweep below covers every classic solver; run_bench adds predictors and cards
        specs = []
    records = run_bench(model, specs, args.nfe, n_samples=args.n,
                        first_seed=args.first_seed, afs=args.afs, progress=not args.no_progress,
                        predictors=args.predictor, extra_metrics=extra, learned=args.learned)
    if args.best_classic:
        records += run_best_classic(model, args.nfe, args.n, args.first_seed, not args.no_progress,
                                    extra_metrics=extra)
        for nfe, best in sorted(best_per_nfe([r for r in records if r.get("best_classic")]).items()):
            console.print(f"best classic at NFE {nfe}: {escape(best['solver'])} on {escape(best['schedule'])}"
                          f"{' +AFS' if best['afs'] else ''}, RMSE {best['rmse']:.4f}")
    if not records:
        raise FewstepError(f"--nfe {','.join(map(str, args.nfe))}: no solver can run at these NFE budgets "
                           "(try --afs, or larger budgets)")
    nfes = sorted(set(args.nfe) | {r["nfe"] for r in records})  # predictors may add their own NFE
    header, rows = table_rows(records, nfes)
    _print_table(header, rows, f"RMSE to the reference solution — {args.model}, {args.n} samples"
                 + (", AFS" if args.afs else "") + (f", {conditions.describe()}" if conditions.conditional else "")
                 + " (* best per NFE)")
    bench_report(args, records, nfes, _print_table)
    console.print(f"[dim]{time.perf_counter() - start:.1f} s[/dim]")
    if args.json:
        write_json(args.json, [{**r, "conditions": conditions.to_json()} if conditions.conditional else r
                               for r in records])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: AMED predictors, learned solver cards and every classic solver on a built-in model; table,
    JSON, plots."""
    from .demo import run_demo

    out = Path(args.out)
    check_output_dir(out, "--out")
    model = to_device(load_model(args.model), args.device)
    network = not model.exact  # a network: fewer samples, and a reused teacher pool (the teacher is the cost)
    n = args.n or (64 if network else 256)
    kimg = args.kimg or (3.2 if network else 10.0)
    pool = 256 if network else 0
    records = run_demo(model, out, n=n, kimg=kimg, pool=pool, batch=64 if network else 128, amed_nfes=args.amed_nfe,
                       card_nfes=args.card_nfe, card_iters=args.card_iters, progress=not args.no_progress,
                       log=lambda text: console.print(text, markup=False))
    nfes = sorted({r["nfe"] for r in records})
    header, rows = table_rows(records, nfes)
    _print_table(header, rows, f"RMSE to the reference solution — {model.name}, {n} samples (* best per NFE)")
    console.print(f"wrote {escape(str(out))}/table.md, table.json, error_vs_nfe.png, samples_nfe5.png and predictors/")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .amed.train import TrainConfig, train

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
    _, settings, stats = train(model, cfg, out=args.out, progress=not args.no_progress, conditions=conditions)
    console.print(f"{escape(settings.label)} on {escape(model.name)}: NFE {settings.nfe}, "
                  f"loss {stats['loss_first']:.4g} → "
                  f"{stats['loss_last']:.4g} in {stats['seconds']:.1f} s; wrote {escape(args.out)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sampling import SampleJob, run_sample_job

    job = SampleJob(model=args.model, solver=args.solver, nfe=args.nfe, num_steps=args.num_steps,
                    schedule=args.schedule, rho=args.rho, afs=args.afs, seeds=args.seeds, out=args.out,
                    grid=args.grid, npz=args.npz, batch=args.batch, predictor=args.predictor,
                    options=parse_options(args.opt), progress=not args.no_progress, overwrite=args.overwrite,
                    classes=args.classes, prompts=args.prompts, guidance=args.guidance,
                    classifier_scale=args.classifier_guidance, device=args.device)
    written = run_sample_job(job)
    console.print(f"wrote {written} new sample(s) to {escape(args.out)}")
    return 0


def cmd_solvers(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in SOLVERS.items():
        opts = ", ".join(f"{k}={o.default}" for k, o in cls.options.items()) or "–"
        sched, rho = cls.recommended_schedule
        rows.append([name, cls.summary, str(cls.evals_per_step), opts, sched + (f" ρ={rho:g}" if rho else "")])
    if args.json:
        print(json.dumps([dict(zip(["name", "summary", "nfe_per_step", "options", "schedule"], r)) for r in rows]))
    else:
        _print_table(["solver", "what", "NFE/step", "options (defaults)", "recommended schedule"], rows)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name in BUILTIN_MODELS:
        m = load_model(name)
        rows.append([name, "×".join(map(str, m.shape)), f"{m.sigma_min:g}–{m.sigma_max:g}",
                     "yes" if m.bottleneck is not None else "no", m.description])
    if args.json:
        print(json.dumps([dict(zip(["name", "shape", "sigma_range", "bottleneck", "description"], r)) for r in rows]))
    else:
        _print_table(["model", "shape", "σ range", "bottleneck", "description"], rows)
    return 0


# Modules that add their own subcommands: each defines `add_commands(sub)` (argparse sub-parsers action) and
# sets `func` on its parsers; a command function returns the exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "fewstep.gits_cli", "fewstep.evaluation.commands", "fewstep.models.train_unet", "fewstep.learned.cli",
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2): `fewstep bench: error: …`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


THREADS_HELP = ("torch CPU threads (default: $FEWSTEP_THREADS or torch's own choice); 1 is fastest for the small "
                "analytic models and on a busy machine")


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every subcommand also accepts the global options (`fewstep bench --threads 1`), and every plain float
    option refuses NaN and ±inf; applied recursively to the sub-parsers of all command modules."""
    for action in parser._actions:
        if action.type is float:
            action.type = float_in()
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                if "--threads" not in child._option_string_actions:
                    child.add_argument("--threads", type=threads_int, default=argparse.SUPPRESS, help=THREADS_HELP)
                _finish(child)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(prog="fewstep", description=__doc__)
    parser.add_argument("--threads", type=threads_int, default=None, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)

    p = sub.add_parser("bench", help="RMSE to the exact ODE solution for every solver at each NFE",
                       description="Run each solver with its recommended schedule (or the one given) from the "
                                   "same noise and print the RMSE to a 1000-step Heun reference (cached on disk "
                                   "in $FEWSTEP_CACHE or ~/.cache/fewstep).")
    _bench_args(p)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job: train AMED predictors, benchmark them beside every classic "
                                    "solver at NFE 3-10, write table, plot and sample pictures")
    p.add_argument("--model", default="digits", type=model_arg,
                   help=MODEL_HELP.format(", ".join(BUILTIN_MODELS)) + "; default digits")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="number of evaluation samples, seeds 0…n-1 (default 64 for a network, 256 otherwise)")
    p.add_argument("--kimg", type=positive_float, default=None,
                   help="training trajectories (thousands) per predictor (default 3.2 for a network, 10 otherwise)")
    p.add_argument("--amed-nfe", type=int_list, default=[5], help="NFEs to train AMED predictors for (default 5)")
    p.add_argument("--card-nfe", type=int_list, default=[3, 5],
                   help="NFEs to learn UniPC solver cards for (default 3,5; fewstep learn)")
    p.add_argument("--card-iters", type=int_in(1), default=None,
                   help="training iterations per card (default 150 for a network, 400 otherwise)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="distil an AMED predictor from a teacher trajectory",
                       description="Trajectory distillation (docs/maths.md §8). Paper recipes: AMED-Solver = "
                                   "--student amed --teacher heun --M 1 --schedule time_uniform --rho 1 --afs --scale-dir 0.01; "
                                   "AMED-Plugin = --student ipndm --max-order 4 --teacher ipndm --M 2 --schedule "
                                   "polynomial --rho 7 --afs --scale-dir 0.01 --scale-time 0.2.")
    p.add_argument("--model", default=DEFAULT_MODEL, type=model_arg, help=MODEL_HELP.format(", ".join(BUILTIN_MODELS)))
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
    p.add_argument("--seed", type=int_in(0, 10**6), default=0,
                   help="training seed (noise seeds are disjoint from evaluation's)")
    p.add_argument("--pool", type=nonnegative_int, default=0,
                   help="0: a fresh teacher run for every batch (the paper); N: run the teacher once on N seeds "
                        "and reuse them (much faster with a network teacher)")
    p.add_argument("--out", required=True, help="checkpoint folder (resumes from its train_state.pt)")
    add_condition_args(p)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a model with any solver (or an AMED predictor) to PNGs / .npz")
    p.add_argument("--model", default=DEFAULT_MODEL, type=model_arg, help=MODEL_HELP.format(", ".join(BUILTIN_MODELS)))
    p.add_argument("--solver", default="ipndm",
                   help="solver name (ignored with --predictor), or learned:DIR for a learned solver card "
                        "(fewstep learn), which brings its own grid, AFS and NFE")
    p.add_argument("--nfe", type=positive_int, default=None, help="NFE budget (sets num_steps)")
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
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("solvers", help="list the solvers, their options and recommended schedules")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_solvers)

    p = sub.add_parser("models", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)
    _finish(parser)
    return parser


def print_error(message: object) -> None:
    """One line `error: …` on stderr (user text escaped, never read as rich markup)."""
    err_console.print(f"[red]error:[/red] {escape(' '.join(str(message).splitlines()))}", highlight=False)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen command's `func`, as every fewstep entry point does: a FewstepError or an
    OSError is one line on stderr and exit code 2; Ctrl-C exits with 130 and SIGTERM with 143 (both after the
    command's own cleanup: checkpoints, no partial files), however the process was started."""
    with interrupts():
        try:
            args = parser.parse_args(argv)
            threads = getattr(args, "threads", None) or env_threads()
            if threads:
                import torch

                torch.set_num_threads(threads)
            return args.func(args)
        except FewstepError as e:
            print_error(e)
            return 2
        except OSError as e:  # unwritable output or cache folder, a full disk, …
            print_error(f"{e.strerror or e}: {e.filename}" if e.filename else e)
            return 2
        except KeyboardInterrupt as e:
            code = exit_code(e)
            err_console.print("[yellow]terminated[/yellow]" if code == 143 else "[yellow]interrupted[/yellow]")
            return code


def main(argv: Sequence[str] | None = None) -> int:
    """The `fewstep` command (argv: the arguments after the program name; default sys.argv[1:])."""
    return run(build_parser(), argv)



if __name__ == "__main__":
    sys.exit(main())
