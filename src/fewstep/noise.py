"""Per-seed noise (docs/maths.md §12): sample i is drawn from its own generator, so it never depends on batch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import FewstepError

MAX_SEEDS = 1_000_000  # one job; a list this long already takes hours of sampling
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range


def parse_seeds(text: str) -> list[int]:
    """'0-63' → 0…63; '1,5,10-12' → [1, 5, 10, 11, 12] (ranges are inclusive).

    Raises FewstepError for anything else: a reversed range, a seed given twice, a seed outside 0…2⁶³−1, more
    than MAX_SEEDS seeds, an empty list."""
    def bad(why: str) -> FewstepError:
        return FewstepError(f"--seeds {text!r}: {why}")

    parts: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text) if dash else int(lo_text)
        except ValueError:
            raise bad(f"{part!r} is not a seed or a range; use e.g. '0-63' or '1,5,10-12'") from None
        if lo < 0 or hi < 0 or "+" in part:
            raise bad(f"{part!r}: seeds are non-negative integers")
        if hi < lo:
            raise bad(f"range {part!r} runs backwards; write {hi}-{lo}")
        if hi > MAX_SEED:
            raise bad(f"seed {hi} is larger than {MAX_SEED}")
        parts.append((lo, hi))
    if not parts:
        raise bad("no seeds; use e.g. '0-63' or '1,5,10-12'")
    count = sum(hi - lo + 1 for lo, hi in parts)
    if count > MAX_SEEDS:
        raise bad(f"{count} seeds; at most {MAX_SEEDS} per job")
    seeds = [s for lo, hi in parts for s in range(lo, hi + 1)]
    if len(set(seeds)) != len(seeds):
        seen: set[int] = set()
        dup = next(s for s in seeds if s in seen or seen.add(s))
        raise bad(f"seed {dup} is given twice")
    return seeds


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float64,
                 device: str | torch.device | None = None) -> torch.Tensor:
    """N(0, I) noise [len(seeds), *shape], row i from torch.Generator().manual_seed(seeds[i]), drawn on the CPU
    (the same numbers on every device) and moved to `device` once."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)
