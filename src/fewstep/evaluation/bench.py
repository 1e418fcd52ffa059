"""The exact-error benchmark: every solver at its recommended schedule, RMSE to the reference per NFE."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import SolverError
from ..models.registry import ModelInfo
from ..noise import seeded_noise
from ..schedules import get_schedule
from ..solvers import get_solver, num_steps_for_nfe, sample
from .reference import reference_solution, rmse

DEFAULT_SOLVERS = ("euler", "heun", "dpm2", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc")
DEFAULT_NFES = (3, 4, 5, 6, 7, 8, 10)


@dataclass
class SolverSpec:
    """A solver with options and a schedule, parsed from 'name[:opt=val,...][@schedule[:rho]]'."""

    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    schedule: str = ""
    rho: float | None = None

    @classmethod
    def parse(cls, text: str) -> SolverSpec:
        """E.g. 'dpmpp:max_order=2', 'ipndm@logsnr', 'deis:deis_mode=rhoab@polynomial:5'."""
        head, _, sched = text.partition("@")
        name, _, opts = head.partition(":")
        options = parse_options(opts.split(","))
        # validate name and options now, not halfway through a benchmark
        default_sched, default_rho = get_solver(name, **options).recommended_schedule
        sched_name, _, rho = sched.partition(":")
        if sched_name in ("gits", "ays"):  # 'gits' (searched per NFE for the model), 'gits:FILE', 'ays:TABLE'
            return cls(name, options, sched, None)
        if rho:
            try:
                value = float(rho)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise SolverError(f"solver spec {text!r}: the schedule's ρ must be a positive number, got {rho!r}")
            return cls(name, options, sched_name or default_sched, value)
        if sched_name in ("", default_sched):
            return cls(name, options, default_sched, default_rho)
        return cls(name, options, sched_name, None)  # that schedule's own default ρ

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.solver + (f"({opts})" if opts else "")

    @property
    def schedule_label(self) -> str:
        return self.schedule + (f"(rho={self.rho:g})" if self.rho is not None else "")


@dataclass(frozen=True)
class Record:
    """One row of a bench or demo table: a method at one NFE, its RMSE to the reference and how it ran.

    `to_json()` is the row as `run_bench` and `run_demo` return it and as table.json / `bench --json` store it
    (the dict `table_rows`, `best_per_nfe` and the plots read); optional fields appear only when set.
    `run_best_classic` marks its best rows with `"best_classic": true` and `bench --json` adds `"conditions"`.
    """

    solver: str  # the table label (options, and " +AFS" in the demo)
    nfe: int
    num_steps: int
    schedule: str  # the schedule label, e.g. "polynomial(rho=7)", or "learned" for a card
    afs: bool
    rmse: float
    seconds: float | None = None  # sampling wall time (bench)
    train_seconds: float | None = None  # training wall time of a predictor or card (demo)
    predictor: str | None = None  # the AMED checkpoint folder (bench --predictor)
    learned: bool = False  # a learned solver card
    card: str | None = None  # the card folder (bench --learned)
    metrics: dict[str, Any] = field(default_factory=dict)  # extra columns, e.g. fd_digits

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"solver": self.solver, "nfe": self.nfe, "num_steps": self.num_steps,
                               "schedule": self.schedule, "afs": self.afs, "rmse": self.rmse}
        optional = {"seconds": self.seconds, "train_seconds": self.train_seconds, "predictor": self.predictor,
                    "learned": self.learned or None, "card": self.card}
        row.update((k, v) for k, v in optional.items() if v is not None)
        return {**row, **self.metrics}


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """['max_order=3', 'predict-x0=false'] → {'max_order': 3, 'predict_x0': False} (numbers and booleans parsed)."""
    out: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in items)):
        key, eq, val = item.partition("=")
        if not eq:
            raise SolverError(f"bad option {item!r}: use key=value")
        out[key.strip().replace("-", "_")] = _parse_value(val.strip())
    return out


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_bench(
    model: ModelInfo,
    specs: Sequence[SolverSpec],
    nfes: Sequence[int] = DEFAULT_NFES,
    n_samples: int = 512,
    first_seed: int = 0,
    afs: bool = False,
    progress: bool = True,
    predictors: Sequence[str | Path] = (),
    extra_metrics: Callable[[Any], dict[str, Any]] | None = None,
    learned: Sequence[str | Path] = (),
) -> list[dict[str, Any]]:
    """RMSE to the reference of each solver spec at each NFE (NFEs a solver cannot hit are skipped), of
    each AMED predictor checkpoint and of each learned solver card at its own NFE — all from the same noise
    against the same reference. `extra_metrics(samples)` adds its columns to each record (e.g.
    `fid.bench_fd_metric`: an FD score). Returns the records as `Record.to_json()` rows."""
    from ..amed.checkpoint import load_checkpoint, sample_checkpoint
    from ..learned import load_card

    seeds = list(range(first_seed, first_seed + n_samples))
    loaded = [(str(p), *load_checkpoint(p, model)) for p in predictors]  # fail early on a bad checkpoint
    cards = [(str(p), load_card(p, model)) for p in learned]
    ref = reference_solution(model, seeds, progress=progress)
    noise = seeded_noise(seeds, model.shape, device=model.device)  # drawn on the CPU, moved once
    records: list[Record] = []
    extra = extra_metrics or (lambda x: {})
    jobs = [(s, n) for s in specs for n in nfes]
    for spec, target in tqdm(jobs, desc="bench", disable=not progress, leave=False):
        steps = num_steps_for_nfe(spec.solver, target, afs=afs, **spec.options)
        if steps is None:
            continue
        sched = bench_schedule(spec, steps, model, afs)
        start = time.perf_counter()
        x = sample(model.denoiser, noise, spec.solver, sched, afs=afs, **spec.options)
        records.append(Record(spec.label, target, steps, spec.schedule_label, afs, rmse(x, ref),
                              seconds=time.perf_counter() - start, metrics=extra(x)))
    for path, predictor, settings in loaded:
        start = time.perf_counter()
        x = sample_checkpoint(model, noise, predictor, settings)
        records.append(Record(settings.label, settings.nfe, settings.num_steps, settings.schedule_label,
                              settings.afs, rmse(x, ref), seconds=time.perf_counter() - start, predictor=path,
                              metrics=extra(x)))
    for path, card in cards:
        start = time.perf_counter()
        x = sample(model.denoiser, noise, card.solver())
        records.append(Record(card.label, card.nfe, card.num_steps, "learned", card.afs, rmse(x, ref),
                              seconds=time.perf_counter() - start, learned=True, card=path, metrics=extra(x)))
    return [r.to_json() for r in records]


# The yardstick of every learned-vs-classic ratio: each classic solver on each of these schedules, AFS on and off.
BEST_CLASSIC_SCHEDULES = ("polynomial:5", "polynomial:7", "logsnr", "time_uniform:1", "time_uniform:2")


def run_best_classic(model: ModelInfo, nfes: Sequence[int], n_samples: int = 512, first_seed: int = 0,
                     progress: bool = True, solvers: Sequence[str] = DEFAULT_SOLVERS,
                     extra_metrics: Callable[[Any], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every classic solver × BEST_CLASSIC_SCHEDULES × AFS off/on at each NFE; the best record per NFE gets
    `"best_classic": true` (see `best_per_nfe`)."""
    specs = expand_schedules([SolverSpec.parse(s) for s in solvers], BEST_CLASSIC_SCHEDULES)
    records = [r for afs in (False, True)
               for r in run_bench(model, specs, nfes, n_samples, first_seed, afs, progress,
                                  extra_metrics=extra_metrics)]
    for r in best_per_nfe(records).values():
        r["best_classic"] = True
    return records


