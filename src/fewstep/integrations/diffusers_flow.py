"""Flow-matching scheduler configs for `FewstepScheduler` (docs/maths.md §15, docs/integrations.md "Flow models").

A diffusers flow pipeline (SD3, Flux, Wan, Qwen-Image, …) ships a `FlowMatchEulerDiscreteScheduler` config, or a
`UniPCMultistepScheduler` / `DPMSolverMultistepScheduler` one with `use_flow_sigmas=True` and
`prediction_type="flow_prediction"`. `FewstepScheduler.from_config` reads either as a *flow scheduler*: it
integrates in fewstep's flow frame (state x_t, time t ∈ (0, 1] used as σ, D = x_t − t·v), on

* the `sigmas` the pipeline passes (Flux / Qwen-Image: linspace(1, 1/N, N) with μ), shifted **once** by the
  config's shift (`shift`; `flow_shift` for UniPC / DPM; e^μ or μ with `use_dynamic_shifting` and
  `time_shift_type`), stretched to `shift_terminal` and re-spaced by `use_karras_sigmas` & co., exactly as
  FlowMatchEuler treats them;
* otherwise fewstep's `flow_grid`: linear in the unshifted time over [1/T, 1] (T = num_train_timesteps), shifted
  once. (FlowMatchEuler's own default grid shifts its already-shifted range a second time at its end.)

`FlowTable` is the flow counterpart of `VPTable`: the scheduler asks it for model timesteps (t·T, float, the
pipelines' units), the model input (x_t itself) and D from the network's velocity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ModelError, SolverError
from ..flow import check_shift, flow_grid, mu_to_shift, shift_time, stretch_to_terminal
from ..solvers.base import bcast

FLOW_PREDICTION = "flow_prediction"
SPACINGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}
_REFUSED = {"invert_sigmas": "inverted sigmas (t = 0 first) are not a sampling ODE from noise",
            "stochastic_sampling": "fewstep's solvers are ODE solvers (no noise is added between steps)"}


def adapt_config(config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`from_config` keywords for a foreign scheduler config: a FlowMatch* config (it has no `prediction_type`)
    becomes `prediction_type="flow_prediction"`; settings fewstep cannot honour raise an error naming the key."""
    cfg = dict(getattr(config, "config", config) or {})
    name = str(cfg.get("_class_name", ""))
    if name == "FewstepScheduler":
        return kwargs
    for key, why in _REFUSED.items():
        if cfg.get(key):
            raise SolverError(f"scheduler config {key}=True ({name or 'config'}): {why}")
    flow_source = name.startswith("FlowMatch") or ("shift" in cfg and not {"beta_schedule", "trained_betas"} & set(cfg))
    if flow_source and "prediction_type" not in cfg and "prediction_type" not in kwargs:
        kwargs = {**kwargs, "prediction_type": FLOW_PREDICTION}
    return kwargs


def is_flow(config: Mapping[str, Any]) -> bool:
    """Whether a FewstepScheduler config describes a flow model (else VP); refuses a mixed one by its key."""
    prediction = config.get("prediction_type")
    if config.get("use_flow_sigmas") and prediction != FLOW_PREDICTION:
        raise SolverError(f"use_flow_sigmas=True needs prediction_type={FLOW_PREDICTION!r}, got {prediction!r} "
                          "(a VP network on flow times is neither a VP nor a flow model)")
    return prediction == FLOW_PREDICTION


