"""The acceptance check of a digits model: sample it with a fine EDM-Heun solve and ask the shipped digit
classifier (`fewstep.models.classifier`) how many samples it recognises. Evaluation code: it samples through the
solvers, which `models` never imports."""

from __future__ import annotations

from typing import Any

import torch

from ..models.classifier import DigitClassifier, load_classifier
from ..noise import seeded_noise
from ..schedules import get_schedule
from ..solvers import sample


def heun_samples(denoiser: Any, n: int = 1000, shape: tuple[int, ...] = (1, 16, 16), num_steps: int = 51,
                 first_seed: int = 0, batch: int = 250) -> torch.Tensor:
    """n samples (seeds first_seed…) with EDM Heun on the polynomial ρ = 7 grid, 0.002…80 (num_steps points)."""
    sched = get_schedule("polynomial", num_steps, 0.002, 80.0)
    out = []
    for i in range(first_seed, first_seed + n, batch):
        seeds = list(range(i, min(i + batch, first_seed + n)))
        out.append(sample(denoiser, seeded_noise(seeds, shape, torch.float32), "heun", sched).float())
    return torch.cat(out)


def sample_quality(denoiser: Any, n: int = 1000, num_steps: int = 51, threshold: float = 0.5,
                   classifier: DigitClassifier | None = None, shape: tuple[int, ...] = (1, 16, 16)) -> dict[str, Any]:
    """The acceptance check of a digits model: n EDM-Heun samples (seeds 0…n−1, num_steps points, i.e.
    2·(num_steps−1) = 100 NFE for 51 points), the fraction the classifier recognises with confidence ≥ threshold,
    the mean confidence and the histogram of predicted digits (among the recognised samples)."""
    clf = classifier or load_classifier()
    x = heun_samples(denoiser, n, shape, num_steps)
    labels, conf = clf.predict(x)
    ok = conf >= threshold
    return {
        "samples": n, "solver": "heun", "num_steps": num_steps, "schedule": "polynomial rho=7, 0.002..80",
        "threshold": threshold, "recognised_fraction": float(ok.float().mean()),
        "mean_confidence": float(conf.mean()),
        "class_histogram": torch.bincount(labels[ok], minlength=10).tolist(),
    }
