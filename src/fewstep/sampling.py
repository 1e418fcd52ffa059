"""Sampling jobs: one PNG per seed (deterministic, independent of batch size), optional grid and .npz.

Outputs are written atomically; samples whose PNG already exists are skipped, so an interrupted job resumes.
Under torchrun (WORLD_SIZE > 1) rank r samples seeds[r::world]; rank 0 writes the grid/.npz after a barrier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import distributed
from .errors import FewstepError
from .io import atomic_write
from .models import load_model
from .noise import parse_seeds, seeded_noise
from .schedules import get_schedule
from .solvers import RECOMMENDED_SCHEDULE, num_steps_for_nfe, sample


@dataclass
class SampleJob:
    model: str
    out: str
    solver: str = "ipndm"
    nfe: int | None = None
    num_steps: int | None = None
    schedule: str | None = None
    rho: float | None = None
    afs: bool = False
    seeds: str = "0-63"
    grid: str | None = None
    npz: str | None = None
    batch: int = 64
    predictor: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [−1, 1] → uint8 [B, H, W, C]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(img: np.ndarray, upscale: int = 1) -> Image.Image:
    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    return im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) if upscale > 1 else im


def save_png(path: str | Path, img: np.ndarray, upscale: int = 1) -> None:
    atomic_write(path, lambda tmp: _pil(img, upscale).save(tmp, format="PNG"))


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, _write)


def save_grid(path: str | Path, images: np.ndarray, cols: int | None = None, upscale: int = 4, pad: int = 2) -> None:
    """Tile uint8 images [B, H, W, C] into one PNG."""
    b, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    save_png(path, canvas, upscale)


def run_sample_job(job: SampleJob) -> int:
    """Run a sampling job; returns how many new PNGs were written (by this rank, under torchrun)."""
    model = load_model(job.model)
    seeds = parse_seeds(job.seeds)
    if job.batch < 1:
        raise FewstepError("--batch must be >= 1")
    kwargs: dict[str, Any]
    if job.predictor is not None:
        from .amed.checkpoint import load_checkpoint

        predictor, settings = load_checkpoint(job.predictor, model)
        solver, sched, afs = settings.student, settings.schedule_tensor(), settings.afs
        kwargs = {**settings.student_options, "predictor": predictor, "bottleneck": model.bottleneck}
    else:
        solver, afs, kwargs = job.solver, job.afs, dict(job.options)
        steps = job.num_steps
        if job.nfe is not None:
            steps = num_steps_for_nfe(solver, job.nfe, afs=afs, **kwargs)
            if steps is None:
                raise FewstepError(f"{solver} cannot use exactly {job.nfe} NFE" + ("" if afs else "; try --afs"))
        if steps is None:
            raise FewstepError("give --nfe or --num-steps")
        name, rho = (job.schedule, job.rho) if job.schedule else RECOMMENDED_SCHEDULE[solver]
        sched = get_schedule(name, steps, model.sigma_min, model.sigma_max, rho=job.rho if job.rho is not None else rho,
                             model=model)  # discrete / ays schedules read the model
    out = Path(job.out)
    rank, world = distributed.world()
    todo = [s for s in seeds[rank::world] if not (out / f"{s:06d}.png").exists()]
    written = 0
    upscale = max(1, 32 // model.shape[-1])
    for i in tqdm(range(0, len(todo), job.batch), desc="sample", disable=not job.progress or not todo or rank > 0):
        chunk = todo[i : i + job.batch]
        x = sample(model.denoiser, seeded_noise(chunk, model.shape), solver, sched, afs=afs, **kwargs)
        for seed, img in zip(chunk, to_uint8(x)):
            save_png(out / f"{seed:06d}.png", img, upscale)
            written += 1
    distributed.barrier()  # every rank's PNGs exist before rank 0 gathers them
    if rank == 0 and (job.grid or job.npz):
        imgs = np.stack([np.asarray(Image.open(out / f"{s:06d}.png")) for s in seeds])
        if job.npz:  # uint8 [B, H, W, C] as in EDM's FID convention, with the seeds
            save_npz(job.npz, images=imgs, seeds=np.array(seeds))
        if job.grid:
            full = imgs if imgs.ndim == 4 else imgs[..., None]
            save_grid(job.grid, full[:, ::upscale, ::upscale], upscale=upscale * 2)
    return written
