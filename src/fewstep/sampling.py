"""Sampling jobs: one PNG per seed (deterministic, independent of batch size), optional grid and .npz.

Outputs are written atomically; samples whose PNG already exists are skipped, so an interrupted job resumes.
The folder's `manifest.json` records the settings (fewstep.manifest): a job with other settings is refused
before sampling (unless `overwrite`), so a folder never mixes samples of different settings.

Under torchrun (WORLD_SIZE > 1) rank r samples seeds[r::world]; rank 0 writes the grid/.npz after a barrier.

Conditional models (fewstep.conditioning): seed s gets classes[s mod len] with `classes` (prompts likewise),
otherwise a class drawn uniformly per seed; the guidance scale applies to every sample.

Latent models (`ModelInfo.decode`, diffusers pipelines): the PNGs are the decoded images; with `npz` each seed's
final latents are kept as `SEED.npy` too and the .npz holds them as `latents` beside the images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import distributed
from .conditioning import ConditionSpec, check_conditions, conditioned_model, resolve
from .device import to_device
from .errors import FewstepError
from .io import atomic_write, check_output_dir, check_output_file
from .manifest import claim_folder, sample_manifest
from .methods import SolverSpec, resolve_method
from .models import load_model
from .models.registry import ModelInfo
from .noise import parse_seeds, seeded_noise
from .solvers import get_solver, sample


@dataclass
class SampleJob:
    model: str
    out: str
    solver: str = "auto"  # a solver name or a method spec (fewstep.methods): 'auto', 'dpmpp:max_order=2@logsnr',
    # 'learned:DIR'
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
    overwrite: bool = False  # remove the samples of `out` first when it was made with other settings
    classes: str | None = None  # conditional models: '3', '0-9' (seed s gets classes[s mod len]); None: uniform
    prompts: str | None = None  # prompt file (diffusers pipelines)
    guidance: float | None = None  # classifier-free guidance scale (None: 1, or a predictor's recorded one)
    classifier_scale: float = 0.0  # classifier guidance scale (models with a noise-aware classifier)
    device: str | None = None  # where the model and the solver run (None: where the model is); fewstep.device
    cards: tuple[str, ...] = ()  # the user's card folders that `auto` searches before the shipped cards


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [−1, 1] → uint8 [B, H, W, C]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise FewstepError(f"images must be [B, C, H, W] with 1, 3 or 4 channels, got shape {tuple(images.shape)}")
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


def save_npy(path: str | Path, array: np.ndarray) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

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


def job_spec(job: SampleJob) -> SolverSpec:
    """The method a job names: `--predictor DIR`, or `--solver` (a name, or a whole method spec such as
    'dpmpp:max_order=2@logsnr+afs', 'learned:DIR', 'amed:DIR') completed by --opt, --schedule and --rho."""
    if job.predictor is not None:
        if job.solver.startswith("learned:"):
            raise FewstepError("--solver learned:DIR and --predictor: give one method")
        return SolverSpec("amed", path=job.predictor)
    spec = SolverSpec.parse(job.solver)
    if spec.solver == "auto":
        if job.options or job.schedule or job.rho is not None or job.num_steps or job.afs:
            raise FewstepError("--solver auto picks the grid, options and AFS itself: drop --opt, --schedule, --rho, "
                               "--num-steps and --afs (or name a solver)")
        if job.nfe is None:
            raise FewstepError("--solver auto needs an NFE budget: --nfe N (model calls per sample, e.g. 5)")
        for folder in job.cards:
            if not Path(folder).is_dir():
                raise FewstepError(f"--cards {folder}: not a folder (give a folder of cards, e.g. a `fewstep tune` "
                                   "output)")
        return spec
    if job.cards:
        raise FewstepError("--cards is searched by --solver auto only")
    if spec.path:
        if job.options or job.schedule or job.rho is not None or job.num_steps:
            raise FewstepError(f"--solver {spec.solver}:DIR brings its own grid, options and AFS: drop --opt, "
                               "--schedule, --rho and --num-steps")
        return spec
    for key in ("afs", "denoise_to_zero", "predictor", "bottleneck"):
        if key in job.options:
            raise FewstepError(f"--opt {key}=…: not a solver option" + ("; use --afs" if key == "afs" else ""))
    if job.options:
        if spec.options:
            raise FewstepError("give the solver options in --solver or with --opt, not both")
        spec = replace(spec, options=dict(job.options))
        get_solver(spec.solver, **spec.options)  # unknown option: a clear error now
    if job.schedule or job.rho is not None:
        if "@" in job.solver:
            raise FewstepError("give the schedule in --solver (@schedule) or with --schedule/--rho, not both")
        spec = replace(spec, schedule=job.schedule or spec.schedule, rho=job.rho, default_schedule=False)
    return spec


def check_job(job: SampleJob, model: ModelInfo) -> SolverSpec:
    """Refuse a job that cannot succeed before sampling anything: conflicting step counts, unknown solver or
    options, unusable output paths, a model whose samples are not images. Returns the job's method spec."""
    if job.batch < 1:
        raise FewstepError(f"--batch must be >= 1, got {job.batch}")
    if job.nfe is not None and job.num_steps is not None:
        raise FewstepError("give --nfe or --num-steps, not both")
    spec = job_spec(job)
    if model.decode is None and (len(model.shape) != 3 or model.shape[0] not in (1, 3, 4)):
        raise FewstepError(f"model {job.model!r} has shape {tuple(model.shape)}; `sample` writes images and needs "
                           "[C, H, W] with 1, 3 or 4 channels")
    check_output_dir(job.out, "--out")
    check_output_file(job.grid, "--grid")
    check_output_file(job.npz, "--npz")
    return spec


