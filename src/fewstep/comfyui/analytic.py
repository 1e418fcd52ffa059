"""A minimal ComfyUI model around any fewstep denoiser, for checking samplers inside a real ComfyUI (the tests and
benchmarks/comfyui_bench.py; needs `comfy` importable).

ComfyUI samples a model through three objects: the MODEL (a ModelPatcher: `get_model_object`), the BaseModel
(`model_sampling`, `apply_model`, `scale_latent_inpaint`) and the guider that `KSAMPLER.sample` receives as
`model_wrap` (CFGGuider: called with `(x, sigma, model_options=…, seed=…)`, `inner_model` the BaseModel). Here
the BaseModel's network is replaced by a denoiser D(x, σ) in ComfyUI's own sigma convention (σ with x = x₀ + σ·ε
for EPS / V_PREDICTION / EDM, the flow time t with x = x_t for CONST): `apply_model` converts D into the
prediction of the model type (ε, v, x₀ or velocity) and back through ComfyUI's real `model_sampling` class,
exactly as BaseModel does with a network's output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODEL_TYPES = ("EPS", "V_PREDICTION", "EDM", "FLOW", "FLUX")  # comfy.model_base.ModelType names


def model_sampling(model_type: str, **settings: Any) -> Any:
    """ComfyUI's model_sampling object of `model_type` (comfy.model_base.model_sampling itself) with the
    config's `sampling_settings` (e.g. shift=3.0 for FLOW; sigma_min, sigma_max, sigma_data for EDM)."""
    from comfy.model_base import ModelType
    from comfy.model_base import model_sampling as make

    return make(SimpleNamespace(sampling_settings=settings), ModelType[model_type])


class AnalyticBaseModel(torch.nn.Module):
    """ComfyUI's BaseModel with a denoiser in place of the network; counts its calls (`calls`)."""

    def __init__(self, denoiser: Denoiser, sampling: Any):
        super().__init__()
        self.denoiser, self.model_sampling, self.calls = denoiser, sampling, 0

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sigma = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        self.calls += 1
        ms = self.model_sampling
        denoised = self.denoiser(x, sigma).to(x.dtype)
        # the network output whose calculate_denoised is D: calculate_denoised is affine in the output
        offset = ms.calculate_denoised(sigma, torch.zeros_like(x), x)
        scale = ms.calculate_denoised(sigma, torch.ones_like(x), torch.zeros_like(x))
        return ms.calculate_denoised(sigma, (denoised - offset) / scale, x)

    def scale_latent_inpaint(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                             **kwargs: Any) -> torch.Tensor:
        from comfy.model_base import BaseModel

        return BaseModel.scale_latent_inpaint(self, sigma=sigma, noise=noise, latent_image=latent_image)


class Guider:
    """The `model_wrap` KSAMPLER.sample receives (CFGGuider's role, one condition, no guidance)."""

    def __init__(self, model: AnalyticBaseModel):
        self.inner_model = model

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict[str, Any] | None = None,
                 seed: int | None = None) -> torch.Tensor:
        return self.inner_model.apply_model(x, sigma)


class Patcher:
    """The MODEL a node receives (ModelPatcher's `get_model_object`)."""

    def __init__(self, model: AnalyticBaseModel):
        self.model = model

    def get_model_object(self, name: str) -> Any:
        return functools.reduce(getattr, name.split("."), self.model)


def comfy_model(denoiser: Denoiser, model_type: str = "EPS", **settings: Any) -> Patcher:
    """A MODEL of `model_type` (EPS, V_PREDICTION, EDM, FLOW, FLUX) around `denoiser`."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} not in {list(MODEL_TYPES)}")
    return Patcher(AnalyticBaseModel(denoiser, model_sampling(model_type, **settings)))


def ksample(sampler: Any, model: Patcher, sigmas: torch.Tensor, noise: torch.Tensor,
            latent_image: torch.Tensor | None = None, denoise_mask: torch.Tensor | None = None,
            callback: Callable[..., Any] | None = None, seed: int = 0) -> torch.Tensor:
    """`sampler.sample` (a comfy.samplers.KSAMPLER) as CFGGuider.inner_sample calls it: noise scaling, the
    denoise mask and the callback `callback(step, x0, x, total_steps)` are ComfyUI's."""
    latent = torch.zeros_like(noise) if latent_image is None else latent_image
    extra_args = {"model_options": {"transformer_options": {"sample_sigmas": sigmas}}, "seed": seed}
    with torch.no_grad():
        return sampler.sample(Guider(model.model), sigmas, extra_args, callback, noise, latent, denoise_mask, True)
