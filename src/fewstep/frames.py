"""The coordinates the solvers integrate in: the EDM frame and the flow frame (docs/maths.md §15).

Every solver integrates dx/dt = (x − D(x, t))/t from the grid's first time to its last. In the **EDM frame** t is
σ and x = x₀ + σ·ε. In the **flow frame** t is the flow time of x_t = (1 − t)·x₀ + t·ε and x is x_t itself, with
D the x₀-prediction D = x_t − t·v: the flow ODE dx_t/dt = v = (x_t − D)/t has the same form, so every solver that
works on d = (x − D)/t runs unchanged there and starts at t = 1 exactly (σ = ∞ is never formed). The frames differ
where a solver uses more than the ODE:

* the exponential integrators' signal scale α and half-log-SNR λ = log(α/t) (EDM α = 1; flow α = 1 − t, so λ(1) =
  −∞ and their first step from t = 1 is the exact DDIM limit x' = t'·x + (1 − t')·D);
* AFS's analytic first node (EDM's rule mapped through σ = t/(1 − t); at t = 1 it is D₀ = 0, the zero-mean guess
  of E[x₀]);
* the valid times (flow: 0 < t ≤ 1) and how a run ends (a flow sample is x₀ = D(x, t_min), one more call, as
  every flow pipeline's last step to t = 0).
"""

from __future__ import annotations

import math

import torch

from .errors import ScheduleError


class Frame:
    """EDM (σ-space) coordinates: α = 1, λ = −log σ, any positive time."""

    name = "edm"
    max_time = math.inf
    final_denoise = False  # a run ends at the last grid point's state (EDM: σ_min·noise is negligible)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Signal scale α(t) of the state x = α·x₀ + t·ε."""
        return torch.ones_like(t)

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """Half-log-SNR λ = log(α/t) (float64 in, float64 out; −∞ at a flow model's t = 1)."""
        return -torch.log(t)

    def afs_denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """AFS's analytic D₀ (no model call): d₀ = x/√(1 + σ²), D₀ = x − σ·d₀. `t` broadcasts against x."""
        return x - t * x / torch.sqrt(1 + t**2)

    def check_times(self, t: torch.Tensor, what: str = "schedule") -> None:
        """Refuse times outside this frame's range (the grid is already positive and decreasing)."""

    def clamp_time(self, t: torch.Tensor) -> torch.Tensor:
        """A model time a wrapper proposes (a card's offset t·e^ξ), kept in the frame's range."""
        return t

    def __repr__(self) -> str:
        return f"<frame {self.name}>"


class FlowFrame(Frame):
    """Flow-matching coordinates: x = x_t, α = 1 − t, λ = log((1 − t)/t), 0 < t ≤ 1."""

    name = "flow"
    max_time = 1.0
    final_denoise = True

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-t) - torch.log(t)

    def afs_denoised(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """EDM's AFS at σ = t/(1 − t), x̂ = x/(1 − t), written in t so that t = 1 gives D₀ = 0 exactly:
        D₀ = x̂·(1 − σ/√(1 + σ²)) = x·(1 − t)/(r·(r + t)) with r = √((1 − t)² + t²)."""
        r = torch.sqrt((1 - t) ** 2 + t**2)
        return x * (1 - t) / (r * (r + t))

    def clamp_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp(max=1.0)

    def check_times(self, t: torch.Tensor, what: str = "schedule") -> None:
        if bool((t > 1).any()):
            raise ScheduleError(f"{what}: a flow model's times lie in (0, 1], got {float(t.max()):g} "
                                f"(flow time t, not σ; t = 1 is pure noise)")


EDM = Frame()
FLOW = FlowFrame()
FRAMES = {f.name: f for f in (EDM, FLOW)}


def get_frame(name: str | Frame | None) -> Frame:
    """A frame by name ('edm', 'flow'), or the frame itself; None is EDM."""
    if name is None:
        return EDM
    if isinstance(name, Frame):
        return name
    if name not in FRAMES:
        raise ScheduleError(f"unknown frame {name!r}; choose one of {', '.join(FRAMES)}")
    return FRAMES[name]


def frame_of(denoiser: object) -> Frame:
    """The frame a denoiser declares (its `frame` attribute), EDM by default."""
    return get_frame(getattr(denoiser, "frame", None))