def run_sample_job(job: SampleJob, log: Callable[[str], None] = print) -> int:
    """Run a sampling job; returns how many new PNGs were written (by this rank, under torchrun). `log` gets
    the line saying what `auto` chose."""
    model = to_device(load_model(job.model), job.device)
    seeds = parse_seeds(job.seeds)
    spec = check_job(job, model)
    method = None
    if spec.solver != "auto":
        method = resolve_method(spec, model, nfe=job.nfe, num_steps=job.num_steps, afs=job.afs)
        if spec.solver == "amed" and job.guidance is None and method.conditions:
            job.guidance = ConditionSpec.from_json(method.conditions).guidance  # the checkpoint's recorded scale
    model, conditions = resolve(model, job.classes, job.prompts, job.guidance, job.classifier_scale)
    if method is None:  # auto: a card fitted for these conditions, or the classic rule
        method = resolve_method(spec, model, nfe=job.nfe, conditions=conditions, card_dirs=job.cards)
        if distributed.world()[0] == 0:
            log(method.note)
    if method.artifact and spec.solver != "auto":
        check_conditions(method.conditions, conditions,
                         f"{'card' if spec.solver == 'learned' else 'predictor'} {spec.path}")
    name, options = method.manifest_solver()
    extra = {"pipeline": model.record} if model.record else {}
    manifest = sample_manifest(model, name, options, method.grid.tolist(), method.afs, method.nfe,
                               str(model.state_dtype).removeprefix("torch."), schedule=method.schedule,
                               conditions=conditions.to_json(), device=str(model.device), **method.record, **extra)
    out = Path(job.out)
    rank, world = distributed.world()
    if rank == 0:  # under torchrun rank 0 claims (or clears) the folder, the others then check the same manifest
        claim_folder(out, manifest, job.overwrite)
    distributed.barrier()
    if rank > 0:
        claim_folder(out, manifest)
    latents = model.decode is not None and job.npz is not None  # keep each seed's latents for the .npz
    todo = [s for s in seeds[rank::world]
            if not (out / f"{s:06d}.png").exists() or (latents and not (out / f"{s:06d}.npy").exists())]
    written = 0
    upscale = 1 if model.decode is not None else max(1, 32 // model.shape[-1])
    for i in tqdm(range(0, len(todo), job.batch), desc="sample", disable=not job.progress or not todo or rank > 0):
        chunk = todo[i : i + job.batch]
        # conditions per seed (docs/maths.md, "Conditions and guidance")
        denoiser = conditioned_model(model, conditions, chunk).denoiser
        with torch.no_grad():
            x = sample(denoiser, seeded_noise(chunk, model.shape, model.state_dtype, model.device), method.solver,
                       method.grid, afs=method.afs)
        if latents:
            for seed, z in zip(chunk, x.float().cpu().numpy()):
                save_npy(out / f"{seed:06d}.npy", z)
        images = model.decode(x) if model.decode is not None else x
        for seed, img in zip(chunk, to_uint8(images)):
            save_png(out / f"{seed:06d}.png", img, upscale)
            written += 1
    distributed.barrier()  # every rank's PNGs exist before rank 0 gathers them
    if rank == 0 and (job.grid or job.npz):
        imgs = np.stack([np.asarray(Image.open(out / f"{s:06d}.png")) for s in seeds])
        imgs = imgs if imgs.ndim == 4 else imgs[..., None]  # grey PNGs read as [H, W]
        if job.npz:  # uint8 [B, H, W, C] as in EDM's FID convention (the PNGs' resolution), with the seeds
            more = {"latents": np.stack([np.load(out / f"{s:06d}.npy") for s in seeds])} if latents else {}
            save_npz(job.npz, images=imgs, seeds=np.array(seeds), **more)
        if job.grid:
            save_grid(job.grid, imgs[:, ::upscale, ::upscale], upscale=1 if model.decode is not None else upscale * 2)
    return written
