"""A noise-aware digit classifier p(c | x, σ) for classifier guidance on `digits-cond` (fewstep.conditioning).

`clf(x, sigma)` → logits [B, 10] for noisy images x = x0 + σ·n at any σ in [0.002, 80]: the network sees
c_in(σ)·x = x/√(σ² + σ_d²) (EDM input scaling, σ_d = 0.5) with c_noise = ln(σ)/4 as a second input channel;
smooth activations (SiLU, average pooling) give smooth input gradients. Trained on the diffusion model's own
training split (`digits.digits_split`) with ln σ uniform on [ln 0.002, ln 80] half the time and EDM's
N(−1.2, 1.2²) otherwise; the shipped recognition classifier (models/classifier.py) never saw those images.

Reproduce: `fewstep train-noisy-classifier` (writes data/digits_noisy_classifier.safetensors + .json).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import load_weights, save_weights
from .digits import digits_split, random_shift

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
NOISY_CLASSIFIER_WEIGHTS = DATA_DIR / "digits_noisy_classifier.safetensors"
SIGMA_DATA = 0.5


class NoisyDigitClassifier(nn.Module):
    """[c_in·x, c_noise] → conv3×3(32) → conv3×3(32) → avgpool → conv3×3(64) → avgpool → linear(128) → linear(10),
    SiLU activations."""

    def __init__(self, resolution: int = 16):
        super().__init__()
        self.resolution = int(resolution)
        r = self.resolution // 4
        self.net = nn.Sequential(
            nn.Conv2d(2, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(64 * r * r, 128), nn.SiLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        x = x.float()
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        c_in = (s**2 + SIGMA_DATA**2).rsqrt().reshape(-1, 1, 1, 1)
        c_noise = (s.log() / 4).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        return self.net(torch.cat([x * c_in, c_noise], dim=1))


def _sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = math.log(0.002), math.log(80.0)
    uniform = torch.rand(n, generator=gen) * (hi - lo) + lo
    edm = torch.randn(n, generator=gen) * 1.2 - 1.2
    return torch.where(torch.rand(n, generator=gen) < 0.5, uniform, edm).exp()


def train_noisy_classifier(iters: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                           threads: int = 1) -> tuple[NoisyDigitClassifier, dict[str, Any]]:
    """Train with cross-entropy on noisy training-split digits (random ±1-pixel shifts); report accuracy on the
    held-out split at a few σ."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = digits_split(16)
    x, y = data["train_x"], data["train_y"]
    net = NoisyDigitClassifier(16)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters)
    start = time.perf_counter()
    for _ in range(iters):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        s = _sigmas(batch, gen)
        xb = random_shift(x[idx], 1, gen) + s.reshape(-1, 1, 1, 1) * torch.randn(batch, 1, 16, 16, generator=gen)
        loss = F.cross_entropy(net(xb, s), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    check = torch.Generator().manual_seed(seed + 1)
    acc = {}
    with torch.no_grad():
        for sig in (0.002, 0.5, 1.0, 2.0, 5.0, 20.0):
            xn = data["held_x"] + sig * torch.randn(data["held_x"].shape, generator=check)
            acc[str(sig)] = float((net(xn, torch.tensor(sig)).argmax(-1) == data["held_y"]).float().mean())
    info = {"architecture": NoisyDigitClassifier.__doc__.split("\n")[0], "iterations": iters, "batch": batch,
            "lr": lr, "seed": seed, "threads": threads, "wall_s": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in net.parameters()), "held_out_accuracy_at_sigma": acc,
            "data": "train split of digits.digits_split (1438 images, 16x16); evaluation on the held-out split"}
    return net, info


def save_noisy_classifier(path: str | os.PathLike, net: NoisyDigitClassifier) -> Path:
    return save_weights(path, net, "fewstep-noisy-digit-classifier-v1")


def load_noisy_classifier(path: str | os.PathLike | None = None) -> NoisyDigitClassifier:
    """The shipped noise-aware classifier (or the one at `path`), eval mode, frozen parameters."""
    return load_weights(Path(path) if path is not None else NOISY_CLASSIFIER_WEIGHTS, NoisyDigitClassifier,
                        "noise-aware classifier", "fewstep train-noisy-classifier")
