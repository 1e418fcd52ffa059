"""`fewstep.sample`, `fewstep.nfe` and `fewstep.num_steps_for_nfe`: the core's functions, which take any solver
object (an AMED-Plugin is `fewstep.amed.solver.AMEDPlugin(base, predictor, bottleneck)`), plus the previous
release's AMED keywords (`predictor=`, `bottleneck=`; `amed=True`), kept for one release with a
DeprecationWarning."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from .amed.solver import AMEDPlugin
from .solvers import driver, resolve
from .solvers import nfe as _nfe
from .solvers import num_steps_for_nfe as _num_steps_for_nfe

_SAMPLE_KEYWORDS = frozenset(p.name for p in inspect.signature(driver.sample).parameters.values()
                             if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _deprecated(old: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release: pass the solver "
                  "fewstep.amed.solver.AMEDPlugin(base, predictor, bottleneck) instead", DeprecationWarning,
                  stacklevel=3)


def sample(denoiser: driver.Denoiser, noise: torch.Tensor, solver: Any = "euler",
           schedule: torch.Tensor | None = None, *, predictor: Any = None, bottleneck: torch.nn.Module | None = None,
           **kwargs: Any) -> torch.Tensor:
    if predictor is None and bottleneck is None:
        return driver.sample(denoiser, noise, solver, schedule, **kwargs)
    _deprecated("fewstep.sample(..., predictor=, bottleneck=)")
    if predictor is None:  # as before: a bottleneck without a predictor changes nothing
        return driver.sample(denoiser, noise, solver, schedule, **kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _SAMPLE_KEYWORDS}
    with torch.no_grad():
        return driver.sample(denoiser, noise, AMEDPlugin(resolve(solver, options), predictor, bottleneck),
                             schedule, **kwargs)


sample.__doc__ = f"""{(driver.sample.__doc__ or "").rstrip()}
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
