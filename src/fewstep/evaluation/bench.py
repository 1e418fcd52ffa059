"""The exact-error benchmark: every solver at its recommended schedule, RMSE to the reference per NFE."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import SolverError
from ..methods import ARG_SCHEDULES, Method, SolverSpec, UnreachableNFE, resolve_method
from ..models.registry import ModelInfo
from ..noise import seeded_noise
from ..reference import reference_solution, rmse
from ..solvers import sample

DEFAULT_SOLVERS = ("euler", "heun", "dpm2", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc",
                   "gradient_estimation")
DEFAULT_NFES = (3, 4, 5, 6, 7, 8, 10)


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
    note: str | None = None  # what `auto` chose at this NFE
    metrics: dict[str, Any] = field(default_factory=dict)  # extra columns, e.g. fd_digits

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"solver": self.solver, "nfe": self.nfe, "num_steps": self.num_steps,
                               "schedule": self.schedule, "afs": self.afs, "rmse": self.rmse}
        optional = {"seconds": self.seconds, "train_seconds": self.train_seconds, "predictor": self.predictor,
                    "learned": self.learned or None, "card": self.card, "note": self.note}
        row.update((k, v) for k, v in optional.items() if v is not None)
        return {**row, **self.metrics}


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
    """RMSE to the reference of each method spec at each NFE (NFEs a solver cannot hit are skipped; a card or
    checkpoint runs once, at its own NFE), then of each AMED checkpoint in `predictors` and each card in
    `learned` — all from the same noise against the same reference. `afs` applies to the specs without '+afs'.
    `extra_metrics(samples)` adds its columns to each record (e.g. `fid.bench_fd_metric`: an FD score).
    Returns the records as `Record.to_json()` rows."""
    specs = [*specs, *(SolverSpec("amed", path=str(p)) for p in predictors),
             *(SolverSpec("learned", path=str(p)) for p in learned)]
    artifacts = [resolve_method(s, model) if s.path else None for s in specs]  # fail early on a bad checkpoint
    seeds = list(range(first_seed, first_seed + n_samples))
    ref = reference_solution(model, seeds, progress=progress)
    noise = seeded_noise(seeds, model.shape, model.state_dtype, model.device)  # drawn on the CPU, moved once
    methods: list[Method] = []
    for spec, artifact in zip(specs, artifacts):
        methods += [artifact] if artifact else classic_methods(model, [spec], nfes, afs)
    rows = measure(model, methods, noise, ref, extra_metrics)
    return [record.to_json() for record, _ in tqdm(rows, total=len(methods), desc="bench", disable=not progress,
                                                    leave=False)]


def classic_methods(model: ModelInfo, specs: Sequence[SolverSpec], nfes: Sequence[int],
                    afs: bool = False) -> list[Method]:
    """Each classic spec at each NFE it can use exactly (`afs` for the specs without '+afs'), spec by spec."""
    out = []
    for spec in specs:
        for target in nfes:
            try:
                out.append(resolve_method(spec, model, nfe=target, afs=None if spec.solver == "auto" else afs))
            except UnreachableNFE:
                continue
    return out


def measure(model: ModelInfo, methods: Iterable[Method], noise: torch.Tensor, ref: torch.Tensor,
            extra_metrics: Callable[[Any], dict[str, Any]] | None = None) -> Iterator[tuple[Record, torch.Tensor]]:
    """The bench loop: each method sampled from `noise`, its record (RMSE to `ref`, wall time, extra metrics)
    and its samples."""
    extra = extra_metrics or (lambda x: {})
    for method in methods:
        start = time.perf_counter()
        with torch.no_grad():
            x = sample(model.denoiser, noise, method.solver, method.grid, afs=method.afs)
        seconds = time.perf_counter() - start
        kind = method.spec.solver if method.artifact else ""
        yield Record(method.label, method.nfe, method.num_steps, method.schedule_label, method.afs, rmse(x, ref),
                     seconds=seconds, predictor=method.spec.path if kind == "amed" else None,
                     learned=kind == "learned", card=method.spec.path if kind == "learned" else None,
                     note=method.note or None, metrics=extra(x)), x


# The yardstick of every learned-vs-classic ratio: each classic solver on each of these schedules, AFS on and off.
BEST_CLASSIC_SCHEDULES = ("polynomial:5", "polynomial:7", "logsnr", "time_uniform:1", "time_uniform:2", "kl_optimal")
# On flow models (flow time t): the pipelines' grids (no shift, SD3's shift 3, Flux's dynamic shift from the size),
# Karras spacing in t (polynomial), DEIS's time_uniform:2, the published FLUX Optimal-Steps grid and kl_optimal.
FLOW_BEST_CLASSIC_SCHEDULES = ("flow:shift=1", "flow:shift=3", "flow:dynamic", "polynomial:5", "polynomial:7",
                               "time_uniform:2", "oss:flux", "kl_optimal")


def best_classic_schedules(model: ModelInfo) -> tuple[str, ...]:
    """The schedules of the best-classic sweep for this model's frame."""
    return FLOW_BEST_CLASSIC_SCHEDULES if model.frame.final_denoise else BEST_CLASSIC_SCHEDULES


