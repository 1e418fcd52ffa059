"""The pipeline families behind `--model diffusers:DIR` (fewstep.integrations.diffusers_dir): loading a folder,
encoding prompt lists once, the per-sample prompt-conditioned denoisers and the VAE decoder.

* `sd` / `sdxl` (VP): `VPPrompts` is D(x, σ, i) for prompt indices i through `DiffusersDenoiser` (the ᾱ table and
  prediction type of the folder's scheduler); SDXL adds row i's pooled text embedding and the time ids
  (H, W, 0, 0, H, W) of the image as `added_cond_kwargs`, as its pipeline does.
* `sd3` / `flux` (flow): `FlowPrompts` is the flow-frame D(x_t, t, i) through `DiffusersFlowDenoiser`; Flux's
  latents stay [C, h, w] for the solvers and are packed into 2×2 tokens (with their image ids) for each call.
  Flux-dev's embedded guidance is the `embedded_guidance` setting (default 3.5); `--guidance` is true
  classifier-free guidance against the negative prompt, on the doubled batch, for every family.

Row P of a table of P prompts is the negative prompt ∅ (fewstep.conditioning's null label); `NullPrompt` is the
model without prompts (every sample gets ∅). Embeddings are computed under no_grad, in chunks of `CHUNK` prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..frames import EDM, FLOW
from ..models.registry import ModelInfo
from .diffusers import DiffusersDenoiser, DiffusersFlowDenoiser
from .diffusers_flow import FlowSettings

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHUNK = 64  # prompts per text-encoder call
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (the embedded value of guidance-distilled models)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or info logs of diffusers / transformers while a pipeline loads."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def load_pipeline(folder: Path, class_name: str, index: dict[str, Any], dtype: str, spec: str) -> Any:
    """The pipeline of `folder` from local files only, in `dtype`, networks frozen (eval, no parameter gradients);
    components saved as None stay None; SD's safety checker is not loaded; an fp16 VAE that asks for it
    (`force_upcast`, SDXL) decodes in float32."""
    import diffusers

    kwargs: dict[str, Any] = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with _quiet():
            pipe = getattr(diffusers, class_name).from_pretrained(str(folder), torch_dtype=TORCH_DTYPES[dtype],
                                                                  local_files_only=True, **kwargs)
    except Exception as e:  # a damaged or incomplete folder: one line naming it
        raise ModelError(f"--model {spec!r}: cannot load the {class_name} in {folder}: "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise ModelError(f"--model {spec!r}: the pipeline in {folder} has no VAE")
    if dtype == "fp16" and getattr(vae.config, "force_upcast", False):
        with _quiet():
            vae.to(torch.float32)
    return pipe


def _network(pipe: Any) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _device(pipe: Any) -> torch.device:
    return next(_network(pipe).parameters()).device


def encode(pipe: Any, family: str, texts: list[str], negative: str) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                           torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings [P, L, E], pooled [P, D] or None, negative embeddings [1, L, E], negative pooled [1, D]
    or None) of a prompt list, with the pipeline's own `encode_prompt` (negative '' = the pipeline's default)."""
    device = _device(pipe)
    neg = negative or None
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for i in range(0, len(texts), CHUNK):
            chunk = list(texts[i : i + CHUNK])
            negs = None if neg is None else [neg] * len(chunk)
            if family == "sd":
                cond, uncond = pipe.encode_prompt(chunk, device, 1, True, negative_prompt=negs)
                parts.append((cond, None, uncond[:1], None))
            elif family in ("sdxl", "sd3"):
                extra = {"prompt_3": None} if family == "sd3" else {}
                pe, npe, ppe, nppe = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device,
                                                        num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                        negative_prompt=negs, **extra)
                parts.append((pe, ppe, npe[:1], nppe[:1]))
            else:  # flux: no negative in its encode_prompt; ∅ is the negative prompt (or '') encoded alike
                pe, ppe, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device)
                npe, nppe, _ = pipe.encode_prompt(prompt=[neg or ""], prompt_2=None, device=device)
                parts.append((pe, ppe, npe, nppe))
    emb = torch.cat([p[0] for p in parts])
    pooled = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return emb, pooled, parts[0][2], parts[0][3]


