"""Per-seed noise (SPEC §9): sample i is drawn from its own generator, so it never depends on batch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import FewstepError


def parse_seeds(text: str) -> list[int]:
    """'0-63' → 0…63; '1,5,10-12' → [1, 5, 10, 11, 12] (ranges are inclusive)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError as e:
        raise FewstepError(f"bad seed list {text!r}: use e.g. '0-63' or '1,5,10-12'") from e
    if not seeds or any(s < 0 for s in seeds):
        raise FewstepError(f"bad seed list {text!r}: give non-negative seeds, e.g. '0-63'")
    return seeds


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """N(0, I) noise [len(seeds), *shape], row i from torch.Generator().manual_seed(seeds[i])."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(dtype)
