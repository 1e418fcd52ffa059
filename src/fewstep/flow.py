"""Flow-matching time maths (docs/maths.md §15): t ↔ σ, the SD3 / Flux / Wan time shifts and the flow grids.

A rectified-flow model's time t ∈ [0, 1] (t = 1 pure noise) relates to EDM's σ by σ = t/(1 − t). Pipelines
sample on a *shifted* grid: t ↦ s·t/(1 + (s − 1)·t) (SD3 s = 3; Wan 3 at 480p, 5 at 720p), or Flux's dynamic
shift with μ from the image's token count, t ↦ e^μ/(e^μ + (1/t − 1)) (= the static shift with s = e^μ; the
linear variant is μ/(μ + (1/t − 1))). Grids here are in t and span the model's range [t_min, t_max] like every
fewstep schedule; the sample's last step to t = 0 is the frame's final denoise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ScheduleError

# Flux's dynamic shift: μ linear in the image token count between these two points (diffusers' defaults).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15

# Optimal Stepsize (OSS) tables published for FLUX and Wan (Pei et al. 2025, "Optimal Stepsize for Diffusion
# Sampling", arXiv 2503.21774; the 10- and 20-step flow times before the final step to 0), log-linearly
# interpolated to other step counts as the authors do.
OSS_TABLES = {
    "flux": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
    "wan": (1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946, 0.927,
            0.902, 0.864, 0.776, 0.539, 0.208, 0.001),
}


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """σ = t/(1 − t) (∞ at t = 1)."""
    return t / (1 - t)


def time_of(sigma: torch.Tensor) -> torch.Tensor:
    """t = σ/(1 + σ) (1 at σ = ∞)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def check_shift(shift: float, what: str = "shift") -> float:
    """A static shift must be a positive finite number."""
    try:
        s = float(shift)
    except (TypeError, ValueError):
        raise ScheduleError(f"{what} must be a number, got {shift!r}") from None
    if not (math.isfinite(s) and s > 0):
        raise ScheduleError(f"{what} must be positive and finite, got {shift!r}")
    return s


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The static time shift t ↦ s·t/(1 + (s − 1)·t) (identity at s = 1; keeps 0 and 1 fixed)."""
    s = check_shift(shift)
    return s * t / (1 + (s - 1) * t)


def unshift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of `shift_time`: the static shift with 1/s."""
    return shift_time(t, 1 / check_shift(shift))


