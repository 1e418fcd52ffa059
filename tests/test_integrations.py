"""Ecosystem integrations: diffusers denoiser + scheduler, k-diffusion-style samplers (user model factories, which
need neither, are tested in test_model_factories.py).

Everything is built locally from tiny configs (no hub): a 2-level `UNet2DConditionModel`, a 1-layer CLIP text
encoder with a tokenizer written from a 28-token vocabulary, a 1-level `AutoencoderKL`, assembled into a
`StableDiffusionPipeline` with classifier-free guidance. Conventions bridged (see the module docstrings of
`fewstep.integrations.diffusers` and `fewstep.integrations.kdiffusion`):

* FewstepScheduler's latents are fewstep's VE state, so the pipeline's `latents=z` start at σ_0·z exactly like
  `fewstep.sample(denoiser, z, …)`; with the same guidance the two results agree bit for bit (checked ≤ 1e-5).
* diffusers' DPMSolverMultistepScheduler works on x_vp = x/√(1+σ²) from x_vp = z: fewstep gets the noise
  z·√(1+σ_0²)/σ_0; its integer timesteps are table σ's, i.e. `snap_timesteps=True` of the same σ grid;
  `final_sigmas_type="zero"` is `denoise_to_zero=True`. diffusers counts the step to σ = 0 as a step: its last
  step is first order (that is D, as ours) and, with lower_order_final=True and < 15 steps, the one before is
  limited to order 2, which leaves 2M unchanged, so the step into the last positive σ stays second order:
  fewstep's `lower_order_final=False` (ours would drop to first order there, counting intervals to σ_min).
* k-diffusion's x is already σ_0·z and a trailing σ = 0 is fewstep's `denoise_to_zero`.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
K = pytest.importorskip("k_diffusion")

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from k_diffusion.external import DiscreteEpsDDPMDenoiser
from tiny_tokenizer import tiny_clip_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel

import fewstep
from fewstep.amed.checkpoint import SamplingSettings, save_checkpoint
from fewstep.amed.predictor import AMEDPredictor
from fewstep.errors import ModelError, SolverError
from fewstep.integrations import kdiffusion as KF
from fewstep.integrations.diffusers import DiffusersDenoiser, FewstepScheduler
from fewstep.schedules import sigma_to_timestep

RTOL = 1e-5
B = 2  # images per prompt
W = 4.0  # guidance scale
PROMPT = "a cat"
SCHED_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1}


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and torch.isfinite(ours).all() and torch.isfinite(ref).all()
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _no_grad():
    """Sampling only: no autograd graphs through the networks (conftest.py keeps torch on one thread)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tokenizer, vocab_size = tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8).eval()
    p = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                scheduler=DDPMScheduler(**SCHED_CONFIG), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    p.original_config = p.scheduler.config
    return p


@pytest.fixture(scope="module")
def noise():
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def denoiser(pipe):
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", B, True)
    return DiffusersDenoiser(pipe.unet, pipe.original_config, encoder_hidden_states=cond,
                             negative_encoder_hidden_states=uncond, guidance_scale=W)


def run_pipe(pipe, scheduler, z, steps=None, **kwargs) -> torch.Tensor:
    pipe.scheduler = scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pipe(PROMPT, height=8, width=8, num_inference_steps=steps, guidance_scale=W, num_images_per_prompt=B,
                    latents=z.clone(), output_type="latent", **kwargs).images


# ------------------------------------------------------------------------------------------------ diffusers


PIPE_CASES = [
    ("dpmpp", {}, {}), ("unipc", {}, {}), ("ipndm", {}, {}), ("heun", {}, {}), ("dpm2", {}, {}),
    ("deis", {"max_order": 3}, {}), ("ipndm", {}, {"afs": True}), ("heun", {}, {"afs": True}),
    ("euler", {}, {"final_sigmas_type": "sigma_min"}), ("dpmpp", {"max_order": 3}, {"schedule": "discrete"}),
]


