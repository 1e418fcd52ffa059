"""AMED's predictor (docs/maths.md §8): ≈9k parameters choosing (r_n, c_n, a_n) for every interval, at zero NFE."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .features import FEATURE_DIM

R_MARGIN = 1e-3


@dataclass(frozen=True)
class Control:
    """AMED's per-interval choice: intermediate time ratio r, direction scale c, model-time scale a ([B] or [1])."""

    r: torch.Tensor
    c: torch.Tensor
    a: torch.Tensor


def positional_embedding(v: torch.Tensor, channels: int = 8, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, channels] of a scalar per sample (cos half, sin half, as in EDM)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=v.device) / half)
    args = v.float().reshape(-1, 1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=1)


def _symmetric(logit: torch.Tensor) -> torch.Tensor:
    """2·sigmoid(z) − 1 ∈ (−1, 1), in float64, per sample."""
    return 2 * torch.sigmoid(logit.double()).squeeze(1) - 1


class AMEDPredictor(nn.Module):
    """features [B, 64] and times t_n, t_{n+1} → r ∈ (0, 1), c = 1 ± s_dir, a = 1 ± s_time.

    Linear 64→128, SiLU, Linear 128→4 on the features; sin/cos embeddings (8 channels) of c_noise = ¼·ln t
    for t_n and t_{n+1}, each through a shared Linear 8→8 + SiLU; the 20 concatenated numbers feed one linear
    head per output. A head exists only when its bound is positive (c = 1, a = 1 otherwise).
    """

    def __init__(self, scale_dir: float = 0.01, scale_time: float = 0.0, feature_dim: int = FEATURE_DIM,
                 hidden: int = 128, time_channels: int = 8):
        super().__init__()
        if scale_dir < 0 or scale_time < 0 or scale_time >= 1:
            raise ValueError(f"need scale_dir >= 0 and 0 <= scale_time < 1, got {scale_dir}, {scale_time}")
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        self.feature_dim, self.time_channels = feature_dim, time_channels
        self.features = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, 4))
        self.time = nn.Sequential(nn.Linear(time_channels, time_channels), nn.SiLU())
        width = 4 + 2 * time_channels
        self.head_r = nn.Linear(width, 1)
        self.head_c = nn.Linear(width, 1) if scale_dir > 0 else None
        self.head_a = nn.Linear(width, 1) if scale_time > 0 else None

    def forward(self, features: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor) -> Control:
        b = features.shape[0]
        emb = lambda t: self.time(positional_embedding(torch.log(t.expand(b)) / 4, self.time_channels))
        h = torch.cat([self.features(features.float()), emb(t_cur), emb(t_next)], dim=1)
        # float64 sigmoids; r is kept off 0 and 1, where s_n would coincide with a grid point
        r = torch.sigmoid(self.head_r(h).double()).squeeze(1).clamp(R_MARGIN, 1 - R_MARGIN)
        one = torch.ones_like(r)
        c = one if self.head_c is None else 1 + self.scale_dir * _symmetric(self.head_c(h))
        a = one if self.head_a is None else 1 + self.scale_time * _symmetric(self.head_a(h))
        return Control(r, c, a)

    def control(self, features: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor) -> Control:
        """The choice for one interval of a run (`AMEDPlugin`): features [B, F] of the node at t_cur, on any
        device; the result lives on t_cur's device, where the σ arithmetic runs."""
        p = next(self.parameters())
        out = self(features.to(p.device, p.dtype), t_cur.to(p.device), t_next.to(p.device))
        return Control(*(v.to(t_cur.device) for v in (out.r, out.c, out.a)))  # σ arithmetic stays with t

    def config(self) -> dict[str, float | int]:
        return {"scale_dir": self.scale_dir, "scale_time": self.scale_time, "feature_dim": self.feature_dim,
                "hidden": self.features[0].out_features, "time_channels": self.time_channels}
