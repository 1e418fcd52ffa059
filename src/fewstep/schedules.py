"""Time schedules: strictly decreasing σ grids t_0 = σ_max > … > t_{N-1} = σ_min (docs/maths.md §3).

Every schedule is returned as a 1-D float64 tensor of N points (`num_steps` counts points, not intervals).
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .ays import ays
from .errors import ModelError, ScheduleError
from .flow import dynamic_mu, flow_grid, oss_grid, parse_flow_arg, shift_time
from .io import write_json

DEFAULT_SIGMA_MIN = 0.002
DEFAULT_SIGMA_MAX = 80.0
FILE_FORMAT = "fewstep-schedule"
RANGE_RTOL = 1e-4  # a schedule file's endpoints must equal the model's σ range to this relative tolerance
VP_EPS_S = 1e-3  # the smallest VP time of the fitted VP-linear SDE


def check_schedule(sigmas: torch.Tensor | Sequence[float], name: str = "schedule") -> torch.Tensor:
    """Validate a σ grid and return it as float64: 1-D, ≥ 2 points, finite, positive, strictly decreasing."""
    t = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if t.ndim != 1:
        raise ScheduleError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() < 2:
        raise ScheduleError(f"{name} needs at least 2 points (num_steps >= 2), got {t.numel()}")
    if bool((torch.isfinite(t) & (t > 0)).all() & (t[1:] < t[:-1]).all()):
        return t  # valid (one check for the common case; the messages below say what is wrong)
    if not torch.isfinite(t).all():
        raise ScheduleError(f"{name} contains non-finite values: {t.tolist()}")
    if (t <= 0).any():
        raise ScheduleError(f"{name} must be positive (use denoise_to_zero for a final σ = 0): {t.tolist()}")
    diffs = t[1:] - t[:-1]
    if (diffs >= 0).any():
        i = int(torch.nonzero(diffs >= 0)[0])
        raise ScheduleError(
            f"{name} must be strictly decreasing; point {i + 1} ({t[i + 1].item():g}) "
            f">= point {i} ({t[i].item():g})"
        )
    return t


def _check_range(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 2:
        raise ScheduleError(f"num_steps must be an integer >= 2 (it counts grid points), got {num_steps!r}")
    for label, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not (math.isfinite(v) and v > 0):
            raise ScheduleError(f"{label} must be positive and finite, got {v!r}")
    if sigma_min >= sigma_max:
        raise ScheduleError(f"sigma_min ({sigma_min:g}) must be smaller than sigma_max ({sigma_max:g})")


@dataclass(frozen=True)
class VPLinear:
    """A VP-linear SDE σ(τ) = √(exp(½β_d τ² + β_min τ) − 1), used by `time_uniform` and DEIS-tAB."""

    beta_d: float
    beta_min: float

    @classmethod
    def fit(cls, sigma_min: float, sigma_max: float, eps_s: float = VP_EPS_S) -> VPLinear:
        """The VP-linear SDE with σ(ε_s) = σ_min and σ(1) = σ_max (docs/maths.md §3)."""
        beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
        beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
        return cls(beta_d, beta_min)

    def sigma(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * tau**2 + self.beta_min * tau))

    def tau(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of `sigma`: the positive root of ½β_d τ² + β_min τ = ln(1 + σ²)."""
        log1p = torch.log1p(sigma**2)
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * self.beta_d * log1p)) / self.beta_d

    def dsigma_dtau(self, tau: torch.Tensor) -> torch.Tensor:
        s = self.sigma(tau)
        return (self.beta_d * tau + self.beta_min) * (1 + s**2) / (2 * s)


