"""One way to name a sampling method, for every command and integration.

A method spec is one string:

* `NAME[:opt=val,...][@SCHEDULE[:rho]][+afs]`: a registered solver with options, on a schedule (default: its
  recommended one), with AFS; e.g. `dpmpp:max_order=2@logsnr+afs`, `deis@time_uniform:2`, `ipndm@gits`.
* `learned:DIR`: a learned solver card (`fewstep learn`); it brings its own grid, AFS and NFE.
* `auto`: the best method fewstep knows for the model and NFE (`fewstep.shipped.find_card`): a card fitted to
  this model, NFE and conditions (the user's own, then the shipped ones), else the classic rule of its frame.
* `amed:DIR`: an AMED predictor checkpoint (`fewstep train`): the AMED-Plugin of its student, on its grid, with
  its AFS and NFE. (`amed` alone, or with options, is AMED-Solver without a predictor, a registered solver.)

`load_solver_spec` makes the solver object of a spec (the one place that chooses between a classic solver, a card
and a checkpoint); `resolve_method` adds what a run on one model needs: the σ grid, AFS and NFE, and how tables
and manifests name the method. `sample`, `bench`, the demo, `FewstepScheduler` and the k-diffusion samplers all
go through them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FewstepError, SolverError
from .frames import EDM
from .schedules import get_schedule
from . import solvers
from .solvers import Solver, get_solver

ARTIFACTS = ("learned", "amed")  # spec prefixes naming a folder
ARG_SCHEDULES = ("gits", "ays", "flow", "oss")  # schedules whose ':' part is an argument, not ρ


class UnreachableNFE(FewstepError):
    """A classic solver cannot use exactly the requested NFE (with this AFS setting)."""


@dataclass
class SolverSpec:
    """A parsed method spec (module docstring). `solver` is a registered name, or 'learned' / 'amed' with the
    artifact's folder in `path`; `schedule` and `rho` are filled in with the solver's recommended ones when the
    spec names none; `afs` is None unless the spec says '+afs'."""

    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    schedule: str = ""
    rho: float | None = None
    afs: bool | None = None
    path: str = ""
    # True when `schedule` is the solver's recommended one filled in for a spec naming none: a model with a
    # schedule of its own (`ModelInfo.schedule`, e.g. a flow pipeline's shifted grid) replaces it
    default_schedule: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> SolverSpec:
        """E.g. 'dpmpp:max_order=2', 'ipndm@logsnr+afs', 'deis:deis_mode=rhoab@polynomial:5', 'learned:DIR'."""
        text = text.strip()
        if text == "auto":
            return cls("auto")
        kind, colon, rest = text.partition(":")
        if kind == "learned" or (kind == "amed" and colon and "=" not in rest.partition("@")[0]):
            if not rest.strip():
                raise SolverError(f"solver spec {text!r}: give the folder after '{kind}:'")
            return cls(kind, path=rest.strip())
        afs = text.endswith("+afs") or None
        head, _, sched = text.removesuffix("+afs").partition("@")
        name, _, opts = head.partition(":")
        options = parse_options(opts.split(","))
        # validate name and options now, not halfway through a benchmark
        default_sched, default_rho = get_solver(name, **options).recommended_schedule
        sched_name, _, rho = sched.partition(":")
        if sched_name in ARG_SCHEDULES:  # 'gits' (searched per NFE), 'gits:FILE', 'ays:TABLE', 'flow:…', 'oss:…'
            return cls(name, options, sched, None, afs)
        if rho:
            try:
                value = float(rho)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise SolverError(f"solver spec {text!r}: the schedule's ρ must be a positive number, got {rho!r}")
            return cls(name, options, sched_name or default_sched, value, afs)
        if sched_name in ("", default_sched):
            return cls(name, options, default_sched, default_rho, afs, default_schedule=not sched_name)
        return cls(name, options, sched_name, None, afs)  # that schedule's own default ρ

    @property
    def label(self) -> str:
        """A classic solver as tables name it, e.g. 'dpmpp(max_order=2)'."""
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.solver + (f"({opts})" if opts else "")

    @property
    def schedule_label(self) -> str:
        return schedule_label(self.schedule, self.rho)


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


def schedule_label(name: str, rho: float | None) -> str:
    """A schedule as tables show it, e.g. 'time_uniform(rho=1)', 'logsnr', 'learned'."""
    return name + (f"(rho={rho:g})" if rho is not None else "")


@dataclass(frozen=True)
class LoadedSolver:
    """The solver object of a spec, and what a card or checkpoint fixes: its AFS (None: the caller's setting)
    and the artifact itself (`card`, or `settings` of a checkpoint)."""

    solver: Solver
    afs: bool | None = None
    card: Any = None
    settings: Any = None


def load_solver_spec(spec: SolverSpec, model: Any = None, bottleneck: nn.Module | None = None) -> LoadedSolver:
    """The solver object of `spec`: a registered solver, a card's `LearnedSolver`, or the `AMEDPlugin` of a
    checkpoint (reading the `bottleneck` module's output). With `model`, an artifact made for another model is
    refused."""
    if spec.solver == "learned":
        from .learned import load_card

        card = load_card(spec.path, model)
        return LoadedSolver(card.solver(), card.afs, card=card)
    if spec.solver == "amed" and spec.path:
        from .amed.checkpoint import load_checkpoint

        predictor, settings = load_checkpoint(spec.path, model)
        return LoadedSolver(settings.solver(predictor, bottleneck), settings.afs, settings=settings)
    return LoadedSolver(get_solver(spec.solver, **spec.options), spec.afs)


@dataclass(frozen=True)
class Method:
    """A method ready to run on one model: `fewstep.sample(denoiser, noise, solver, grid, afs=afs)` makes `nfe`
    denoiser calls. `label` and `schedule` name it in tables; `record` holds the manifest keys that identify a
    card or checkpoint; `conditions` the condition distribution it was made for (None: a classic solver)."""

    spec: SolverSpec
    solver: Solver
    grid: torch.Tensor
    afs: bool
    nfe: int
    label: str
    schedule: dict[str, Any]  # {"name", "rho"}: "learned" for a card's own grid
    record: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, Any] | None = None
    note: str = ""  # why `auto` chose this method (printed by the commands)

    @property
    def num_steps(self) -> int:
        return len(self.grid)

    @property
    def schedule_label(self) -> str:
        return schedule_label(self.schedule["name"], self.schedule["rho"])

    @property
    def artifact(self) -> bool:
        """A card or a checkpoint (its own grid and NFE), not a classic solver."""
        return bool(self.spec.path)

    def manifest_solver(self) -> tuple[str, dict[str, Any]]:
        """(solver name, its options with defaults filled in) as sampling manifests record them: the student of
        a checkpoint, 'learned' for a card."""
        if self.spec.solver == "learned":
            return "learned", {}
        base = getattr(self.solver, "base", self.solver)  # the AMED-Plugin's student
        return base.name, {k: getattr(base, k) for k in base.options}


def resolve_method(spec: str | SolverSpec, model: Any, nfe: int | None = None, num_steps: int | None = None,
                   afs: bool | None = None, conditions: Any = None, card_dirs: Sequence[str | Path] = ()) -> Method:
    """`spec` on `model` (a ModelInfo): a classic solver at `nfe` calls (or on `num_steps` grid points) with
    `afs` unless the spec says '+afs'; a card or checkpoint at its own grid, AFS and NFE (a different `nfe`, or
    `afs=True` for an artifact without AFS, is refused); `auto` at `nfe` for the `conditions` in use (a
    ConditionSpec; None: those bound into the model, if any), searching `card_dirs` before the shipped cards.
    Raises UnreachableNFE when a classic solver cannot use exactly `nfe` calls."""
    spec = SolverSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.solver == "auto":
        return _auto_method(model, nfe, num_steps, afs, conditions, card_dirs)
    loaded = load_solver_spec(spec, model, getattr(model, "bottleneck", None))
    if spec.path:
        method = _artifact_method(spec, loaded, model)
        if nfe is not None and nfe != method.nfe:
            raise FewstepError(f"--nfe {nfe}: {spec.solver}:{spec.path} was made for NFE {method.nfe}")
        if afs and not method.afs:
            raise FewstepError(f"--afs: {spec.solver}:{spec.path} was made without AFS")
        return method
    use_afs = bool(spec.afs if spec.afs is not None else afs)
    final = final_denoise(model)
    if spec.default_schedule and getattr(model, "schedule", ""):
        spec = dataclasses.replace(spec, schedule=model.schedule, rho=None, default_schedule=False)
    if num_steps is None:
        if nfe is None:
            raise FewstepError("give an NFE budget or num_steps")
        num_steps = solvers.num_steps_for_nfe(loaded.solver, nfe, afs=use_afs, denoise_to_zero=final)
        if num_steps is None:
            raise UnreachableNFE(f"{spec.label} cannot use exactly {nfe} NFE" + ("" if use_afs else "; try --afs"))
    grid = spec_grid(spec, num_steps, model, use_afs)
    return Method(spec, loaded.solver, grid, use_afs,
                  solvers.nfe(loaded.solver, len(grid), afs=use_afs, denoise_to_zero=final), spec.label,
                  {"name": spec.schedule, "rho": spec.rho})


def _auto_method(model: Any, nfe: int | None, num_steps: int | None, afs: bool | None, conditions: Any,
                 card_dirs: Sequence[str | Path]) -> Method:
    """`auto`: the card `fewstep.shipped.find_card` finds, else the first spec of the classic rule of the model's
    frame that reaches exactly `nfe` calls (iPNDM reaches any), on the model's own schedule where it has one (a
    pipeline's shifted grid); the choice in the record and the note."""
    from .shipped import find_card, rule_specs

    if num_steps is not None or afs:
        raise FewstepError("--solver auto picks the grid and AFS itself: give --nfe only (or name a solver)")
    if nfe is None:
        raise FewstepError("--solver auto needs an NFE budget: --nfe N (model calls per sample, e.g. 5)")
    card, why = find_card(model, nfe, conditions if conditions is not None else getattr(model, "conditions", None),
                           card_dirs)
    if card is not None:
        method = resolve_method(SolverSpec("learned", path=str(card.path)), model, nfe=nfe)
        kind = "shipped card" if card.set else "card"
        test = (f", test RMSE {card.row['learned_rmse']:.4f} vs best classic {card.row['best_classic_rmse']:.4f}"
                if card.row else "")
        return dataclasses.replace(method, label="auto", record={**method.record, "auto": {"choice": kind,
                                                                                          "card": card.name}},
                                   note=f"auto at NFE {nfe}: {kind} {card.name}{test}")
    for text in [*rule_specs(getattr(model, "frame", EDM).name, nfe), "ipndm"]:
        if getattr(model, "schedule", ""):  # a pipeline's own grid (its shift) beats the rule's generic one
            text = f"{text.partition('@')[0].removesuffix('+afs')}@{model.schedule}" + ("+afs" if "+afs" in text
                                                                                         else "")
        try:
            method = resolve_method(text, model, nfe=nfe)
        except UnreachableNFE:
            continue
        return dataclasses.replace(method, label="auto", record={
            **method.record, "auto": {"choice": "classic rule", "spec": text, "note": why}},
            note=f"auto at NFE {nfe}: classic rule {text} ({why})")
    raise UnreachableNFE(f"no classic solver reaches exactly {nfe} NFE")


def final_denoise(model: Any) -> bool:
    """Whether a run on `model` ends with the frame's step to 0 (flow models: x₀ = D(x, t_min), one more call)."""
    return getattr(model, "frame", EDM).final_denoise


def spec_grid(spec: SolverSpec, num_steps: int, model: Any, afs: bool = False) -> torch.Tensor:
    """The grid of a classic spec: `gits` is searched for the model (default settings, once per process) and cut
    to `num_steps` points by the DP for this solver and AFS setting; every other name goes to `get_schedule`."""
    if spec.schedule == "gits":
        from .gits import cached_search

        return cached_search(model).schedule(num_steps, afs=afs, solver=spec.solver, solver_options=spec.options)[0]
    return get_schedule(spec.schedule, num_steps, model.sigma_min, model.sigma_max, rho=spec.rho, model=model)


def _artifact_method(spec: SolverSpec, loaded: LoadedSolver, model: Any) -> Method:
    """A card or a checkpoint: its grid, AFS, NFE, label, the manifest keys that identify it."""
    from .manifest import file_fingerprint

    folder = Path(spec.path)
    if loaded.card is not None:
        card = loaded.card
        grid = loaded.solver.grid
        record = {"card": {"fingerprint": file_fingerprint(folder / "card.json"), "label": card.label}}
        return Method(spec, loaded.solver, grid, card.afs,
                      solvers.nfe(loaded.solver, len(grid), afs=card.afs, denoise_to_zero=final_denoise(model)),
                      card.label, {"name": "learned", "rho": None}, record, card.conditions)
    from .amed.checkpoint import SETTINGS, WEIGHTS

    st = loaded.settings
    grid = st.schedule_tensor()
    raw = json.loads((folder / SETTINGS).read_text())
    record = {"predictor": {"fingerprint": file_fingerprint(folder / WEIGHTS, folder / SETTINGS),
                            "settings": {k: v for k, v in raw.items() if k not in ("training", "predictor")}},
              "predictor_path": str(folder.resolve())}
    return Method(spec, loaded.solver, grid, st.afs,
                  solvers.nfe(loaded.solver, len(grid), afs=st.afs, denoise_to_zero=final_denoise(model)), st.label,
                  {"name": st.schedule, "rho": st.rho}, record, st.conditions)