def run_best_classic(model: ModelInfo, nfes: Sequence[int], n_samples: int = 512, first_seed: int = 0,
                     progress: bool = True, solvers: Sequence[str] = DEFAULT_SOLVERS,
                     extra_metrics: Callable[[Any], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every classic solver × `best_classic_schedules(model)` × AFS off/on at each NFE; the best record per NFE
    gets `"best_classic": true` (see `best_per_nfe`)."""
    specs = expand_schedules([SolverSpec.parse(s) for s in solvers], best_classic_schedules(model))
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


def split_schedules(text: str) -> list[str]:
    """A comma-separated schedule list, where a flow schedule's own options keep their commas:
    'flow:shift=3,spacing=karras,polynomial:5' → ['flow:shift=3,spacing=karras', 'polynomial:5']."""
    from ..schedules import SCHEDULE_NAMES

    names = "|".join(re.escape(n) for n in SCHEDULE_NAMES)
    return [part.strip() for part in re.split(rf",(?=\s*(?:{names})\b)", text) if part.strip()]


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
            if spec.path:  # a card or checkpoint runs on its own grid
                new = spec
            elif name in ARG_SCHEDULES:
                new = SolverSpec(spec.solver, dict(spec.options), text, None, spec.afs)
            else:
                try:
                    rho = float(arg) if arg else DEFAULT_RHO.get(name)
                except ValueError:
                    raise SolverError(f"bad rho in bench schedule {text!r}: use name:number") from None
                new = SolverSpec(spec.solver, dict(spec.options), name, rho, spec.afs)
            if new not in out:
                out.append(new)
    return out


def table_rows(records: Sequence[dict[str, Any]], nfes: Sequence[int],
               metric: str = "rmse") -> tuple[list[str], list[list[str]]]:
    """A solver × NFE grid of `metric` strings ('–' where a solver cannot hit that NFE), best per column marked *.
    `auto` is one row: its choice per NFE is in the records' notes."""
    header = ["solver", "schedule", *[f"NFE {n}" for n in nfes]]
    best = {n: min((r[metric] for r in records if r["nfe"] == n), default=math.inf) for n in nfes}
    rows: dict[tuple[str, str], list[str]] = {}
    mixed_afs = len({bool(r.get("afs")) for r in records}) > 1  # label the AFS rows only when both kinds are present
    for r in records:
        if r["nfe"] not in nfes:
            continue
        auto = r["solver"] == "auto"
        marked = r["solver"].endswith(" +AFS") or auto  # the demo's labels carry it already
        label = r["solver"] + (" +AFS" if mixed_afs and r.get("afs") and not r.get("learned") and not marked else "")
        row = rows.setdefault((label, "per NFE" if auto else r["schedule"]), ["–"] * len(nfes))
        mark = "*" if r[metric] == best[r["nfe"]] else ""
        row[list(nfes).index(r["nfe"])] = f"{r[metric]:.4f}{mark}"
    return header, [[s, sch, *cells] for (s, sch), cells in rows.items()]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"

