"""Flow-matching pipelines in diffusers (docs/integrations.md, "Flow models"): `FewstepScheduler` from a
FlowMatchEuler / flow UniPC config, and `DiffusersFlowDenoiser`, checked on the exact flow mixture and inside real
`StableDiffusion3Pipeline` / `FluxPipeline` objects built from tiny random components (prompt embeddings passed
directly: no text encoder, nothing downloaded).

Conventions: the pipeline's latents are x_t (x_1 = ε, `init_noise_sigma` = 1); `timesteps` are t·1000 (SD3 feeds
them to its transformer, Flux divides by 1000 again); a pipeline's `sigmas=` are shifted once, as FlowMatchEuler
does; `sigmas` is the grid followed by 0 (the final step x₀ = D(x, t_min), one model call).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fewstep
from fewstep.errors import SolverError
from fewstep.flow import flow_grid, shift_time
from fewstep.models.flow import FlowGaussianMixture
from fewstep.models.registry import gmm_parameters

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
)

from fewstep.integrations.diffusers import DiffusersFlowDenoiser, FewstepScheduler  # noqa: E402

GMM_FLOW = FlowGaussianMixture(*gmm_parameters())
NOISE = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
B = 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def mixture_loop(sched, x: torch.Tensor, afs_input: bool = False, **timesteps) -> torch.Tensor:
    """A flow pipeline's loop on the exact mixture: the velocity at the latents and the timestep / 1000 (flow
    pipelines call no scale_model_input; `afs_input` does, as a custom loop may)."""
    sched.set_timesteps(**timesteps)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t) if afs_input else x
        tt = (t.double() / 1000).expand(x.shape[0])
        x = sched.step(GMM_FLOW.velocity(x_in.double(), tt).to(x.dtype), t, x).prev_sample
    return x


def seen_by_pipeline(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The D a pipeline loop makes of the mixture: the velocity at its float32 timestep t·1000 (the loop above),
    combined with the exact t (the scheduler's D = x_t − t·v). The reference for `fewstep.sample`."""
    t_net = (t.float().double() * 1000).float().double() / 1000
    return x - t.reshape(-1, 1, 1, 1) * GMM_FLOW.velocity(x, t_net)


seen_by_pipeline.frame = fewstep.frames.FLOW


# ------------------------------------------------------------------------------------- the scheduler alone


FLOW_CONFIGS = [
    ({"shift": 3.0}, {}),
    ({"use_dynamic_shifting": True}, {"mu": 1.15}),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 2.0}),
    ({"shift": 3.0, "shift_terminal": 0.1}, {}),
    ({"shift": 3.0, "use_karras_sigmas": True}, {}),
]


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("config,kw", FLOW_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "-")
def test_euler_equals_flow_match_euler_on_the_same_sigmas(config, kw, n):
    """FewstepScheduler(solver="euler") from a FlowMatchEuler config is FlowMatchEuler on the sigmas a Flux-style
    pipeline passes (linspace(1, 1/N, N) with μ): same grid (shifted once by both), same sample."""
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = FewstepScheduler.from_config(ref.config, solver="euler")
    assert ours.config.prediction_type == "flow_prediction" and ours.frame is fewstep.frames.FLOW
    sigmas = np.linspace(1, 1 / n, n)
    a = mixture_loop(ref, NOISE.clone(), sigmas=sigmas, **kw)
    b = mixture_loop(ours, NOISE.clone(), sigmas=sigmas, **kw)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-6, atol=1e-4)
    assert ours.sigmas[0] == 1 and ours.sigmas[-1] == 0 and len(ours.timesteps) == n
    assert ours.init_noise_sigma == 1
    fresh = FewstepScheduler.from_config(ref.config)
    assert fresh.scale_model_input(NOISE) is NOISE  # identity (before a run; during one: the pending x_t itself)
    fresh.set_timesteps(sigmas=sigmas, **kw)
    assert torch.equal(fresh.scale_model_input(NOISE), NOISE)
    assert rel(b, a) <= 1e-6