@dataclass(frozen=True)
class FlowSettings:
    """The time-shift settings of a flow scheduler config (keys named as diffusers names them)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic: bool = False
    shift_type: str = "exponential"
    terminal: float | None = None
    spacing: str = "linear"

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> FlowSettings:
        """Read and validate `shift` (`flow_shift` with `use_flow_sigmas`), `use_dynamic_shifting`,
        `time_shift_type`, `shift_terminal` and the `use_*_sigmas` spacing flags."""
        key = "flow_shift" if config.get("use_flow_sigmas") else "shift"
        shift = check_shift(config.get(key, 1.0), key)
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise SolverError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")
        terminal = config.get("shift_terminal")
        if terminal is not None and terminal is not False:
            terminal = float(terminal)
            if not (0 < terminal < 1):
                raise SolverError(f"shift_terminal must lie in (0, 1), got {terminal!r}")
        else:
            terminal = None
        flags = [name for name in SPACINGS if config.get(name)]
        if len(flags) > 1:
            raise SolverError(f"only one of {', '.join(SPACINGS)} may be set, got {', '.join(flags)}")
        steps = int(config.get("num_train_timesteps", 1000))
        if steps < 2:
            raise SolverError(f"num_train_timesteps must be >= 2, got {steps}")
        return cls(steps, shift, bool(config.get("use_dynamic_shifting")), kind, terminal,
                   SPACINGS[flags[0]] if flags else "linear")

    def static_shift(self, mu: float | None) -> float:
        """The shift of this run: the config's, or with `use_dynamic_shifting` the one of μ (e^μ, or μ for the
        linear type). A μ without dynamic shifting is ignored, as FlowMatchEuler does."""
        if not self.dynamic:
            return self.shift
        if mu is None:
            raise SolverError("use_dynamic_shifting=True: set_timesteps needs mu (Flux-style pipelines pass it; "
                              "fewstep.flow.dynamic_mu(image_seq_len) computes it)")
        return mu_to_shift(float(mu), self.shift_type)

    def t_min(self, mu: float | None) -> float:
        """The end of the model's shifted range: the shift of 1/T."""
        return float(shift_time(torch.tensor([1.0 / self.num_train_timesteps], dtype=torch.float64),
                                self.static_shift(mu)))

    def default_grid(self, points: int, mu: float | None) -> torch.Tensor:
        """fewstep's flow grid of `points` times: linear in the unshifted time over [1/T, 1], shifted once."""
        return flow_grid(points, self.t_min(mu), 1.0, shift=self.static_shift(mu), terminal=self.terminal,
                         spacing=self.spacing)

    def shifted(self, sigmas: torch.Tensor, mu: float | None) -> torch.Tensor:
        """A pipeline's `sigmas` (unshifted flow times) shifted once, stretched and re-spaced as FlowMatchEuler
        does; a given t = 1 stays exactly 1."""
        t = sigmas.to(torch.float64)
        if not bool(torch.isfinite(t).all()) or bool(((t <= 0) | (t > 1)).any()):
            raise SolverError(f"flow sigmas lie in (0, 1] (a trailing 0 is the final step), got {t.tolist()}")
        out = shift_time(t, self.static_shift(mu))
        out = torch.where(t == 1, torch.ones_like(out), out.clamp(max=1.0))
        if self.terminal is not None:
            out = stretch_to_terminal(out, self.terminal)
        if self.spacing != "linear" and len(out) >= 2:
            out = flow_grid(len(out), float(out[-1]), float(out[0]), spacing=self.spacing)
        return out


class FlowTable:
    """The flow counterpart of `VPTable` (same interface): model timesteps t·T, the model input x_t itself, and
    D = x_t − t·v from the network's velocity ("flow_prediction")."""

    prediction_type = FLOW_PREDICTION

    def __init__(self, settings: FlowSettings):
        self.scale = float(settings.num_train_timesteps)
        t = torch.arange(1, settings.num_train_timesteps + 1, dtype=torch.float64) / self.scale
        # the training times (ascending) under the static shift, as FlowMatchEuler stores them
        self.sigma_table = shift_time(t, settings.shift) if not settings.dynamic else t

    @property
    def sigma_min(self) -> float:
        return float(self.sigma_table[0])

    @property
    def sigma_max(self) -> float:
        return 1.0

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The pipelines' timestep of flow time t: t·T (float32, on t's device; Flux divides it by 1000 again)."""
        return (t.detach().to("cpu", torch.float64) * self.scale).to(device=t.device, dtype=torch.float32)

    def times(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Flow times of pipeline timesteps (float64)."""
        return torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1) / self.scale

    @staticmethod
    def model_input(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A flow network sees x_t itself."""
        return x

    @staticmethod
    def denoised(x: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """D = x_t − t·v, in x's dtype."""
        if output.shape != x.shape:
            raise ModelError(f"flow model output of shape {tuple(output.shape)} for latents {tuple(x.shape)}")
        return x - bcast(t, x) * output.to(device=x.device, dtype=x.dtype)


def noised(sample: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow forward process x_t = (1 − t)·x₀ + t·ε (img2img's starting latents), t per row or one value."""
    if t.numel() == 1:
        t = t.reshape(1).expand(sample.shape[0])
    tb = bcast(t.to(device=sample.device, dtype=sample.dtype), sample)
    return (1 - tb) * sample + tb * noise.to(sample.dtype)


def finite(value: float | None, what: str) -> float | None:
    """A finite float or None (μ, shifts)."""
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        raise SolverError(f"{what} must be finite, got {value!r}")
    return v


__all__ = ["FLOW_PREDICTION", "FlowSettings", "FlowTable", "adapt_config", "is_flow", "noised"]
