"""`fewstep bench` (every solver's RMSE to the reference per NFE, with FD scores and a chart) and `fewstep demo`
(the main job: AMED predictors and learned cards beside every classic solver)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from ..conditioning import check_artifacts, conditioned_model
from ..device import to_device
from ..errors import FewstepError
from ..evaluation.bench import (
    DEFAULT_NFES,
    DEFAULT_SOLVERS,
    SolverSpec,
    best_per_nfe,
    expand_schedules,
    split_schedules,
    run_bench,
    run_best_classic,
    table_rows,
)
from ..io import check_output_dir, check_output_file, write_json
from ..models import load_model
from ..models.registry import ModelInfo
from ..validate import int_in, int_list, positive_float, positive_int, seed_int
from .common import add_condition_args, add_device_arg, add_model_arg, console, from_args, print_table


def _bench_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p, show_default=True)
    p.add_argument("--nfe", type=int_list, default=list(DEFAULT_NFES),
                   help="comma-separated NFE budgets (default 3,4,5,6,7,8,10)")
    p.add_argument("--solvers", default=",".join(("auto", *DEFAULT_SOLVERS)),
                   help="solvers to run (default: auto, what `fewstep sample` uses by default, and every classic "
                        "solver), ';'-separated specs 'name[:opt=val,...][@schedule[:rho]]', or a "
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


def _extra_metrics(args: argparse.Namespace, model: ModelInfo) -> Callable[[Any], dict[str, Any]] | None:
    """`--fid`: the FD metric for `run_bench(extra_metrics=…)`, or None without --fid."""
    if not args.fid:
        return None
    from ..evaluation.fid import bench_fd_metric

    return bench_fd_metric(model.name)


def _report(args: argparse.Namespace, records: Sequence[dict[str, Any]], nfes: Sequence[int]) -> None:
    """After the RMSE table: the FD table (--fid) and the error/FD-vs-NFE chart (--plot FILE)."""
    metrics = ["rmse"]
    if args.fid:
        from ..evaluation.fid import model_feature_network

        key = f"fd_{model_feature_network(args.model)}"
        metrics.append(key)
        header, rows = table_rows(records, nfes, metric=key)
        print_table(header, rows, f"FD-{key[3:]} of the samples vs the shipped reference statistics — {args.model}, "
                    f"{args.n} samples (* best per NFE)")
    if args.plot:
        from ..evaluation.plots import plot_error_vs_nfe

        plot_error_vs_nfe(records, args.plot, title=f"{args.model}: {args.n} samples", metric=metrics)
        console.print(f"wrote {escape(args.plot)}")


def cmd_bench(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    model, conditions = from_args(to_device(load_model(args.model), args.device), args)
    check_artifacts([*args.predictor, *args.learned], conditions)
    model = conditioned_model(model, conditions, range(args.first_seed, args.first_seed + args.n))
    start = time.perf_counter()
    specs = _parse_specs(args.solvers)
    if args.schedules:
        specs = expand_schedules(specs, split_schedules(args.schedules))
    extra = _extra_metrics(args, model)
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
    print_table(header, rows, f"RMSE to the reference solution — {args.model}, {args.n} samples"
                + (", AFS" if args.afs else "") + (f", {conditions.describe()}" if conditions.conditional else "")
                + " (* best per NFE)")
    for r in records:
        if r.get("note"):
            console.print(escape(r["note"]))
    _report(args, records, nfes)
    console.print(f"[dim]{time.perf_counter() - start:.1f} s[/dim]")
    if args.json:
        write_json(args.json, [{**r, "conditions": conditions.to_json()} if conditions.conditional else r
                               for r in records])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the shipped cards and AMED predictors (or, with --train, freshly fitted ones) beside every
    classic solver on a built-in model; table, JSON, plots."""
    from ..demo import DemoSettings, run_demo

    out = Path(args.out)
    check_output_dir(out, "--out")
    model = to_device(load_model(args.model), args.device)
    if model.num_classes:  # the demo samples a conditional model with its null label (its unconditional half)
        console.print(f"{escape(model.name)} is conditional: the demo samples it unconditionally (null label); "
                      "`bench` / `tune` --classes / --guidance run it guided", markup=False)
        model = dataclasses.replace(model, num_classes=0, cond_denoiser=None)
    settings = DemoSettings.of(model)
    n = args.n or settings.n
    records = run_demo(model, out, n=n, kimg=args.kimg or settings.kimg, pool=settings.pool, batch=settings.batch,
                       amed_nfes=args.amed_nfe, card_nfes=args.card_nfe, card_iters=args.card_iters,
                       train=args.train, progress=not args.no_progress,
                       log=lambda text: console.print(text, markup=False))
    nfes = sorted({r["nfe"] for r in records})
    header, rows = table_rows(records, nfes)
    print_table(header, rows, f"RMSE to the reference solution — {model.name}, {n} samples (* best per NFE)")
    console.print(f"wrote {escape(str(out))}/table.md, table.json, error_vs_nfe.png, samples_nfe5.png")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `bench` and `demo`."""
    p = sub.add_parser("bench", help="RMSE to a reference ODE solution for every solver at each NFE",
                       description="Run each solver with its recommended schedule (or the one given) from the "
                                   "same noise and print the RMSE to a Heun reference solve on a polynomial "
                                   "rho = 7 grid of 1000 points for an analytic model, 500 for a network "
                                   "(cached on disk in $FEWSTEP_CACHE or ~/.cache/fewstep).")
    _bench_args(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job: the shipped solver cards and AMED predictors beside every "
                                    "classic solver at NFE 3-10, a card learned live on gmm; table, plot, pictures",
                       description="Benchmark the shipped learned solver cards (`fewstep cards`) and AMED "
                                   "predictors beside every classic solver (with and without AFS) at NFE 3-10 from "
                                   "the same noise against a reference solve, learn one card live on gmm, and write "
                                   "table.md/json, error_vs_nfe.png and samples_nfe5.png. --train fits every "
                                   "predictor and card from scratch instead (minutes).")
    add_model_arg(p, "digits", show_default=True)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="number of evaluation samples, seeds 0…n-1 (default 64 for a network, 256 otherwise)")
    p.add_argument("--train", action="store_true",
                   help="fit the AMED predictors and the cards from scratch instead of using the shipped ones")
    p.add_argument("--kimg", type=positive_float, default=None,
                   help="training trajectories (thousands) per predictor (default 3.2 for a network, 10 otherwise)")
    p.add_argument("--amed-nfe", type=int_list, default=[5],
                   help="NFEs of the AMED predictors (default 5; shipped ones where they exist, else trained)")
    p.add_argument("--card-nfe", type=int_list, default=[3, 5],
                   help="NFEs to learn UniPC solver cards for with --train or a model without shipped cards "
                        "(default 3,5; fewstep learn)")
    p.add_argument("--card-iters", type=int_in(1), default=None,
                   help="training iterations per card (default 150 for a network, 400 otherwise)")
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_demo)