def test_default_grid_is_shifted_once():
    """Without sigmas: fewstep's flow grid (linear in the unshifted time over [1/1000, 1], shifted once) and not
    FlowMatchEuler's own default, which shifts the end of its already shifted range again."""
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = FewstepScheduler.from_config(ref.config, solver="euler")
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    t_min = float(shift_time(torch.tensor([1e-3], dtype=torch.float64), 3.0))
    expected = flow_grid(5, t_min, 1.0, shift=3.0)
    assert torch.equal(ours.grid, expected) and ours.sigmas[-1] == 0
    assert ours.grid[-1] == pytest.approx(0.0030, abs=1e-4) and float(ref.sigmas[-2]) == pytest.approx(0.0089, abs=1e-4)
    # the pipeline's own sigmas (once shifted) reproduce fewstep's grid: pass sigmas= to FlowMatchEuler
    ref.set_timesteps(sigmas=shift_time(expected, 1 / 3.0).numpy())
    torch.testing.assert_close(ref.sigmas[:-1].double(), expected, rtol=1e-6, atol=0)


SOLVERS = ["dpmpp:max_order=3", "dpmpp:max_order=2", "unipc", "unipc:variant=bh1,max_order=3", "heun", "dpm2",
           "deis", "ipndm", "ipndm_v", "amed"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_equals_fewstep_sample(solver):
    """In the pipeline's loop every solver gives `fewstep.sample` on the scheduler's grid (float64 latents: the
    same arithmetic); `timesteps` has one entry per model call, `order` the calls per interval."""
    sched = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver=solver)
    out = mixture_loop(sched, NOISE.double(), num_inference_steps=6)
    spec = fewstep.methods.SolverSpec.parse(solver)
    ref = fewstep.sample(seen_by_pipeline, NOISE.double(), spec.solver, sched.grid, **spec.options)
    assert rel(out, ref) <= 1e-12
    assert len(sched.timesteps) == fewstep.nfe(spec.solver, 6, denoise_to_zero=True, **spec.options)
    assert sched.order == (2 if spec.solver in ("heun", "dpm2", "amed") else 1)


def test_afs_in_a_flow_loop():
    """AFS's first node is analytic (D₀ = 0 at t = 1), so the first model call is at t_1·ε, not at the pipeline's
    latents ε: a loop that calls scale_model_input gets it; one that does not (the flow pipelines) is refused
    with a message pointing to unet=pipe.transformer (tested in the pipeline below)."""
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    sched = FewstepScheduler.from_config(config, solver="ipndm", afs=True)
    out = mixture_loop(sched, NOISE.double(), afs_input=True, num_inference_steps=5)
    ref = fewstep.sample(seen_by_pipeline, NOISE.double(), "ipndm", sched.grid, afs=True)
    assert rel(out, ref) <= 1e-12 and len(sched.timesteps) == 4
    with pytest.raises(SolverError, match="unet=pipe.transformer"):
        mixture_loop(sched, NOISE.double(), num_inference_steps=5)


def test_unipc_and_dpm_flow_configs():
    """A Wan-style UniPC config (use_flow_sigmas, flow_shift) and a DPM one with dynamic shifting are flow
    schedulers on fewstep's flow grid (shift = flow_shift, or e^μ)."""
    wan = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    sched = FewstepScheduler.from_config(wan.config, solver="unipc")
    sched.set_timesteps(8)
    t_min = float(shift_time(torch.tensor([1e-3], dtype=torch.float64), 5.0))
    assert torch.equal(sched.grid, flow_grid(8, t_min, 1.0, shift=5.0))
    out = mixture_loop(sched, NOISE.double(), num_inference_steps=8)
    assert rel(out, fewstep.sample(seen_by_pipeline, NOISE.double(), "unipc", sched.grid)) <= 1e-12
    dpm = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                use_dynamic_shifting=True)
    sched = FewstepScheduler.from_config(dpm.config, solver="dpmpp")
    sched.set_timesteps(6, mu=1.0)
    assert torch.allclose(sched.grid, flow_grid(6, float(shift_time(torch.tensor([1e-3]).double(), np.e)), 1.0,
                                                shift=np.e), rtol=1e-12)


def test_flow_config_errors_and_roundtrip(tmp_path):
    with pytest.raises(SolverError, match="prediction_type"):
        FewstepScheduler.from_config(UniPCMultistepScheduler(use_flow_sigmas=True).config)  # ε-prediction
    with pytest.raises(SolverError, match="invert_sigmas"):
        FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config)
    with pytest.raises(SolverError, match="stochastic_sampling"):
        FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config)
    with pytest.raises(fewstep.errors.FewstepError, match="shift must be positive"):
        FewstepScheduler(prediction_type="flow_prediction", shift=-1.0)
    with pytest.raises(Exception, match="prediction_type"):
        FewstepScheduler(prediction_type="flow")
    dyn = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(SolverError, match="mu"):
        dyn.set_timesteps(4)
    with pytest.raises(SolverError, match="flow sigmas"):
        dyn.set_timesteps(sigmas=[2.0, 1.0, 0.5], mu=1.0)
    with pytest.raises(SolverError, match="add_noise"):
        FewstepScheduler().scale_noise(NOISE, torch.tensor([500.0]), NOISE)
    sched = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="dpmpp",
                                         solver_options={"max_order": 3})
    sched.save_pretrained(tmp_path)
    again = FewstepScheduler.from_pretrained(tmp_path)
    assert again.frame is fewstep.frames.FLOW and again.config.shift == 3.0
    sched.set_timesteps(5)
    again.set_timesteps(5)
    assert torch.equal(sched.timesteps, again.timesteps)


