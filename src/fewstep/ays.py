"""Align-Your-Steps (Sabour et al., 2024): NVIDIA's published optimised σ schedules for Stable Diffusion.

The tables are the 10-step (11-point) schedules from the AYS "how to" page
(research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), the same numbers ComfyUI ships in
`comfy_extras/nodes_align_your_steps.py`. Other step counts use the page's log-linear interpolation: log σ is
interpolated linearly over a uniform index axis on [0, 1] (ComfyUI's `loglinear_interp`), so both endpoints
are kept exactly. Unlike ComfyUI we do not replace the last σ by 0: a fewstep schedule ends at σ_min > 0
(add `denoise_to_zero` for a final D(x, σ_min)).
"""

from __future__ import annotations

import torch

from .errors import ScheduleError

# σ_max … σ_min of the SD-1.x / SDXL discrete VP models (β linear-in-√ from 0.00085 to 0.012, 1000 steps):
# σ_0 = 0.0291671582, σ_999 = 14.6146412293.
AYS_TABLES: dict[str, tuple[float, ...]] = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}
_ALIASES = {"sd1": "sd15", "sd1.5": "sd15", "sd-1.5": "sd15", "sd15": "sd15", "sdxl": "sdxl", "sd-xl": "sdxl"}
RANGE_RTOL = 1e-2  # how far the table's endpoints may lie from the model's σ range (relative)


def loglinear_interp(sigmas: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Resample a decreasing σ list to `num_steps` points, linearly in log σ over a uniform index axis."""
    log_s = torch.as_tensor(sigmas, dtype=torch.float64).log()
    pos = torch.linspace(0, len(log_s) - 1, num_steps, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=len(log_s) - 2)
    w = pos - lo
    out = torch.exp((1 - w) * log_s[lo] + w * log_s[lo + 1])
    out[0], out[-1] = float(sigmas[0]), float(sigmas[-1])  # exact endpoints (no exp(log) round-off)
    return out


def table_name(table: str | None, model: object | None) -> str:
    """The canonical table name from an explicit `table` or the model's `ays_table` attribute."""
    name = table if table else getattr(model, "ays_table", None)
    if not name:
        raise ScheduleError(
            "the 'ays' schedule needs a table: give table='sd15' or 'sdxl' (CLI: --schedule ays:sd15) or a model "
            "that names its table in `ays_table`"
        )
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise ScheduleError(f"unknown Align-Your-Steps table {name!r}; published tables: {', '.join(AYS_TABLES)}")
    return key


def ays(num_steps: int, sigma_min: float, sigma_max: float, model: object | None = None,
        table: str | None = None) -> torch.Tensor:
    """The AYS table (`table` or `model.ays_table`) log-linearly interpolated to `num_steps` points.

    The table's endpoints must match the model's σ range (`model.sigma_min/sigma_max` when the model has them,
    else the given `sigma_min`/`sigma_max`) within 1 %: the tables belong to SD-1.x/SDXL-type models.
    """
    key = table_name(table, model)
    sigmas = torch.tensor(AYS_TABLES[key], dtype=torch.float64)
    lo = float(getattr(model, "sigma_min", sigma_min))
    hi = float(getattr(model, "sigma_max", sigma_max))
    t_hi, t_lo = float(sigmas[0]), float(sigmas[-1])
    if abs(t_hi - hi) > RANGE_RTOL * hi or abs(t_lo - lo) > RANGE_RTOL * lo:
        raise ScheduleError(
            f"the Align-Your-Steps table {key!r} spans σ ∈ [{t_lo:g}, {t_hi:g}] but the model's σ range is "
            f"[{lo:g}, {hi:g}]; AYS tables are for SD-1.x/SDXL-type models (σ ≈ 0.0292–14.61)"
        )
    return sigmas if num_steps == len(sigmas) else loglinear_interp(sigmas, num_steps)