def polynomial(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM ("Karras") schedule: t_i = (σ_max^{1/ρ} + u(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    u = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def logsnr(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log σ (= uniform in λ = −log σ), the DPM-Solver/UniPC default."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64))


def time_uniform(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """Uniform (ρ = 1) or ρ-warped VP time of the VP-linear SDE fitted to [σ_min, σ_max]; DEIS uses ρ = 2."""
    vp = VPLinear.fit(sigma_min, sigma_max)
    if min(vp.beta_d * VP_EPS_S, vp.beta_d) + vp.beta_min <= 0:  # dσ²/dτ ∝ β_d·τ + β_min must stay > 0 on [ε_s, 1]
        raise ScheduleError(
            f"time_uniform cannot fit a VP-linear SDE to [{sigma_min:g}, {sigma_max:g}]: the range is too narrow "
            "(it needs roughly sigma_max/sigma_min > 10 with sigma_min small); use polynomial or logsnr"
        )
    u = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    tau = (1 + u * (VP_EPS_S ** (1 / rho) - 1)) ** rho
    t = vp.sigma(tau)
    t[0], t[-1] = sigma_max, sigma_min  # remove round-off at the ends
    return t


def sigma_to_timestep(sigma: torch.Tensor, sigma_table: torch.Tensor) -> torch.Tensor:
    """Fractional model timestep of σ by interpolating log σ over an increasing table σ_0 < … < σ_{K−1}."""
    log_table = sigma_table.to(torch.float64).log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log().clamp(log_table[0], log_table[-1])
    idx = torch.searchsorted(log_table, log_sigma).clamp(1, len(log_table) - 1)
    lo, hi = log_table[idx - 1], log_table[idx]
    return (idx - 1).to(torch.float64) + (log_sigma - lo) / (hi - lo)


def timestep_to_sigma(timestep: torch.Tensor, sigma_table: torch.Tensor) -> torch.Tensor:
    """σ at a fractional timestep by interpolating log σ over the table."""
    log_table = sigma_table.to(torch.float64).log()
    t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, len(log_table) - 1)
    lo = t.floor().long().clamp(max=len(log_table) - 2)
    w = t - lo
    return torch.exp((1 - w) * log_table[lo] + w * log_table[lo + 1])


def discrete(num_steps: int, sigma_min: float, sigma_max: float, model: object) -> torch.Tensor:
    """LDM schedule: uniform in the model's own timestep, mapped back through its σ table.

    `model` must expose `sigma_table`: the increasing σ_k = √((1 − ᾱ_k)/ᾱ_k) of its discrete timesteps.
    """
    table = getattr(model, "sigma_table", None)
    if table is None:
        raise ModelError("the 'discrete' schedule needs a model exposing `sigma_table` (a discrete-VP model)")
    table = check_schedule(torch.as_tensor(table).flip(0), "sigma_table").flip(0)
    if sigma_min < table[0] * (1 - 1e-6) or sigma_max > table[-1] * (1 + 1e-6):
        raise ScheduleError(
            f"[{sigma_min:g}, {sigma_max:g}] lies outside the model's σ table [{table[0]:g}, {table[-1]:g}]"
        )
    ts = torch.linspace(
        float(sigma_to_timestep(torch.tensor(sigma_max, dtype=torch.float64), table)),
        float(sigma_to_timestep(torch.tensor(sigma_min, dtype=torch.float64), table)),
        num_steps,
        dtype=torch.float64,
    )
    return timestep_to_sigma(ts, table)


def kl_optimal(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in arctan σ: the KL-optimal schedule of Align Your Steps (Sabour et al. 2024, for data of unit
    variance; ComfyUI's `kl_optimal` scheduler)."""
    u = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return torch.tan((1 - u) * math.atan(sigma_max) + u * math.atan(sigma_min))


_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "polynomial": polynomial,
    "logsnr": logsnr,
    "time_uniform": time_uniform,
    "kl_optimal": kl_optimal,
    "discrete": discrete,
}


# ---------------------------------------------------------------------------------------------- schedule files


def save_schedule(path: str | os.PathLike, sigmas: torch.Tensor, meta: dict[str, Any] | None = None) -> Path:
    """Write a schedule file atomically: JSON {"format", "sigmas", "num_steps", "sigma_min", "sigma_max", …meta}."""
    t = check_schedule(sigmas)
    data = {"format": FILE_FORMAT, "version": 1, "kind": "gits", **(meta or {}),
            "sigmas": [float(v) for v in t], "num_steps": len(t),
            "sigma_min": float(t[-1]), "sigma_max": float(t[0])}
    return write_json(path, data)


def read_schedule_file(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """The σ grid (validated: finite, positive, strictly decreasing) and the metadata of a schedule file."""
    p = Path(path)
    if not p.is_file():
        raise ScheduleError(f"schedule file {str(p)!r} not found; create it with `fewstep gits --model MODEL "
                            f"--nfe NFE --out {p}`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScheduleError(f"schedule file {str(p)!r} is not valid JSON ({e}); regenerate it with `fewstep gits`")
    if isinstance(data, list):  # a bare list of σ is accepted too
        data = {"sigmas": data}
    if not isinstance(data, dict) or not isinstance(data.get("sigmas"), list):
        raise ScheduleError(f"schedule file {str(p)!r} has no \"sigmas\" list")
    try:
        values = [float(v) for v in data["sigmas"]]
    except (TypeError, ValueError):
        raise ScheduleError(f"schedule file {str(p)!r}: \"sigmas\" must be a list of numbers") from None
    return check_schedule(values, f"schedule file {str(p)!r}"), data


def load_schedule(path: str | os.PathLike, num_steps: int | None = None, sigma_min: float | None = None,
                  sigma_max: float | None = None, model: Any = None) -> torch.Tensor:
    """A schedule file's σ grid, checked against the request: `num_steps` points and the σ range
    [`sigma_min`, `sigma_max`] (or the `model`'s) at both ends, to a relative tolerance of 1e-4."""
    t, data = read_schedule_file(path)
    where = f"schedule file {str(path)!r}"
    made_for = f" (made for model {data['model']!r})" if data.get("model") else ""
    if num_steps is not None and num_steps != len(t):
        nfe = f", NFE {data['nfe']} for {data.get('solver') or 'its solver'}" if data.get("nfe") else ""
        raise ScheduleError(f"{where} has {len(t)} points{nfe}, but num_steps={num_steps} was asked for; make a "
                            f"schedule for this step count with `fewstep gits --nfe …`")
    lo = getattr(model, "sigma_min", sigma_min)
    hi = getattr(model, "sigma_max", sigma_max)
    bad_hi = hi is not None and abs(float(t[0]) - float(hi)) > RANGE_RTOL * float(hi)
    bad_lo = lo is not None and abs(float(t[-1]) - float(lo)) > RANGE_RTOL * float(lo)
    if bad_hi or bad_lo:
        raise ScheduleError(f"{where} spans σ ∈ [{float(t[-1]):g}, {float(t[0]):g}]{made_for}, but the model's "
                            f"σ range is [{lo if lo is not None else '?'}, {hi if hi is not None else '?'}]; "
                            f"make a schedule for this model with `fewstep gits`")
    return t



def _gits(num_steps: int | None, sigma_min: float, sigma_max: float, path: str | None, model: object) -> torch.Tensor:
    """A GITS schedule file (made by `fewstep gits`), checked against num_steps and the (model's) σ range."""
    if not path:
        raise ScheduleError("the 'gits' schedule needs its file: path=FILE or 'gits:FILE' (made by `fewstep gits`)")
    return load_schedule(path, num_steps, sigma_min, sigma_max, model=model)


def _ays(num_steps: int | None, sigma_min: float, sigma_max: float, table: str | None, model: object) -> torch.Tensor:
    """An Align-Your-Steps table ('sd15', 'sdxl', or the model's `ays_table`) log-linearly interpolated."""
    if num_steps is None:
        raise ScheduleError("schedule 'ays' needs num_steps")
    _check_range(num_steps, sigma_min, sigma_max)
    return check_schedule(ays(num_steps, sigma_min, sigma_max, model, table), "ays schedule")


def _flow(num_steps: int | None, sigma_min: float, sigma_max: float, arg: str | None, model: object) -> torch.Tensor:
    """A flow pipeline's grid on the model's flow-time range: 'flow:shift=3', 'flow:mu=1.15[,type=linear]',
    'flow:dynamic' (Flux's μ from the model's latent size, 2×2 patches), '…,terminal=0.1', '…,spacing=karras';
    'flow:shift=3,diffusers' is diffusers' FlowMatchEuler default grid (range [s(s(1/1000)), 1], its end shifted
    twice), whatever the model's t_min. A bare 'flow' takes the options of the model's own flow grid
    (`ModelInfo.schedule`, e.g. an SD3 pipeline's 'flow:shift=3'), else no shift."""
    if num_steps is None:
        raise ScheduleError("schedule 'flow' needs num_steps")
    _check_range(num_steps, sigma_min, sigma_max)
    own = getattr(model, "schedule", "") or ""
    options = parse_flow_arg(arg or (own.partition(":")[2] if own.startswith("flow:") else ""))
    if options.pop("diffusers", False):  # FlowMatchEuler's default set_timesteps(N): its stored range shifted again
        s = float(options.get("shift", 1.0))
        sigma_min = float(shift_time(shift_time(torch.tensor(1 / 1000, dtype=torch.float64), s), s))
    if options.pop("dynamic", False):
        shape = getattr(model, "shape", None)
        if not shape or len(shape) < 2:
            raise ScheduleError("'flow:dynamic' needs a model with an image shape [C, H, W] (its token count)")
        options["mu"] = dynamic_mu(int(shape[-1]) * int(shape[-2]) // 4)
    return check_schedule(flow_grid(num_steps, sigma_min, sigma_max, **options), "flow schedule")


def _oss(num_steps: int | None, sigma_min: float, sigma_max: float, table: str | None, model: object) -> torch.Tensor:
    """An Optimal-Steps flow table ('oss:flux', 'oss:wan') interpolated to num_steps points."""
    if num_steps is None or num_steps < 2:
        raise ScheduleError(f"schedule 'oss' needs num_steps >= 2, got {num_steps!r}")
    if not table:
        raise ScheduleError("schedule 'oss' needs its table: 'oss:flux' or 'oss:wan'")
    return check_schedule(oss_grid(num_steps, table), "oss schedule")


# schedules taking an argument: 'gits:FILE', 'ays:TABLE', 'flow:OPTIONS', 'oss:TABLE'
_ARG_SCHEDULES = {"gits": _gits, "ays": _ays, "flow": _flow, "oss": _oss}
SCHEDULE_NAMES = (*_SCHEDULES, "custom", *_ARG_SCHEDULES)
DEFAULT_RHO = {"polynomial": 7.0, "time_uniform": 1.0}


def get_schedule(
    name: str,
    num_steps: int | None = None,
    sigma_min: float = DEFAULT_SIGMA_MIN,
    sigma_max: float = DEFAULT_SIGMA_MAX,
    rho: float | None = None,
    *,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    model: object | None = None,
    path: str | os.PathLike | None = None,
    table: str | None = None,
) -> torch.Tensor:
    """Build a named schedule of `num_steps` points from σ_max down to σ_min (float64, strictly decreasing).

    `rho` applies to `polynomial` (default 7) and `time_uniform` (default 1); `custom` takes `sigmas`;
    `discrete` takes a `model` exposing `sigma_table`. `gits` reads a schedule file (`path`, or the name
    'gits:FILE'; made by `fewstep gits`), checked against num_steps and [sigma_min, sigma_max] (or the `model`'s
    range); `ays` interpolates an Align-Your-Steps table (`table`, or the name 'ays:sd15' / 'ays:sdxl', or the
    `model`'s `ays_table`) to num_steps points. Flow models (flow time t ∈ (0, 1] as σ): `flow:OPTIONS` is the
    pipelines' shifted grid (fewstep.flow.flow_grid), `oss:flux` / `oss:wan` the Optimal-Steps tables; the other
    schedules apply to t over the model's range as they do to σ (polynomial = Karras spacing in t).
    """
    if hasattr(num_steps, "__index__") and not isinstance(num_steps, bool):
        num_steps = operator.index(num_steps)  # numpy / torch integers count too
    name, _, arg = str(name).partition(":")
    if name in _ARG_SCHEDULES:
        if rho is not None:
            raise ScheduleError(f"schedule {name!r} takes no rho")
        return _ARG_SCHEDULES[name](num_steps, float(sigma_min), float(sigma_max), arg or path or table, model)
    if arg:
        raise ScheduleError(f"schedule {name!r} takes no ':' argument (only 'gits:FILE', 'ays:TABLE', "
                            "'flow:OPTIONS' and 'oss:TABLE' do)")
    if name == "custom":
        if sigmas is None:
            raise ScheduleError("the 'custom' schedule needs `sigmas=` (a strictly decreasing list)")
        t = check_schedule(sigmas, "custom schedule")
        if num_steps is not None and num_steps != len(t):
            raise ScheduleError(f"custom schedule has {len(t)} points but num_steps={num_steps}")
        return t
    if name not in _SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if num_steps is None:
        raise ScheduleError(f"schedule {name!r} needs num_steps")
    _check_range(num_steps, float(sigma_min), float(sigma_max))
    kwargs: dict[str, object] = {}
    if name in DEFAULT_RHO:
        kwargs["rho"] = DEFAULT_RHO[name] if rho is None else float(rho)
        if not (math.isfinite(kwargs["rho"]) and kwargs["rho"] > 0):  # type: ignore[operator]
            raise ScheduleError(f"rho must be positive and finite, got {rho!r}")
    elif rho is not None:
        raise ScheduleError(f"schedule {name!r} takes no rho")
    if name == "discrete":
        kwargs["model"] = model
    t = _SCHEDULES[name](num_steps, float(sigma_min), float(sigma_max), **kwargs)
    return check_schedule(t, f"{name} schedule")