@pytest.mark.parametrize("solver,opts,cfg", PIPE_CASES, ids=[f"{s}{o or ''}{c or ''}" for s, o, c in PIPE_CASES])
def test_pipeline_equals_fewstep_sample(pipe, noise, denoiser, solver, opts, cfg):
    sched = FewstepScheduler.from_config(pipe.original_config, solver=solver, solver_options=opts, **cfg)
    steps = 5
    out = run_pipe(pipe, sched, noise, steps)
    dtz = sched.config.final_sigmas_type == "zero"
    n_points = steps if dtz else steps + 1
    assert len(sched.grid) == n_points and sched.num_inference_steps == steps
    assert len(sched.timesteps) == fewstep.nfe(solver, n_points, afs=sched.config.afs, denoise_to_zero=dtz, **opts)
    assert sched.order == fewstep.solvers.get_solver(solver, **opts).evals_per_step
    assert sched.init_noise_sigma == float(sched.grid[0])
    ref = fewstep.sample(denoiser, noise, solver, sched.grid, afs=sched.config.afs, denoise_to_zero=dtz, **opts)
    assert rel(out, ref) <= RTOL
    again = run_pipe(pipe, sched, noise, steps)
    assert torch.equal(out, again), "a second pipeline call must give the same result (no state kept)"


def test_pipeline_custom_sigmas_and_timesteps(pipe, noise, denoiser):
    sched = FewstepScheduler.from_config(pipe.original_config, solver="ipndm", final_sigmas_type="sigma_min")
    sigmas = [14.0, 5.0, 1.5, 0.4, 0.05, 0.0]  # trailing 0: final step to σ = 0
    out = run_pipe(pipe, sched, noise, sigmas=sigmas)
    assert len(sched.timesteps) == 5
    ref = fewstep.sample(denoiser, noise, "ipndm", torch.tensor(sigmas[:-1], dtype=torch.float64), denoise_to_zero=True)
    assert rel(out, ref) <= RTOL
    sched = FewstepScheduler.from_config(pipe.original_config, solver="dpmpp", snap_timesteps=True)
    out = run_pipe(pipe, sched, noise, timesteps=[999, 700, 400, 150, 20])
    grid = denoiser.sigma_table[[999, 700, 400, 150, 20]]
    snapped = DiffusersDenoiser(pipe.unet, pipe.original_config, snap_timesteps=True,
                                encoder_hidden_states=denoiser.cond, negative_encoder_hidden_states=denoiser.uncond,
                                guidance_scale=W)
    ref = fewstep.sample(snapped, noise, "dpmpp", grid, denoise_to_zero=True)
    assert torch.equal(sched.timesteps, torch.tensor([999, 700, 400, 150, 20]))
    assert rel(out, ref) <= RTOL


def _time_inputs(unet):
    """Record the timesteps the network really receives (after the scheduler's pre-hook)."""
    seen: list[torch.Tensor] = []
    handle = unet.time_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize("solver,afs", [("ipndm", False), ("ipndm", True), ("dpmpp", False), ("euler", False)])
def test_pipeline_amed_plugin(pipe, noise, denoiser, solver, afs):
    torch.manual_seed(3)
    predictor = AMEDPredictor(scale_dir=0.05, scale_time=0.2).eval()
    sched = FewstepScheduler.from_config(pipe.original_config, solver=solver, afs=afs, predictor=predictor,
                                         unet=pipe.unet)
    assert sched.order == 2 and sched.predictor is predictor
    seen, handle = _time_inputs(pipe.unet)
    try:
        out = run_pipe(pipe, sched, noise, 4)
    finally:
        handle.remove()
    assert len(sched.timesteps) == fewstep.nfe(solver, 4, afs=afs, denoise_to_zero=True, amed=True)
    assert not pipe.unet._forward_pre_hooks and not pipe.unet.mid_block._forward_hooks, "hooks must not outlive a run"
    # the learned intermediate times differ per sample: the network got per-row timesteps ([uncond; cond] copies)
    assert any(not torch.equal(t[:B], t[:B].flip(0)) for t in seen)
    assert all(torch.equal(t[:B], t[B:]) for t in seen)
    ref = fewstep.sample(denoiser, noise, solver, sched.grid, afs=afs, denoise_to_zero=True, predictor=predictor,
                         bottleneck=denoiser.bottleneck)
    assert rel(out, ref) <= RTOL
    assert torch.equal(out, run_pipe(pipe, sched, noise, 4))


