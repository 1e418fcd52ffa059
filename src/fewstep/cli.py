"""The `fewstep` command line: benchmarks, listings and the demo (run `fewstep COMMAND --help`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import FewstepError
from .evaluation.bench import DEFAULT_NFES, DEFAULT_SOLVERS, SolverSpec, markdown_table, run_bench, table_rows
from .io import write_json, write_text
from .models import BUILTIN_MODELS, DEFAULT_MODEL, load_model
from .solvers import RECOMMENDED_SCHEDULE, SOLVERS

console = Console(width=None if sys.stdout.isatty() else 200)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
    table = Table(title=title or None)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    console.print(table)


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(BUILTIN_MODELS),
                   help=f"built-in model (default {DEFAULT_MODEL})")
    p.add_argument("--nfe", type=_int_list, default=list(DEFAULT_NFES),
                   help="comma-separated NFE budgets (default 3,4,5,6,7,8,10)")
    p.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                   help="solvers to run, ';'-separated specs 'name[:opt=val,...][@schedule[:rho]]', or a "
                        "plain comma list of names; each uses its recommended schedule unless given "
                        "(e.g. 'ipndm;dpmpp:max_order=2;deis:deis_mode=rhoab@polynomial:7')")
    p.add_argument("--n", type=int, default=512, help="number of samples (seeds first-seed…first-seed+n-1)")
    p.add_argument("--first-seed", type=int, default=0, help="first noise seed (default 0)")
    p.add_argument("--afs", action="store_true", help="analytical first step for every solver (saves one NFE)")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parse_specs(text: str) -> list[SolverSpec]:
    parts = text.split(";") if (";" in text or ":" in text or "@" in text) else text.split(",")
    return [SolverSpec.parse(p.strip()) for p in parts if p.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    start = time.perf_counter()
    records = run_bench(model, _parse_specs(args.solvers), args.nfe, n_samples=args.n,
                        first_seed=args.first_seed, afs=args.afs, progress=not args.no_progress)
    header, rows = table_rows(records, args.nfe)
    _print_table(header, rows, f"RMSE to the reference solution — {args.model}, {args.n} samples"
                 + (", AFS" if args.afs else "") + " (* best per NFE)")
    console.print(f"[dim]{time.perf_counter() - start:.1f} s[/dim]")
    if args.json:
        write_json(args.json, records)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: benchmark every solver on the default model and write table, JSON and plot."""
    from .evaluation.plots import plot_error_vs_nfe

    out = Path(args.out)
    model = load_model(args.model)
    start = time.perf_counter()
    nfes = list(DEFAULT_NFES)
    records = run_bench(model, _parse_specs(",".join(DEFAULT_SOLVERS)), nfes, n_samples=args.n,
                        progress=not args.no_progress)
    header, rows = table_rows(records, nfes)
    title = f"RMSE to the reference solution — {model.name} ({model.description}), {args.n} samples"
    _print_table(header, rows, title)
    write_text(out / "table.md", f"# {title}\n\n" + markdown_table(header, rows))
    write_json(out / "table.json", records)
    plot_error_vs_nfe(records, out / "error_vs_nfe.png", title=f"{model.name}: error vs NFE")
    console.print(f"wrote {out}/table.md, table.json, error_vs_nfe.png in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_solvers(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in SOLVERS.items():
        opts = ", ".join(f"{k}={o.default}" for k, o in cls.options.items()) or "–"
        sched, rho = RECOMMENDED_SCHEDULE.get(name, ("", None))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="RMSE to the exact ODE solution for every solver at each NFE",
                       description="Run each solver with its recommended schedule (or the one given) from the "
                                   "same noise and print the RMSE to a 1000-step Heun reference (cached on disk "
                                   "in $FEWSTEP_CACHE or ~/.cache/fewstep).")
    _bench_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job: benchmark all solvers on the default model, write table + plot")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(BUILTIN_MODELS), help="built-in model")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--n", type=int, default=512, help="number of evaluation samples")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("solvers", help="list the solvers, their options and recommended schedules")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_solvers)

    p = sub.add_parser("models", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FewstepError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
