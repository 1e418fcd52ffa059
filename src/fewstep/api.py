"""`fewstep.sample`, `fewstep.nfe` and `fewstep.num_steps_for_nfe`: the core's functions, which take any solver
object (an AMED-Plugin is `fewstep.amed.solver.AMEDPlugin(base, predictor, bottleneck)`), plus `solver="auto"`
(the default: the shipped card of a built-in model, else the classic rule; `fewstep.shipped`) and the previous
release's AMED keywords (`predictor=`, `bottleneck=`; `amed=True`), kept for one release with a
DeprecationWarning."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from .amed.solver import AMEDPlugin
from .errors import SolverError
from .frames import frame_of
from .methods import resolve_method
from .models.registry import FLOW_T_MIN, ModelInfo
from .solvers import driver, resolve
from .solvers import nfe as _nfe
from .solvers import num_steps_for_nfe as _num_steps_for_nfe

_SAMPLE_KEYWORDS = frozenset(p.name for p in inspect.signature(driver.sample).parameters.values()
                             if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _deprecated(old: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release: pass the solver "
                  "fewstep.amed.solver.AMEDPlugin(base, predictor, bottleneck) instead", DeprecationWarning,
                  stacklevel=3)


def sample(denoiser: Any, noise: torch.Tensor, solver: Any = "auto", schedule: torch.Tensor | None = None, *,
           nfe: int | None = None, predictor: Any = None, bottleneck: torch.nn.Module | None = None,
           **kwargs: Any) -> torch.Tensor:
    if isinstance(solver, str) and solver == "auto":
        return _sample_auto(denoiser, noise, schedule, nfe, predictor, bottleneck, kwargs)
    if nfe is not None:
        raise SolverError("nfe= is for solver='auto'; with a named solver give a schedule or num_steps")
    if isinstance(denoiser, ModelInfo):
        denoiser = denoiser.denoiser
    if predictor is None and bottleneck is None:
        return driver.sample(denoiser, noise, solver, schedule, **kwargs)
    _deprecated("fewstep.sample(..., predictor=, bottleneck=)")
    if predictor is None:  # as before: a bottleneck without a predictor changes nothing
        return driver.sample(denoiser, noise, solver, schedule, **kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _SAMPLE_KEYWORDS}
    with torch.no_grad():
        return driver.sample(denoiser, noise, AMEDPlugin(resolve(solver, options), predictor, bottleneck),
                             schedule, **kwargs)


def _sample_auto(denoiser: Any, noise: torch.Tensor, schedule: torch.Tensor | None, nfe: int | None,
                 predictor: Any, bottleneck: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """`solver="auto"` at `nfe` calls: on a ModelInfo (`fewstep.load_model`, conditions bound by
    `conditioning.conditioned_model`) its card or the classic rule, on a plain denoiser the classic rule of its
    frame on the frame's default range (EDM σ 0.002–80, flow t from 1 to 1e-3)."""
    if schedule is not None or kwargs.get("num_steps") is not None or kwargs.get("afs") is not None:
        raise SolverError("solver='auto' picks the grid and AFS itself: pass nfe= only (or name a solver to run "
                          "on your schedule)")
    if predictor is not None or bottleneck is not None:
        raise SolverError("predictor= / bottleneck= need a named solver, not 'auto'")
    if nfe is None:
        raise SolverError("solver='auto' needs nfe= (model calls per sample)")
    model = denoiser
    if not isinstance(model, ModelInfo):
        frame = frame_of(denoiser)
        low, high = (FLOW_T_MIN, 1.0) if frame.final_denoise else (0.002, 80.0)
        model = ModelInfo("", denoiser, tuple(noise.shape[1:]), low, high, frame=frame)
    method = resolve_method("auto", model, nfe=nfe)
    return driver.sample(model.denoiser, noise, method.solver, method.grid, afs=method.afs, **kwargs)


sample.__doc__ = f"""{(driver.sample.__doc__ or "").rstrip()}
    `solver="auto"` (the default) needs `nfe=` and picks the method: on a model from `fewstep.load_model` the
    shipped card for that model, NFE and bound conditions (`fewstep cards`), else the classic rule of the
    model's frame (`fewstep.shipped.CLASSIC_RULE`); on a plain denoiser the classic rule. `denoiser` may be such
    a model (its `denoiser` is sampled).
    The AMED-Plugin of a solver is the solver `fewstep.amed.solver.AMEDPlugin(base, predictor, bottleneck)`
    (deprecated: `predictor=` / `bottleneck=` with the base solver's name).
    """


def nfe(solver: Any, num_steps: int, afs: bool = False, denoise_to_zero: bool = False, amed: bool = False,
        **options: Any) -> int:
    """`fewstep.solvers.nfe`: the number of denoiser calls of a run (`amed=True`: deprecated, counts the
    AMED-Plugin of `solver`)."""
    if amed:
        _deprecated("fewstep.nfe(..., amed=True)")
        solver, options = AMEDPlugin(resolve(solver, options)), {}
    return _nfe(solver, num_steps, afs, denoise_to_zero, **options)


def num_steps_for_nfe(solver: Any, target_nfe: int, afs: bool = False, amed: bool = False,
                      **options: Any) -> int | None:
    """`fewstep.solvers.num_steps_for_nfe` (`amed=True`: deprecated, the AMED-Plugin of `solver`)."""
    if amed:
        _deprecated("fewstep.num_steps_for_nfe(..., amed=True)")
        solver, options = AMEDPlugin(resolve(solver, options)), {}
    return _num_steps_for_nfe(solver, target_nfe, afs, **options)