def test_pipeline_amed_checkpoint_folder(pipe, noise, denoiser, tmp_path):
    torch.manual_seed(4)
    predictor = AMEDPredictor(scale_dir=0.01, scale_time=0.2)
    table = denoiser.sigma_table
    settings = SamplingSettings(
        model="tiny-sd", model_shape=[4, 8, 8], num_steps=4, student="ipndm", student_options={"max_order": 3},
        schedule="polynomial", rho=7.0, sigma_min=float(table[0]), sigma_max=float(table[-1]), afs=True,
        scale_dir=0.01, scale_time=0.2, teacher="ipndm", M=2)
    save_checkpoint(tmp_path / "amed", predictor, settings)
    sched = FewstepScheduler.from_config(pipe.original_config, predictor=str(tmp_path / "amed"), unet=pipe.unet)
    assert sched.config.solver == "ipndm" and sched.config.afs and sched.config.solver_options == {"max_order": 3}
    out = run_pipe(pipe, sched, noise, 4)
    ref = fewstep.sample(denoiser, noise, "ipndm", settings.schedule_tensor(), afs=True, denoise_to_zero=True,
                         predictor=sched.predictor, bottleneck=denoiser.bottleneck, max_order=3)
    assert rel(out, ref) <= RTOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_reproduces_diffusers_dpmsolver_2m(pipe, noise, prediction_type):
    dpm = DPMSolverMultistepScheduler.from_config(pipe.original_config, prediction_type=prediction_type,
                                                  algorithm_type="dpmsolver++", solver_order=2,
                                                  final_sigmas_type="zero", lower_order_final=True)
    config = dpm.config
    n = 8
    ref = run_pipe(pipe, dpm, noise, n)  # diffusers' own DPM-Solver++(2M), x_vp = z at the start
    sigmas = dpm.sigmas.double()
    assert len(sigmas) == n + 1 and sigmas[-1] == 0
    grid = sigmas[:-1]
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", B, True)
    den = DiffusersDenoiser(pipe.unet, config, snap_timesteps=True, encoder_hidden_states=cond,
                            negative_encoder_hidden_states=uncond, guidance_scale=W)
    assert den.table.prediction_type == prediction_type
    frac = sigma_to_timestep(grid, den.sigma_table)
    assert (frac - frac.round()).abs().max() < 1e-3, "diffusers' σ's are table σ's"
    assert torch.equal(den.table.timesteps(grid.float()).long(), dpm.timesteps.long())
    s0 = float(grid[0])
    with torch.no_grad():
        ours = fewstep.sample(den, noise.double() * math.sqrt(1 + s0**2) / s0, "dpmpp", grid, max_order=2,
                              lower_order_final=False, denoise_to_zero=True)
    assert rel(ours, ref) <= RTOL


def test_denoiser_properties_and_discrete_schedule(pipe, denoiser):
    ac = DDPMScheduler(**SCHED_CONFIG).alphas_cumprod.double()
    assert torch.allclose(denoiser.sigma_table, ((1 - ac) / ac).sqrt(), rtol=0, atol=0)
    assert math.isclose(denoiser.sigma_min, 0.0292, rel_tol=1e-2) and math.isclose(denoiser.sigma_max, 14.6146,
                                                                                    rel_tol=1e-4)
    assert denoiser.shape == (4, 8, 8) and denoiser.dtype == torch.float32 and denoiser.guided
    grid = fewstep.get_schedule("discrete", 6, denoiser.sigma_min, denoiser.sigma_max, model=denoiser)
    assert math.isclose(float(grid[0]), denoiser.sigma_max) and math.isclose(float(grid[-1]), denoiser.sigma_min)
    x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    d = denoiser(x, torch.full((B,), 2.0, dtype=torch.float64))
    assert d.dtype == torch.float64 and d.shape == x.shape  # network in float32, solver maths in float64
    with pytest.raises(ModelError):
        DiffusersDenoiser(pipe.unet, pipe.original_config)  # a conditional UNet needs its embeddings


def test_scheduler_config_roundtrip_and_errors(pipe, tmp_path):
    sched = FewstepScheduler.from_config(pipe.original_config, solver="unipc", solver_options={"max_order": 2})
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.solver == "unipc"
    sched.save_pretrained(tmp_path)
    again = FewstepScheduler.from_pretrained(tmp_path)
    assert again.config.solver_options == {"max_order": 2} and torch.equal(again.alphas_cumprod, sched.alphas_cumprod)
    with pytest.raises(SolverError):
        sched.step(torch.zeros(1, 4, 8, 8), 0, torch.zeros(1, 4, 8, 8))  # before set_timesteps
    with pytest.raises(SolverError, match="unet"):
        FewstepScheduler.from_config(pipe.original_config, predictor=AMEDPredictor())
    with pytest.raises(SolverError, match="heun"):
        FewstepScheduler.from_config(pipe.original_config, solver="heun", predictor=AMEDPredictor(), unet=pipe.unet)
    with pytest.raises(SolverError):
        FewstepScheduler(solver="nope")
    with pytest.raises(NotImplementedError):
        sched.set_begin_index(3)
    # a manual loop: after the last evaluation the run is complete
    sched.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8) * sched.init_noise_sigma
    for t in sched.timesteps:
        sched.scale_model_input(x, t)
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(SolverError, match="complete"):
        sched.step(torch.zeros_like(x), 0, x)