class VPPrompts:
    """D(x, σ, i) of an SD / SDXL pipeline for prompt indices i [B] (module docstring)."""

    def __init__(self, denoiser: DiffusersDenoiser, pipe: Any, emb: torch.Tensor, pooled: torch.Tensor | None = None,
                 time_ids: torch.Tensor | None = None):
        self.denoiser, self.pipe, self.emb, self.pooled, self.time_ids = denoiser, pipe, emb, pooled, time_ids
        self.bottleneck = denoiser.bottleneck

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rows = idx.to(device=self.emb.device, dtype=torch.long)
        kwargs = None
        if self.pooled is not None:
            dt = self.denoiser.dtype
            kwargs = {"added_cond_kwargs": {"text_embeds": self.pooled[rows].to(dt),
                                            "time_ids": self.time_ids.to(self.emb.device, dt).expand(len(rows), -1)}}
        return self.denoiser(x, sigma, self.emb[rows], unet_kwargs=kwargs)

    def to(self, device: torch.device | str) -> VPPrompts:
        self.pipe.to(device)
        self.emb = self.emb.to(device)
        self.pooled = None if self.pooled is None else self.pooled.to(device)
        return self


def pack(x: torch.Tensor) -> torch.Tensor:
    """Flux's 2×2 patch tokens: [B, C, h, w] → [B, (h/2)(w/2), 4C]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack` for latents of `shape` [B, C, h, w]."""
    b, c, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Flux's position ids of the (h/2)×(w/2) latent tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class FlowPrompts:
    """The flow-frame D(x_t, t, i) of an SD3 / Flux pipeline for prompt indices i [B] (module docstring)."""

    frame = FLOW

    def __init__(self, pipe: Any, emb: torch.Tensor, pooled: torch.Tensor, *, t_min: float,
                 guidance: float | None, packed: bool):
        self.pipe, self.emb, self.pooled = pipe, emb, pooled
        self.t_min, self.guidance, self.packed = t_min, guidance, packed

    def __call__(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rows = idx.to(device=self.emb.device, dtype=torch.long)
        net = self.pipe.transformer
        kwargs: dict[str, Any] = {}
        x_in = x
        if self.packed:
            device = next(net.parameters()).device
            x_in = pack(x)
            kwargs = {"img_ids": image_ids(x.shape[2], x.shape[3], device),
                      "txt_ids": torch.zeros(self.emb.shape[1], 3, device=device)}
        den = DiffusersFlowDenoiser(net, encoder_hidden_states=self.emb[rows], pooled_projections=self.pooled[rows],
                                    guidance=self.guidance, t_min=self.t_min, transformer_kwargs=kwargs)
        out = den(x_in, t)
        return unpack(out, tuple(x.shape)) if self.packed else out

    def to(self, device: torch.device | str) -> FlowPrompts:
        self.pipe.to(device)
        self.emb, self.pooled = self.emb.to(device), self.pooled.to(device)
        return self


class NullPrompt:
    """D(x, σ) = D(x, σ, ∅): a prompt model without prompts (every sample gets row `index`, the negative prompt)."""

    def __init__(self, cond: VPPrompts | FlowPrompts, index: int):
        self.cond, self.index = cond, index
        self.frame = getattr(cond, "frame", EDM)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.cond(x, sigma, torch.full((x.shape[0],), self.index, dtype=torch.long))

    def to(self, device: torch.device | str) -> NullPrompt:
        self.cond.to(device)
        return self


def _size(pipe: Any, family: str, options: Any) -> tuple[int, int, int]:
    """(height, width, the pixel multiple they must be) with the pipeline's default size."""
    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    net = _network(pipe)
    if family == "flux":
        default, multiple = 128 * vsf, 2 * vsf  # FluxPipeline.default_sample_size; 2×2 latent tokens
    else:
        size = net.config.sample_size
        default = int(size[0] if isinstance(size, (list, tuple)) else size) * vsf
        multiple = vsf * (int(net.config.patch_size) if family == "sd3" else 1)
    height, width = options.height or default, options.width or default
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ModelError(f"--{name} {value}: must be a multiple of {multiple} for this pipeline (VAE factor "
                             f"{vsf}{', 2x2 latent tokens' if family == 'flux' else ''}"
                             f"{', patch size' if family == 'sd3' else ''})")
    return height, width, vsf


def _flow_settings(pipe: Any, family: str, lat_h: int, lat_w: int) -> tuple[float, str]:
    """(t_min, default schedule spec) of a flow pipeline's scheduler config: its shift, or its dynamic shift's μ
    for this image's token count (Flux: 2×2 latent tokens; SD3: patch_size² latents per token)."""
    config = dict(pipe.scheduler.config)
    settings = FlowSettings.of(config)
    mu = None
    parts: list[str] = []
    if settings.dynamic:
        patch = 2 if family == "flux" else int(pipe.transformer.config.patch_size)
        tokens = (lat_h // patch) * (lat_w // patch)
        lo, hi = float(config.get("base_image_seq_len", 256)), float(config.get("max_image_seq_len", 4096))
        b0, b1 = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
        m = (b1 - b0) / (hi - lo)
        mu = tokens * m + b0 - m * lo
        parts.append(f"mu={mu:.6g}")
        if settings.shift_type == "linear":
            parts.append("type=linear")
    else:
        parts.append(f"shift={settings.shift:g}")
    if settings.terminal is not None:
        parts.append(f"terminal={settings.terminal:g}")
    if settings.spacing != "linear":
        parts.append(f"spacing={settings.spacing}")
    mu = float(f"{mu:.6g}") if mu is not None else None  # the μ the schedule spec names
    return settings.t_min(mu), "flow:" + ",".join(parts)


def build_model(pipe: Any, family: str, options: Any, name: str, folder_fingerprint: str) -> ModelInfo:
    """The ModelInfo of a loaded pipeline with `options` (a diffusers_dir.PipelineOptions): its unconditional D
    is the negative prompt's; `with_prompts(texts)` encodes the texts once and conditions on prompt indices
    (fewstep.conditioning, ∅ = P)."""
    height, width, vsf = _size(pipe, family, options)
    net = _network(pipe)
    negative = options.negative_prompt
    _, _, null, null_pooled = encode(pipe, family, [""], negative)
    record: dict[str, Any] = {"pipeline": type(pipe).__name__, "folder_fingerprint": folder_fingerprint,
                              "dtype": options.dtype, "height": height, "width": width, "negative_prompt": negative}
    if family in ("sd", "sdxl"):
        shape = (int(net.config.in_channels), height // vsf, width // vsf)
        den = DiffusersDenoiser(net, pipe.scheduler, encoder_hidden_states=null)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32) \
            if family == "sdxl" else None
        record["prediction_type"] = den.table.prediction_type

        def make(emb: torch.Tensor, pooled: torch.Tensor | None) -> VPPrompts:
            return VPPrompts(den, pipe, emb, pooled, time_ids)

        sigma_min, sigma_max, frame, schedule, bottleneck = den.sigma_min, den.sigma_max, EDM, "", den.bottleneck
    else:
        packed = family == "flux"
        channels = int(net.config.in_channels) // (4 if packed else 1)
        lat_h, lat_w = (2 * (height // (2 * vsf)), 2 * (width // (2 * vsf))) if packed else (height // vsf,
                                                                                            width // vsf)
        shape = (channels, lat_h, lat_w)
        t_min, schedule = _flow_settings(pipe, family, lat_h, lat_w)
        guidance = None
        if getattr(net.config, "guidance_embeds", False):
            guidance = FLUX_GUIDANCE if options.embedded_guidance is None else float(options.embedded_guidance)
            record["embedded_guidance"] = guidance

        def make(emb: torch.Tensor, pooled: torch.Tensor | None) -> FlowPrompts:
            return FlowPrompts(pipe, emb, pooled, t_min=t_min, guidance=guidance, packed=packed)

        sigma_min, sigma_max, frame, bottleneck = t_min, 1.0, FLOW, None
    fingerprint = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]

    def with_prompts(texts: list[str]) -> ModelInfo:
        emb, pooled, _, _ = encode(pipe, family, list(texts), negative)
        table = torch.cat([emb, null.to(emb.device)])
        pooled_table = None if pooled is None else torch.cat([pooled, null_pooled.to(pooled.device)])
        return dataclasses.replace(info, num_classes=len(texts), cond_denoiser=make(table, pooled_table),
                                   with_prompts=None, device=str(_device(pipe)))

    vae = pipe.vae

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """Final latents → images in [−1, 1] through the pipeline's VAE (float32)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
            return vae.decode(z, return_dict=False)[0].float()

    kind = record.get("prediction_type", "flow")
    info = ModelInfo(name, NullPrompt(make(null, null_pooled), 0), shape, sigma_min, sigma_max,
                     description=f"{record['pipeline']} ({kind}) at {height}x{width}, {options.dtype}",
                     bottleneck=bottleneck, fingerprint=fingerprint, with_prompts=with_prompts, frame=frame,
                     decode=decode, schedule=schedule, state_dtype=torch.float32, record=record)
    return info


__all__ = ["FlowPrompts", "NullPrompt", "VPPrompts", "build_model", "encode", "load_pipeline", "pack", "unpack"]