def test_img2img_starts_part_way():
    """scale_noise is x_t = (1 − t)·x₀ + t·ε at that timestep; set_begin_index(k) (img2img, strength < 1) starts
    the run at grid point k from those latents, as fewstep.sample on grid[k:] does."""
    sched = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="dpmpp")
    sched.set_timesteps(8)
    k = 3
    image, noise = NOISE.double() * 0.5, NOISE.double().flip(0)
    t = sched.grid[k]
    start = sched.scale_noise(image, sched.timesteps[k : k + 1], noise)
    torch.testing.assert_close(start, (1 - t) * image + t * noise)
    sched.set_begin_index(k)
    x = start
    for ts in sched.timesteps[k:]:
        x = sched.step(GMM_FLOW.velocity(x, (ts.double() / 1000).expand(4)), ts, x).prev_sample
    ref = fewstep.sample(seen_by_pipeline, start / float(sched.grid[k]), "dpmpp", sched.grid[k:])  # x at grid[k]
    assert rel(x, ref) <= 1e-12
    heun = FewstepScheduler.from_config(sched.config, solver="heun")
    heun.set_timesteps(8)
    with pytest.raises(SolverError, match="grid point"):
        heun.set_begin_index(3)  # Heun's call 3 is a second stage


def test_learned_flow_card_in_the_scheduler(tmp_path):
    """A card learned on a flow model runs in flow mode on its own grid (Flux-style pipelines pass sigmas: they
    only fix the step count); an EDM card is refused there."""
    from fewstep.learned import Card, save_card

    if not hasattr(Card, "frame"):
        pytest.skip("cards do not record their model's frame yet")
    grid = flow_grid(5, 0.01, 1.0, shift=3.0).tolist()
    card = Card(base="dpmpp", base_options={}, afs=False, sigmas=grid, offsets=[0.0, 0.03, -0.02, 0.01],
                coeffs=[[0.01, 0.0], [0.02, -0.01], [-0.01, 0.01], [0.03, 0.0]], params=["offsets", "coeffs"],
                model={"frame": "flow"})
    save_card(tmp_path / "flow", card)
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    sched = FewstepScheduler.from_config(config, solver=f"learned:{tmp_path / 'flow'}")
    out = mixture_loop(sched, NOISE.double(), sigmas=np.linspace(1, 1 / 5, 5))
    assert torch.equal(sched.grid, torch.tensor(grid, dtype=torch.float64)) and len(sched.timesteps) == card.nfe
    assert rel(out, fewstep.sample(seen_by_pipeline, NOISE.double(), card.solver())) <= 1e-12
    save_card(tmp_path / "edm", Card(base="euler", base_options={}, afs=False, sigmas=[80.0, 1.0, 0.002],
                                     offsets=[0.0, 0.0]))
    with pytest.raises(SolverError, match="learned on an EDM / diffusion model"):
        FewstepScheduler.from_config(config, solver=f"learned:{tmp_path / 'edm'}")


# ----------------------------------------------------------------------------------- real flow pipelines


@pytest.fixture(scope="module", autouse=True)
def _no_grad():
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    emb = {"prompt_embeds": torch.randn(B, 7, 32, generator=g), "pooled_prompt_embeds": torch.randn(B, 64, generator=g),
           "negative_prompt_embeds": torch.randn(B, 7, 32, generator=g),
           "negative_pooled_prompt_embeds": torch.randn(B, 64, generator=g)}
    latents = torch.randn(B, 4, 8, 8, generator=g)
    return pipe, pipe.scheduler, emb, latents


def run_sd3(sd3, scheduler, **kwargs) -> torch.Tensor:
    pipe, _, emb, latents = sd3
    pipe.scheduler = scheduler
    return pipe(latents=latents.clone(), height=8, width=8, guidance_scale=3.0, output_type="latent", **emb,
                **kwargs).images


