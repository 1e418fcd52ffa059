"""diffusers models as fewstep denoisers, and fewstep's solvers as a diffusers scheduler.

`DiffusersDenoiser` wraps a `UNet2DModel` / `UNet2DConditionModel` and the ᾱ table of its training scheduler as
D(x, σ) (docs/maths.md §2, discrete VP models):

* σ_k = √((1 − ᾱ_k)/ᾱ_k); the network sees x_vp = x/√(1 + σ²) and the timestep of σ found by interpolating
  log σ over the table (fractional, the default) or that timestep rounded (`snap_timesteps=True`, diffusers'
  choice for Karras σ's: the σ itself is kept for the input scaling and the conversion below).
* ε-prediction: D = x − σ·ε̂; v-prediction: D = α·x_vp − s·v̂ (α = 1/√(1+σ²), s = σα); `sample`: D = x̂₀.
  A network with 2C output channels (learned variance) is read through its first C channels.
* Classifier-free guidance in one doubled batch [uncond; cond] with ε = ε_u + w(ε_c − ε_u) computed in the
  network's dtype, exactly as diffusers' pipelines do; the network is called in its own dtype while x, σ and
  D stay in the solver's float32/float64.
* Per-sample prompts (docs/maths.md, "Conditions and guidance"): `denoiser(x, σ, cond)` takes prompt embeddings
  [B, L, E] (one plain batch; guidance then comes from fewstep.conditioning's wrapper), and `pipeline_model(pipe)` is a ModelInfo whose
  `with_prompts(texts)` (`--prompts FILE`) encodes the prompts once and conditions on prompt indices (∅ = P).
* `sigma_table`, `sigma_min`, `sigma_max` (the `discrete` schedule works on it) and `bottleneck`: a tap module
  that receives the `mid_block` output of the conditional rows during every call (AMED's features; a forward
  hook on it works like a hook on the mid_block of an unguided model).

`DiffusersFlowDenoiser` wraps a diffusers flow transformer (SD3, Flux, Wan, …) as the flow-frame D(x_t, t) =
x_t − t·v (docs/maths.md §15): its `frame` is `fewstep.frames.FLOW`, so `fewstep.sample(den, noise, solver,
grid)` starts at x_1 = noise on a flow-time grid and ends with the step to t = 0.

`FewstepScheduler` runs any fewstep solver inside an unchanged diffusers pipeline (VP pipelines; flow pipelines
from a FlowMatch* / `use_flow_sigmas` config, see `diffusers_flow`). How it works:

* **All solver maths stays in fewstep.** The scheduler runs fewstep's driver (`fewstep.solvers.run`, the
  generator behind `fewstep.sample`): it yields one request per model evaluation, and `step()` answers the
  pending one with the D made from the pipeline's network output and returns the state of the next one as
  `prev_sample` (or the result). Each call does O(1) solver work and keeps nothing beyond the solver's own
  history, so the result is the one `fewstep.sample` computes. Nothing survives `set_timesteps`, so two
  pipeline calls never share state.
* **Coordinates.** The pipeline's latents are fewstep's VE state x (k-diffusion convention, as diffusers' Euler
  and Heun schedulers): `init_noise_sigma` = σ_0, so the pipeline's x_T = σ_0·z is fewstep's; `scale_model_input`
  returns x_vp = x/√(1 + σ²) of the requested evaluation; the final latents are the state at σ_min, or
  D(x, σ_min) with `final_sigmas_type="zero"` (the default, = `denoise_to_zero`). Latents edited between steps
  (`callback_on_step_end`, inpainting blends) are honoured as diffusers' own schedulers do: the network sees the
  edited latents and the run continues from them. An edit of the state of an intermediate evaluation (Heun's
  second stage, DPM-Solver-2's midpoint, AMED's inserted point) cannot be: it is ignored with a warning.
* **Timesteps.** `num_inference_steps` counts intervals as diffusers does (the final step to σ = 0 included):
  N = num_inference_steps grid points with `final_sigmas_type="zero"`, num_inference_steps + 1 otherwise.
  `timesteps` lists one model timestep per network call (NFE entries): multi-evaluation solvers (heun, dpm2,
  AMED-Plugin) get their intermediate points interleaved, and `order` is their evaluations per interval, so the
  pipeline's progress bar counts intervals. Custom `timesteps=` (model timesteps of the grid) and `sigmas=`
  (a trailing 0 means a final step to σ = 0) are accepted.
* **AFS** (analytical first step) works: the first direction is analytic, so the pipeline's first network call
  already happens at the solver's second evaluation point and `timesteps` is one shorter (NFE − 1). Before the
  first `step()` the batch size is unknown (the pipeline may have doubled the latents for guidance), so the
  first model input is computed from the latents handed to `scale_model_input`, split into their identical
  guidance copies (the first step from an analytic node is row-wise, so any split gives the same rows), and
  the run proper starts from the latents `step()` receives.
* **AMED-Plugin** (`predictor=` an `AMEDPredictor` or a checkpoint folder, `unet=pipe.unet`): the predictor reads
  the real `mid_block` output of the call at t_n (a forward hook on `unet.mid_block`, rows of the conditional
  branch when the batch is doubled for guidance, i.e. the same features as `DiffusersDenoiser.bottleneck`). Its
  intermediate times s_n are only known at run time and may differ per sample, so `timesteps` holds placeholders
  (the predictor's choice for zero features), the entry is rewritten in place as soon as s_n is known, and a
  forward pre-hook on the unet substitutes the exact per-sample timesteps while the scheduler is armed (between
  `scale_model_input` and `step`). Hooks exist only during a run.
* **Flow pipelines** (a FlowMatch* config, or UniPC / DPM with `use_flow_sigmas`): the latents are x_t
  (`init_noise_sigma` = 1), the network output is the velocity, `set_timesteps(N, device, sigmas=, mu=,
  timesteps=)` as Flux / SD3 call it (`sigmas` shifted once), `timesteps` = t·1000; img2img starts part-way
  (`scale_noise`, `set_begin_index` at a grid point). Flow pipelines feed their latents to the network without
  `scale_model_input`, so AFS's first call (and AMED's per-sample times) need `unet=pipe.transformer`.
* Not supported: starting part-way on VP models (img2img / inpainting with strength < 1: `set_begin_index(k > 0)`
  raises), stochastic samplers (fewstep's solvers are ODE solvers; `eta`/`generator` are not accepted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

try:
    from diffusers import UNet2DConditionModel
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError("fewstep.integrations.diffusers needs diffusers: pip install 'fewstep[diffusers]'") from e

from ..conditioning import batch_rows
from ..errors import ModelError
from ..frames import FLOW
from ..models.registry import ModelInfo
from ..solvers.base import bcast
from .diffusers_scheduler import FewstepScheduler
from .vp_table import PREDICTION_TYPES, VPTable, alphas_cumprod_from_config  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------------ denoiser


class BottleneckTap(nn.Module):
    """Identity module that `DiffusersDenoiser` calls with the bottleneck features of each model call, so that
    a forward hook on it (fewstep's `feature_source`) sees one row per sample even under guidance."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h


class DiffusersDenoiser:
    """A diffusers UNet (`UNet2DModel` / `UNet2DConditionModel`) as fewstep's D(x, σ).

    `alphas_cumprod`: the training ᾱ table, or a scheduler / scheduler config to take it from (e.g.
    `pipe.scheduler`). `prediction_type` defaults to that scheduler's. `encoder_hidden_states` (cond) and
    `negative_encoder_hidden_states` (uncond) are text embeddings with batch 1 or B; with the latter and
    `guidance_scale` ≠ 1 the network runs once on the doubled batch [uncond; cond]. `class_labels` and
    `unet_kwargs` are passed to the network (the caller matches them to the doubled batch when guiding).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Any, *, prediction_type: str | None = None,
                 snap_timesteps: bool = False, encoder_hidden_states: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 class_labels: torch.Tensor | None = None, unet_kwargs: dict[str, Any] | None = None):
        if prediction_type is None:
            cfg = getattr(alphas_cumprod, "config", alphas_cumprod)
            prediction_type = cfg.get("prediction_type", "epsilon") if hasattr(cfg, "get") else "epsilon"
        self.unet = unet
        self.table = VPTable(alphas_cumprod, prediction_type, snap_timesteps)
        if isinstance(unet, UNet2DConditionModel) and encoder_hidden_states is None:
            raise ModelError("a UNet2DConditionModel needs encoder_hidden_states (the prompt embeddings)")
        if negative_encoder_hidden_states is not None and encoder_hidden_states is None:
            raise ModelError("negative_encoder_hidden_states given without encoder_hidden_states")
        self.cond = encoder_hidden_states
        self.uncond = negative_encoder_hidden_states
        self.guidance_scale = float(guidance_scale)
        self.class_labels = class_labels
        self.unet_kwargs = dict(unet_kwargs or {})
        self.mid_block = getattr(unet, "mid_block", None)
        self.bottleneck: BottleneckTap | None = BottleneckTap() if self.mid_block is not None else None

    # what fewstep's samplers, schedules and the CLI read
    @property
    def sigma_table(self) -> torch.Tensor:
        return self.table.sigma_table

    @property
    def sigma_min(self) -> float:
        return self.table.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.table.sigma_max

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of one sample, from the network's config."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        return (int(cfg.in_channels), *map(int, size))

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.guidance_scale != 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None, *,
                 unet_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """D(x, σ); with `cond` (per-sample prompt embeddings [B, L, E]) the conditional D(x, σ, cond) of one
        plain batch, for fewstep.conditioning's guidance wrapper (the built-in guidance is then not applied).
        `unet_kwargs` (e.g. SDXL's per-sample `added_cond_kwargs`) update the constructor's for this call."""
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(-1)
        x_in, t = self.table.model_input(x, sigma), self.table.timesteps(sigma)
        kwargs = {**self.unet_kwargs, **(unet_kwargs or {})}
        guided = self.guided and cond is None
        if cond is not None or self.cond is not None:
            cond = batch_rows(self.cond if cond is None else cond, b, "encoder_hidden_states", ModelError)
            if guided:
                cond = torch.cat([batch_rows(self.uncond, b, "negative_encoder_hidden_states", ModelError), cond])
            kwargs["encoder_hidden_states"] = cond.to(self.dtype)
        if guided:
            x_in, t = torch.cat([x_in, x_in]), torch.cat([t, t])
        if self.class_labels is not None:
            kwargs["class_labels"] = self.class_labels
        captured: list[torch.Tensor] = []
        handle = None
        if self.bottleneck is not None:
            handle = self.mid_block.register_forward_hook(
                lambda m, i, o: captured.append(o[0] if isinstance(o, (tuple, list)) else o))
        try:
            device = next(self.unet.parameters()).device
            out = self.unet(x_in.to(device=device, dtype=self.dtype), t.to(device), return_dict=False, **kwargs)[0]
        finally:
            if handle is not None:
                handle.remove()
        if guided:
            eps_u, eps_c = out.chunk(2)
            out = eps_u + self.guidance_scale * (eps_c - eps_u)
        if self.bottleneck is not None and captured:
            self.bottleneck(captured[-1][-b:])  # the conditional rows under guidance
        return self.table.denoised(x, sigma, out)


class DiffusersFlowDenoiser:
    """A diffusers flow transformer (SD3, Flux, Wan, …) as fewstep's flow-frame denoiser D(x_t, t) = x_t − t·v.

    `x` is what the pipeline's latents are (Flux: packed [B, L, C·4]); the network is called as the pipelines
    call it: `transformer(hidden_states=x_t, timestep=t·time_scale, encoder_hidden_states=…,
    pooled_projections=…, guidance=…, **transformer_kwargs)`. `time_scale` defaults to 1 for Flux / Qwen-Image
    transformers (their pipelines pass t) and 1000 otherwise (SD3, Wan: t·1000). With
    `negative_encoder_hidden_states` (and `negative_pooled_projections`) and `guidance_scale` ≠ 1, classifier-free
    guidance runs on the doubled batch [uncond; cond] as SD3's pipeline does. `guidance` is Flux's embedded
    (distilled) guidance value; `transformer_kwargs` carries e.g. Flux's `img_ids` / `txt_ids`. Prompt
    embeddings have 1 or B rows. `t_min` is the end of the model's flow-time range (`sigma_min`; `sigma_max` = 1).
    """

    frame = FLOW

    def __init__(self, transformer: nn.Module, *, encoder_hidden_states: torch.Tensor | None = None,
                 pooled_projections: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None,
                 negative_pooled_projections: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 guidance: float | None = None, time_scale: float | None = None, t_min: float = 1e-3,
                 transformer_kwargs: dict[str, Any] | None = None):
        if time_scale is None:
            time_scale = 1.0 if type(transformer).__name__.startswith(("Flux", "QwenImage")) else 1000.0
        if not (time_scale > 0 and 0 < t_min < 1):
            raise ModelError(f"time_scale must be positive and t_min in (0, 1), got {time_scale!r}, {t_min!r}")
        if guidance is None and getattr(getattr(transformer, "config", None), "guidance_embeds", False):
            raise ModelError("this transformer embeds a guidance value (Flux-dev): give guidance=, e.g. 3.5")
        negatives = (negative_encoder_hidden_states, negative_pooled_projections)
        if guidance_scale != 1.0 and any(n is None for n, c in zip(negatives, (encoder_hidden_states,
                                                                             pooled_projections)) if c is not None):
            raise ModelError("guidance_scale != 1 needs the negative (unconditional) embeddings of every given one: "
                             "negative_encoder_hidden_states, negative_pooled_projections")
        self.transformer, self.time_scale, self.t_min = transformer, float(time_scale), float(t_min)
        self.cond = (encoder_hidden_states, pooled_projections)
        self.uncond = negatives
        self.guidance_scale, self.guidance = float(guidance_scale), guidance
        self.transformer_kwargs = dict(transformer_kwargs or {})

    @property
    def sigma_min(self) -> float:
        return self.t_min

    @property
    def sigma_max(self) -> float:
        return 1.0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def guided(self) -> bool:
        return self.uncond[0] is not None and self.guidance_scale != 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """D(x_t, t) = x_t − t·v (x and D in the solver's dtype, the network in its own)."""
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        kwargs = dict(self.transformer_kwargs)
        names = ("encoder_hidden_states", "pooled_projections")
        for name, cond, uncond in zip(names, self.cond, self.uncond):
            if cond is None:
                continue
            rows = batch_rows(cond, b, name, ModelError)
            if self.guided:
                rows = torch.cat([batch_rows(uncond, b, f"negative_{name}", ModelError), rows])
            kwargs[name] = rows.to(self.dtype)
        x_in, ts = x, t * self.time_scale
        if self.guided:
            x_in, ts = torch.cat([x, x]), torch.cat([ts, ts])
        device = next(self.transformer.parameters()).device
        if self.guidance is not None:
            kwargs["guidance"] = torch.full((x_in.shape[0],), float(self.guidance), device=device, dtype=torch.float32)
        out = self.transformer(hidden_states=x_in.to(device=device, dtype=self.dtype),
                               timestep=ts.to(device=device, dtype=torch.float32), return_dict=False, **kwargs)[0]
        if self.guided:
            v_u, v_c = out.chunk(2)
            out = v_u + self.guidance_scale * (v_c - v_u)
        return x - bcast(t.to(x.dtype), x) * out.to(device=x.device, dtype=x.dtype)


class PromptTable:
    """D(x, σ, i) for prompt indices i [B]: row i of prompt embeddings [P, L, E] encoded once, i = P the null
    (negative) prompt — the form of fewstep.conditioning's class-conditional models (`--prompts FILE`)."""

    def __init__(self, denoiser: DiffusersDenoiser, embeddings: torch.Tensor, null: torch.Tensor):
        self.denoiser = denoiser
        self.table = torch.cat([embeddings, null[:1]])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma, self.table[idx.to(self.table.device)])


def pipeline_model(pipe: Any, negative_prompt: str = "", name: str = "diffusers") -> ModelInfo:
    """A ModelInfo for a text-to-image pipeline (`pipe.unet`, `pipe.scheduler`, `pipe.encode_prompt`) whose
    `with_prompts(texts)` encodes the prompts once and conditions per sample on prompt indices; its plain
    `denoiser` is the unconditional (negative-prompt) D. Use from a `--model package.module:factory`."""
    device = next(pipe.unet.parameters()).device

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(texts, device, 1, True, negative_prompt=[negative_prompt] * len(texts))
        return cond, uncond[:1]

    _, null = encode([""])
    base = DiffusersDenoiser(pipe.unet, pipe.scheduler, encoder_hidden_states=null)

    def with_prompts(texts: list[str]) -> ModelInfo:
        emb, null_emb = encode(list(texts))
        return dataclasses.replace(info, num_classes=len(texts), cond_denoiser=PromptTable(base, emb, null_emb),
                                   with_prompts=None)

    info = ModelInfo(name, base, base.shape, base.sigma_min, base.sigma_max, description=f"{name} pipeline",
                     bottleneck=base.bottleneck, with_prompts=with_prompts)
    return info


__all__ = ["BottleneckTap", "DiffusersDenoiser", "DiffusersFlowDenoiser", "FewstepScheduler", "VPTable",
           "alphas_cumprod_from_config"]