def dynamic_mu(seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
               base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """Flux's μ for an image of `seq_len` latent tokens: linear through (base_seq_len, base_shift) and
    (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


def mu_to_shift(mu: float, kind: str = "exponential") -> float:
    """The static shift equal to the dynamic shift by μ: exponential e^μ/(e^μ + (1/t − 1)) is s = e^μ, linear
    μ/(μ + (1/t − 1)) is s = μ."""
    if not math.isfinite(mu):
        raise ScheduleError(f"mu must be finite, got {mu!r}")
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        if mu <= 0:
            raise ScheduleError(f"the linear time shift needs mu > 0, got {mu!r}")
        return mu
    raise ScheduleError(f"time shift type {kind!r} not in ['exponential', 'linear']")


def stretch_to_terminal(t: torch.Tensor, terminal: float) -> torch.Tensor:
    """diffusers' `shift_terminal`: rescale 1 − t so that the grid's last point is `terminal`."""
    if not (0 < terminal < float(t[0])):
        raise ScheduleError(f"terminal must lie in (0, {float(t[0]):g}), got {terminal!r}")
    one_minus = 1 - t
    return 1 - one_minus * ((1 - terminal) / one_minus[-1])


def flow_grid(num_steps: int, t_min: float, t_max: float = 1.0, shift: float = 1.0, mu: float | None = None,
              shift_type: str = "exponential", terminal: float | None = None, spacing: str = "linear") -> torch.Tensor:
    """The flow pipelines' grid on [t_min, t_max]: linear in the unshifted time, then shifted once (static `shift`,
    or dynamic `mu` with `shift_type`), optionally stretched to `terminal`; `spacing` 'karras' (ρ = 7),
    'exponential' or 'beta' (α = β = 0.6) re-spaces the shifted grid's range as diffusers' flow options do."""
    if mu is not None and shift != 1.0:
        raise ScheduleError("give shift or mu, not both")
    if not (0 < t_min < t_max <= 1):
        raise ScheduleError(f"a flow grid needs 0 < t_min < t_max <= 1, got t_min={t_min:g}, t_max={t_max:g}")
    s = check_shift(shift) if mu is None else mu_to_shift(mu, shift_type)
    hi, lo = unshift_time(torch.tensor([t_max, t_min], dtype=torch.float64), s).tolist()
    t = shift_time(torch.linspace(hi, lo, num_steps, dtype=torch.float64), s)
    t[0], t[-1] = t_max, t_min  # remove round-off at the ends
    if terminal is not None:
        t = stretch_to_terminal(t, terminal)
    if spacing == "linear":
        return t
    first, last = float(t[0]), float(t[-1])
    u = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if spacing == "karras":
        return (first ** (1 / 7) + u * (last ** (1 / 7) - first ** (1 / 7))) ** 7
    if spacing == "exponential":
        return torch.exp(math.log(first) + u * (math.log(last) - math.log(first)))
    if spacing == "beta":
        from scipy.stats import beta

        ppf = torch.from_numpy(np.asarray(beta.ppf(1 - u.numpy(), 0.6, 0.6), dtype=np.float64))
        return last + ppf * (first - last)
    raise ScheduleError(f"flow spacing {spacing!r} not in ['linear', 'karras', 'exponential', 'beta']")


def oss_grid(num_steps: int, table: str) -> torch.Tensor:
    """An Optimal-Steps table ('flux', 'wan') for `num_steps` model calls: the table log-linearly interpolated to
    num_steps + 1 points, whose last (the step to 0) is the frame's final denoise, so num_steps points remain."""
    key = table.lower()
    if key not in OSS_TABLES:
        raise ScheduleError(f"unknown OSS table {table!r}; choose one of {', '.join(OSS_TABLES)}")
    ref = np.asarray(OSS_TABLES[key], dtype=np.float64)
    if len(ref) == num_steps + 1:  # the published step count: the table itself
        return torch.from_numpy(ref[:-1].copy())
    xs, new_xs = np.linspace(0, 1, len(ref)), np.linspace(0, 1, num_steps + 1)
    values = np.exp(np.interp(new_xs, xs, np.log(ref[::-1])))[::-1]
    return torch.from_numpy(values[:-1].copy())


def parse_flow_arg(arg: str) -> dict[str, object]:
    """'shift=3', 'mu=1.15,type=linear', 'shift=3,terminal=0.1,spacing=karras' → flow_grid keywords; the bare
    tokens 'dynamic' (μ from the model's size) and 'diffusers' (diffusers' default range) give {token: True},
    for the caller to fill in."""
    out: dict[str, object] = {}
    names = {"shift": float, "mu": float, "terminal": float, "type": str, "spacing": str}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        if part in ("dynamic", "diffusers"):
            out[part] = True
            continue
        key, eq, value = part.partition("=")
        if not eq or key not in names:
            raise ScheduleError(f"flow schedule option {part!r}: expected 'dynamic', 'diffusers' or key=value with key in "
                                f"{', '.join(names)} (e.g. 'flow:shift=3', 'flow:mu=1.15')")
        try:
            parsed = names[key](value)
        except ValueError:
            raise ScheduleError(f"flow schedule option {key}={value!r} is not a number") from None
        if key == "shift":
            check_shift(parsed)
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise ScheduleError(f"flow schedule option {key} must be finite, got {value!r}")
        out["shift_type" if key == "type" else key] = parsed
    return out