def sd3_denoiser(sd3) -> DiffusersFlowDenoiser:
    pipe, _, emb, _ = sd3
    return DiffusersFlowDenoiser(pipe.transformer, encoder_hidden_states=emb["prompt_embeds"],
                                 pooled_projections=emb["pooled_prompt_embeds"],
                                 negative_encoder_hidden_states=emb["negative_prompt_embeds"],
                                 negative_pooled_projections=emb["negative_pooled_prompt_embeds"], guidance_scale=3.0)


def test_sd3_pipeline_euler_equals_its_flow_match_euler(sd3):
    pipe, base, _, latents = sd3
    sigmas = list(np.linspace(1, 1 / 5, 5))
    ref = run_sd3(sd3, base, sigmas=sigmas)
    ours = run_sd3(sd3, FewstepScheduler.from_config(base.config, solver="euler"), sigmas=sigmas)
    assert rel(ours, ref) <= 1e-5
    # the transformer as a fewstep denoiser reproduces the pipeline's own loop
    den = sd3_denoiser(sd3)
    assert den.time_scale == 1000 and den.frame is fewstep.frames.FLOW
    direct = fewstep.sample(den, latents, "euler", base.sigmas[:-1].double())
    assert rel(direct, ref) <= 1e-5


@pytest.mark.parametrize("solver", ["dpmpp:max_order=3", "heun", "unipc"])
def test_sd3_pipeline_runs_every_solver(sd3, solver):
    """Other solvers run in the real pipeline (default grid: fewstep's flow grid) and equal `fewstep.sample` with
    the transformer as a DiffusersFlowDenoiser (same guidance) on the scheduler's grid."""
    _, base, _, latents = sd3
    sched = FewstepScheduler.from_config(base.config, solver=solver)
    out = run_sd3(sd3, sched, num_inference_steps=5)
    spec = fewstep.methods.SolverSpec.parse(solver)
    ref = fewstep.sample(sd3_denoiser(sd3), latents, spec.solver, sched.grid, **spec.options)
    assert rel(out, ref) <= 1e-5


def test_sd3_pipeline_afs_and_amed_need_the_transformer(sd3):
    """AFS (first call not at the pipeline's latents) and AMED-Plugin (per-sample times) use unet=pipe.transformer:
    its pre-hook hands the network the solver's state and times; without it, AFS is refused."""
    from fewstep.amed.predictor import AMEDPredictor
    from fewstep.amed.solver import AMEDPlugin
    from fewstep.solvers import get_solver

    pipe, base, _, latents = sd3
    with pytest.raises(SolverError, match="unet=pipe.transformer"):
        run_sd3(sd3, FewstepScheduler.from_config(base.config, solver="ipndm", afs=True), num_inference_steps=5)
    sched = FewstepScheduler.from_config(base.config, solver="ipndm", afs=True, unet=pipe.transformer)
    out = run_sd3(sd3, sched, num_inference_steps=5)
    assert len(sched.timesteps) == 4 and not pipe.transformer._forward_pre_hooks
    assert rel(out, fewstep.sample(sd3_denoiser(sd3), latents, "ipndm", sched.grid, afs=True)) <= 1e-5
    torch.manual_seed(3)
    predictor = AMEDPredictor(scale_dir=0.05, scale_time=0.2).eval()
    sched = FewstepScheduler.from_config(base.config, solver="dpmpp", predictor=predictor, unet=pipe.transformer)
    out = run_sd3(sd3, sched, num_inference_steps=4)
    ref = fewstep.sample(sd3_denoiser(sd3), latents, AMEDPlugin(get_solver("dpmpp"), predictor), sched.grid)
    assert rel(out, ref) <= 1e-5


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=True).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(1), text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    emb = {"prompt_embeds": torch.randn(B, 6, 32, generator=g), "pooled_prompt_embeds": torch.randn(B, 32, generator=g)}
    latents, image_ids = pipe.prepare_latents(B, 1, 16, 16, torch.float32, "cpu", g)  # packed: [B, 64, 4]
    return pipe, scheduler, emb, latents, image_ids


def run_flux(flux, scheduler, **kwargs) -> torch.Tensor:
    pipe, _, emb, latents, _ = flux
    pipe.scheduler = scheduler
    return pipe(latents=latents.clone(), height=16, width=16, guidance_scale=3.5, output_type="latent", **emb,
                **kwargs).images


