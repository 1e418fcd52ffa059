"""Teacher pairs of learned cards: x_teacher(z) for training and validation seeds, streamed to disk in shards.

The expensive part of a card on a network: one fine solve per seed, computed once and shared by every card of that
model and condition distribution (every base, NFE, family, run seed and pair count: a request of 2 048 pairs reuses
the 512 an earlier card computed). The pairs live in a `fewstep.shards` store, `$FEWSTEP_CACHE/pairs/<digest>/`,
whose `key.json` says what they are of: the model (name, weights fingerprint, sample shape, frame, σ range), the
condition distribution with its guidance (prompts or classes), and the teacher (solver, options, grid points; the
grid is polynomial ρ = 7 over the model's range). They are written chunk by chunk as computed (resumable after a
kill), the chunks dealt to the torchrun ranks, and read back row by row for each batch.

Caches of earlier versions (one `pairs-<hash>.safetensors` per seed list) are read and moved into the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file

from ..io import cache_dir
from ..memory import EVAL_CHUNK
from ..models.registry import ModelInfo
from ..noise import seeded_noise
from ..schedules import get_schedule
from ..shards import SeedTensors, ShardStore
from ..solvers import get_solver, nfe, sample
from ..solvers.base import Denoiser

Log = Callable[[str], None]


def teacher_setup(model: ModelInfo, cfg: Any) -> tuple[str, dict[str, Any], int]:
    """(solver, options, grid points) of the teacher. 'auto': the benchmark's reference solver (Heun, 1 000 points)
    on analytic models; DEIS-tAB order 4 with 60 points on networks (close to the 500-point Heun reference at a
    small fraction of its cost; README, "Learned solvers")."""
    from ..reference import REFERENCE_SOLVER, REFERENCE_STEPS

    if cfg.teacher != "auto":
        return cfg.teacher, dict(cfg.teacher_options), cfg.teacher_steps or REFERENCE_STEPS
    if model.exact:
        return REFERENCE_SOLVER, dict(cfg.teacher_options), cfg.teacher_steps or REFERENCE_STEPS
    return "deis", {"max_order": 4, **cfg.teacher_options}, cfg.teacher_steps or 60


def teacher_nfe(model: ModelInfo, cfg: Any) -> int:
    """Model calls of one teacher solve."""
    teacher, options, steps = teacher_setup(model, cfg)
    return nfe(get_solver(teacher, **options), steps, afs=False, denoise_to_zero=model.frame.final_denoise)


def pair_key(model: ModelInfo, cfg: Any) -> dict[str, Any]:
    """What the teacher pairs of `model` under `cfg` are of (the store's key; module docstring)."""
    teacher, options, steps = teacher_setup(model, cfg)
    return {"model": model.name, "fingerprint": model.fingerprint, "shape": list(model.shape),
            "frame": model.frame.name, "sigma_min": model.sigma_min, "sigma_max": model.sigma_max,
            "conditions": cfg.conditions, "teacher": teacher, "teacher_options": dict(sorted(options.items())),
            "teacher_steps": steps, "schedule": "polynomial:7", "dtype": "float64"}


def pair_store(model: ModelInfo, cfg: Any) -> ShardStore:
    return ShardStore("pairs", pair_key(model, cfg), model.shape)


def cached_count(model: ModelInfo, seeds: list[int], cfg: Any) -> int:
    """How many of `seeds` have their pairs on disk already (reads nothing but names; writes nothing)."""
    have = pair_store(model, cfg).present()
    found = sum(s in have for s in seeds)
    if found < len(seeds) and _legacy_path(model, seeds, cfg).exists():
        return len(seeds)
    return found


def teacher_pair_view(model: ModelInfo, seeds: list[int], cfg: Any, bind: Callable[[list[int]], Denoiser],
                      chunk: int = EVAL_CHUNK, progress: bool = False, log: Log | None = None) -> SeedTensors:
    """x_teacher of `seeds` (float64 rows, `take(positions)`), computed where missing (module docstring)."""
    store = pair_store(model, cfg)
    teacher, options, steps = teacher_setup(model, cfg)
    device = torch.device(getattr(model, "device", None) or "cpu")
    if store.missing(seeds):
        _migrate(store, model, seeds, cfg)

    def solve(chunk_seeds: list[int]) -> torch.Tensor:
        sched = get_schedule("polynomial", steps, model.sigma_min, model.sigma_max, rho=7.0)
        with torch.no_grad():
            return sample(bind(chunk_seeds), seeded_noise(chunk_seeds, model.shape, device=device), teacher, sched,
                          **options).to(device="cpu", dtype=torch.float64)

    store.fill(seeds, solve, chunk, desc="teacher pairs", progress=progress, log=log)
    return store.view(seeds)


def teacher_pairs(model: ModelInfo, seeds: list[int], cfg: Any, bind: Callable[[list[int]], Denoiser],
                  batch: int = EVAL_CHUNK, progress: bool = False) -> torch.Tensor:
    """x_teacher for each seed as one float64 tensor [len(seeds), *shape] (`teacher_pair_view`, all rows)."""
    return teacher_pair_view(model, list(seeds), cfg, bind, batch, progress).all()


def _legacy_path(model: ModelInfo, seeds: list[int], cfg: Any) -> Any:
    """Where fewstep before the shard store cached these pairs: one file per (model, seed list, teacher, …)."""
    teacher, options, steps = teacher_setup(model, cfg)
    ident = repr((model.name, model.fingerprint, list(seeds), teacher, sorted(options.items()), steps,
                  cfg.conditions))
    return cache_dir() / f"pairs-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.safetensors"


def _migrate(store: ShardStore, model: ModelInfo, seeds: list[int], cfg: Any) -> None:
    """Move a legacy cache file of exactly this seed list into the store (its rows in chunks of 256)."""
    path = _legacy_path(model, seeds, cfg)
    if not path.exists():
        return
    try:
        x = load_file(path)["x"]
    except Exception:  # unreadable: computed afresh
        return
    if tuple(x.shape) != (len(seeds), *model.shape):
        return
    store.check_writable()
    for k in range(0, len(seeds), EVAL_CHUNK):
        store.write(seeds[k : k + EVAL_CHUNK], x[k : k + EVAL_CHUNK].to(torch.float64))