def test_pipeline_honours_latents_edited_by_callback_on_step_end(pipe, noise, denoiser):
    """An edit made by `callback_on_step_end` is the state the run continues from (multistep history included),
    as with diffusers' own schedulers; the reference answers the driver's request at the edited state."""
    from fewstep.solvers import Evaluator, answer, get_solver, run

    sched = FewstepScheduler.from_config(pipe.original_config, solver="ipndm")
    k = 1

    def halve(p, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if i == k else kwargs

    out = run_pipe(pipe, sched, noise, 5, callback_on_step_end=halve)
    plain = run_pipe(pipe, sched, noise, 5)
    ev = Evaluator(denoiser)

    def respond(req):
        x = req.x * 0.5 if req.grid_point and req.index == k + 1 else req.x  # the latents after step k
        return ev(x, req.sigma, req.index, model_sigma=req.model_sigma)

    grid = sched.grid
    ref = answer(run(get_solver("ipndm"), noise * float(grid[0]), grid, denoise_to_zero=True), respond)
    assert rel(out, ref) <= RTOL
    assert rel(out, plain) > 1e-3


# ------------------------------------------------------------------------------------------------ k-diffusion


@pytest.fixture(scope="module")
def kmodel():
    torch.manual_seed(5)
    net = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                      norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    ac = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    eps = lambda x, t: net(x, t).sample
    return net, ac, DiscreteEpsDDPMDenoiser(eps, ac, quantize=False)


@pytest.fixture(scope="module")
def knoise():
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def test_diffusers_denoiser_matches_k_diffusion_wrapper(kmodel, knoise):
    net, ac, kden = kmodel
    den = DiffusersDenoiser(net, ac)
    assert den.bottleneck is not None and den.shape == (3, 8, 8)
    sigma = torch.tensor([0.05, 1.3, 40.0])
    with torch.no_grad():
        assert rel(den(knoise * 2, sigma), kden(knoise * 2, sigma)) <= RTOL


KD_CASES = [  # (fewstep solver, options, k-diffusion sampler, kwargs, with trailing zero)
    ("euler", {}, K.sampling.sample_euler, {}, True),
    ("heun", {}, K.sampling.sample_heun, {}, True),
    ("dpmpp", {"max_order": 2, "lower_order_final": False}, K.sampling.sample_dpmpp_2m, {}, True),
    *[("ipndm_v", {"max_order": k}, K.sampling.sample_lms, {"order": k}, False) for k in (2, 4)],
]


@pytest.mark.parametrize("solver,opts,ref_fn,ref_kw,zero", KD_CASES,
                         ids=[f"{c[0]}-vs-{c[2].__name__}{c[3] or ''}" for c in KD_CASES])
def test_k_style_matches_k_diffusion(kmodel, knoise, solver, opts, ref_fn, ref_kw, zero):
    _, _, kden = kmodel
    sigmas = kden.get_sigmas(7)  # k-diffusion's own grid with its trailing zero
    if not zero:
        sigmas = sigmas[:-1]
    x = knoise * sigmas[0]
    with torch.no_grad():
        ref = ref_fn(kden, x, sigmas, disable=True, **ref_kw)
        ours = getattr(KF, f"sample_{solver}")(kden, x, sigmas, disable=True, **opts)
    assert rel(ours, ref) <= RTOL


@pytest.mark.parametrize("solver", sorted(fewstep.SOLVERS))
def test_k_style_equals_fewstep_sample(kmodel, knoise, solver):
    _, _, kden = kmodel
    sigmas = kden.get_sigmas(5)
    calls: list[dict] = []
    with torch.no_grad():
        ours = getattr(KF, f"sample_{solver}")(kden, knoise * sigmas[0], sigmas, callback=calls.append,
                                               disable=True)
        ref = fewstep.sample(lambda x, s: kden(x, s), knoise, solver, sigmas[:-1], denoise_to_zero=True)
    assert rel(ours, ref) <= RTOL
    assert [c["i"] for c in calls] == list(range(len(sigmas) - 1))
    assert set(calls[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert torch.equal(calls[-1]["denoised"], ours) and calls[-1]["sigma"] == sigmas[-2]


def test_k_style_amed_and_extra_args(kmodel, knoise):
    _, _, kden = kmodel
    sigmas = kden.get_sigmas(5)
    torch.manual_seed(6)
    predictor = AMEDPredictor(scale_dir=0.05)
    seen = []

    def model(x, sigma, tag=None):
        seen.append(tag)
        return kden(x, sigma)

    with torch.no_grad():
        for solver in ("amed", "ipndm"):
            ours = KF.sample_amed(model, knoise * sigmas[0], sigmas, extra_args={"tag": 1}, disable=True,
                                  predictor=predictor, solver=solver, afs=True)
            ref = fewstep.sample(lambda x, s: kden(x, s), knoise, solver, sigmas[:-1], afs=True, denoise_to_zero=True,
                                 predictor=predictor)
            assert rel(ours, ref) <= RTOL
    assert set(seen) == {1}


# ------------------------------------------------------------------------------------------------ learned cards


def _tiny_card(table: torch.Tensor, folder) -> "fewstep.learned.Card":
    from fewstep.learned import Card, save_card

    grid = fewstep.get_schedule("logsnr", 5, float(table[0]), float(table[-1])).tolist()
    card = Card(base="dpmpp", base_options={}, afs=True, sigmas=grid, offsets=[0.0, 0.05, -0.03, 0.02],
                coeffs=[[0.01, 0.0], [0.02, -0.01], [-0.01, 0.01], [0.03, 0.0]], params=["offsets", "coeffs"])
    save_card(folder, card)
    return card


def test_pipeline_runs_a_learned_card(pipe, noise, denoiser, tmp_path):
    card = _tiny_card(denoiser.sigma_table, tmp_path)
    sched = FewstepScheduler.from_config(pipe.original_config, solver=f"learned:{tmp_path}",
                                         final_sigmas_type="sigma_min")
    out = run_pipe(pipe, sched, noise, 4)
    assert torch.equal(sched.grid, torch.tensor(card.sigmas, dtype=torch.float64))
    assert len(sched.timesteps) == card.nfe
    ref = fewstep.sample(denoiser, noise, card.solver())
    assert rel(out, ref) <= RTOL
    with pytest.raises(fewstep.SolverError, match="num_inference_steps=4"):
        sched.set_timesteps(6)


def test_k_style_runs_a_learned_card(kmodel, knoise, tmp_path):
    _, _, kden = kmodel
    card = _tiny_card(kden.sigmas, tmp_path)
    sigmas = torch.tensor([*card.sigmas, 0.0])
    with torch.no_grad():
        ours = KF.sample_learned(kden, knoise * sigmas[0], sigmas, disable=True, card=tmp_path)
        # the trailing 0 adds the final denoising call and nothing else: the card's steps are the ones it was
        # learned with on this EDM model (no final denoise), though DPM-Solver++'s lower_order_final would raise
        # the order of its last step when one follows
        learned = fewstep.sample(lambda x, s: kden(x, s), knoise, card.solver())
        ref = kden(learned, torch.full((len(knoise),), card.sigmas[-1]))
        same = fewstep.sample(lambda x, s: kden(x, s), knoise, card.solver(), denoise_to_zero=True)
        base = card.solver().base
        moved = fewstep.sample(lambda x, s: kden(x, s), knoise, "dpmpp", torch.tensor(card.sigmas), afs=True,
                               denoise_to_zero=True)
        unmoved = kden(fewstep.sample(lambda x, s: kden(x, s), knoise, "dpmpp", torch.tensor(card.sigmas),
                                      afs=True), torch.full((len(knoise),), card.sigmas[-1]))
    assert base.lower_order_final and rel(moved, unmoved) > 1e-4  # the ending does change the base's steps
    assert rel(ours, ref) <= RTOL and rel(same, ref) <= RTOL
    with pytest.raises(fewstep.SolverError, match="own"):
        KF.sample_learned(kden, knoise, kden.get_sigmas(5), disable=True, card=tmp_path)