def flux_denoiser(flux) -> DiffusersFlowDenoiser:
    pipe, _, emb, latents, image_ids = flux
    return DiffusersFlowDenoiser(pipe.transformer, encoder_hidden_states=emb["prompt_embeds"],
                                 pooled_projections=emb["pooled_prompt_embeds"], guidance=3.5,
                                 transformer_kwargs={"img_ids": image_ids,
                                                     "txt_ids": torch.zeros(emb["prompt_embeds"].shape[1], 3)})


@pytest.mark.parametrize("solver", ["euler", "dpmpp:max_order=3", "heun"])
def test_flux_pipeline(flux, solver):
    """Packed latents, the guidance embedding and the dynamic shift μ of the image size: the pipeline passes
    sigmas = linspace(1, 1/N, N) and μ; Euler reproduces its FlowMatchEuler result, every solver equals
    fewstep.sample with the transformer as a DiffusersFlowDenoiser."""
    pipe, base, _, latents, _ = flux
    sched = FewstepScheduler.from_config(base.config, solver=solver)
    out = run_flux(flux, sched, num_inference_steps=4)
    assert out.shape == latents.shape and sched.sigmas[0] == 1
    den = flux_denoiser(flux)
    assert den.time_scale == 1
    spec = fewstep.methods.SolverSpec.parse(solver)
    assert rel(out, fewstep.sample(den, latents, spec.solver, sched.grid, **spec.options)) <= 1e-5
    if solver == "euler":
        ref = run_flux(flux, base, num_inference_steps=4)
        torch.testing.assert_close(sched.sigmas, base.sigmas, rtol=1e-6, atol=1e-7)
        assert rel(out, ref) <= 1e-5


def test_flow_denoiser_errors(flux):
    from fewstep.errors import ModelError

    pipe = flux[0]
    with pytest.raises(ModelError, match="guidance="):
        DiffusersFlowDenoiser(pipe.transformer)
    with pytest.raises(ModelError, match="negative"):
        DiffusersFlowDenoiser(pipe.transformer, guidance=3.5, encoder_hidden_states=flux[2]["prompt_embeds"],
                              guidance_scale=2.0)


def test_flux_pipeline_amed_and_afs(flux):
    """AMED-Plugin with AFS in the Flux pipeline (unet=pipe.transformer): the pre-hook hands the transformer the
    AFS state and the per-sample times in Flux's units (t: the pipeline divides the timesteps by 1000)."""
    from fewstep.amed.predictor import AMEDPredictor
    from fewstep.amed.solver import AMEDPlugin
    from fewstep.solvers import get_solver

    pipe, base, _, latents, _ = flux
    torch.manual_seed(3)
    predictor = AMEDPredictor(scale_dir=0.05, scale_time=0.2).eval()
    sched = FewstepScheduler.from_config(base.config, solver="ipndm", afs=True, predictor=predictor,
                                         unet=pipe.transformer)
    seen: list[torch.Tensor] = []
    handle = pipe.transformer.time_text_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        out = run_flux(flux, sched, num_inference_steps=4)
    finally:
        handle.remove()
    assert any(not torch.equal(t, t.flip(0)) for t in seen)  # per-sample times reached the network
    ref = fewstep.sample(flux_denoiser(flux), latents, AMEDPlugin(get_solver("ipndm"), predictor), sched.grid, afs=True)
    assert rel(out, ref) <= 1e-5 and not pipe.transformer._forward_pre_hooks


def test_sd3_img2img_pipeline(sd3):
    """A real img2img pipeline (strength 0.6): set_begin_index at the pipeline's t_start and scale_noise at its
    first timestep; Euler reproduces FlowMatchEuler on the same sigmas."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe, base, emb, _ = sd3
    img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(B, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    out = {}
    ours = FewstepScheduler.from_config(base.config, solver="euler")
    for name, scheduler in (("diffusers", base), ("fewstep", ours)):
        img2img.scheduler = scheduler
        out[name] = img2img(image=image, strength=0.6, sigmas=list(np.linspace(1, 1 / 5, 5)), guidance_scale=3.0,
                            output_type="latent", generator=torch.Generator().manual_seed(6), **emb).images
    assert img2img.scheduler.begin_index == 2 and rel(out["fewstep"], out["diffusers"]) <= 1e-5
    img2img.scheduler = FewstepScheduler.from_config(base.config, solver="dpmpp")
    assert torch.isfinite(img2img(image=image, strength=0.6, num_inference_steps=6, guidance_scale=3.0,
                                  output_type="latent", **emb).images).all()