def best_per_nfe(records: Sequence[dict[str, Any]], metric: str = "rmse") -> dict[int, dict[str, Any]]:
    """The record with the lowest `metric` at each NFE."""
    best: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["nfe"] not in best or r[metric] < best[r["nfe"]][metric]:
            best[r["nfe"]] = r
    return best




def bench_schedule(spec: SolverSpec, steps: int, model: ModelInfo, afs: bool = False) -> Any:
    """The schedule of a bench cell: `gits` is searched for the model (default settings, once per process) and
    cut to `steps` points by the DP for this solver and AFS setting; every other name goes to `get_schedule`."""
    if spec.schedule == "gits":
        from ..gits import cached_search

        return cached_search(model).schedule(steps, afs=afs, solver=spec.solver, solver_options=spec.options)[0]
    return get_schedule(spec.schedule, steps, model.sigma_min, model.sigma_max, rho=spec.rho, model=model)


def expand_schedules(specs: Sequence[SolverSpec], schedules: Sequence[str]) -> list[SolverSpec]:
    """Every solver spec on every schedule: 'polynomial', 'logsnr', 'time_uniform', 'name:rho', 'gits' (searched
    per NFE), 'gits:FILE', 'ays:TABLE' — the solver × schedule × NFE grid of `fewstep bench --schedules`."""
    from ..schedules import DEFAULT_RHO, SCHEDULE_NAMES

    out: list[SolverSpec] = []
    for text in (s.strip() for s in schedules):
        if not text:
            continue
        name, _, arg = text.partition(":")
        if name not in SCHEDULE_NAMES or name == "custom":
            raise SolverError(f"unknown bench schedule {text!r}; use polynomial, logsnr, time_uniform, discrete "
                              "(optionally name:rho), gits, gits:FILE or ays:TABLE")
        for spec in specs:
            if name in ("gits", "ays"):
                new = SolverSpec(spec.solver, dict(spec.options), text, None)
            else:
                try:
                    rho = float(arg) if arg else DEFAULT_RHO.get(name)
                except ValueError:
                    raise SolverError(f"bad rho in bench schedule {text!r}: use name:number") from None
                new = SolverSpec(spec.solver, dict(spec.options), name, rho)
            if new not in out:
                out.append(new)
    return out


def table_rows(records: Sequence[dict[str, Any]], nfes: Sequence[int],
               metric: str = "rmse") -> tuple[list[str], list[list[str]]]:
    """A solver × NFE grid of `metric` strings ('–' where a solver cannot hit that NFE), best per column marked *."""
    header = ["solver", "schedule", *[f"NFE {n}" for n in nfes]]
    best = {n: min((r[metric] for r in records if r["nfe"] == n), default=math.inf) for n in nfes}
    rows: dict[tuple[str, str], list[str]] = {}
    mixed_afs = len({bool(r.get("afs")) for r in records}) > 1  # label the AFS rows only when both kinds are present
    for r in records:
        if r["nfe"] not in nfes:
            continue
        marked = r["solver"].endswith(" +AFS")  # the demo's labels carry it already
        label = r["solver"] + (" +AFS" if mixed_afs and r.get("afs") and not r.get("learned") and not marked else "")
        row = rows.setdefault((label, r["schedule"]), ["–"] * len(nfes))
        mark = "*" if r[metric] == best[r["nfe"]] else ""
        row[list(nfes).index(r["nfe"])] = f"{r[metric]:.4f}{mark}"
    return header, [[s, sch, *cells] for (s, sch), cells in rows.items()]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"

