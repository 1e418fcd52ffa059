"""Parity of fewstep's solvers with independent implementations (k-diffusion, diffusers), in float64.

Every comparison runs the same denoiser on the same σ grid from the same initial state and requires
    max |x_fewstep − x_reference| / max |x_reference|  ≤  1e-5,
and, where the reference exposes it, the same number of model calls (NFE).

k-diffusion (`k_diffusion.sampling`, Karras/EDM σ-space, the same ODE dx/dσ = (x − D)/σ)
-------------------------------------------------------------------------------------------
* Denoiser: an exact `GaussianMixture` (4 components, 16 dims) built from a fixed generator; k-diffusion calls
  it as `model(x, sigma * s_in)` with a [B] σ, exactly like fewstep.
* Grid: fewstep's `polynomial` schedule (ρ = 7, σ ∈ [0.002, 80]); it is checked against
  `K.get_sigmas_karras` (which builds its ramp in float32, hence a 1e-6 tolerance there), and then the same
  float64 grid *without* k-diffusion's trailing zero is handed to both, so both stop at σ_min and both take
  their regular step on the last interval (k-diffusion only switches to Euler when σ_next == 0).
* Initial state: k-diffusion takes x already scaled, x = σ_0·noise; fewstep takes `noise` and scales it itself.
* `disable=True` silences k-diffusion's progress bars; `s_churn = 0` (the default) makes euler/heun/dpm_2
  deterministic ODE solvers.
* Mapping: sample_euler = euler; sample_heun = heun; sample_dpm_2 = dpm2 with r = ½ (k-diffusion's midpoint is
  geometric in σ and its update x + (σ_next − σ)·d_mid is ours with weight 1/(2r) = 1);
  sample_dpmpp_2m = dpmpp(max_order=2, lower_order_final=False) (k-diffusion never lowers the order on a
  grid without a final zero); sample_lms(order=k) = ipndm_v(max_order=k) = deis(deis_mode="rhoab", max_order=k)
  (all integrate the Lagrange basis through the σ-nodes exactly; k-diffusion with scipy's `quad`, which is
  exact for these polynomials, and fewstep with Gauss–Legendre).
* With k-diffusion's trailing zero kept, its last step (Euler / first-order DPM-Solver++ to σ = 0) returns
  exactly D(x, σ_min): that is fewstep's `denoise_to_zero=True` on the grid without the zero (also tested;
  not for LMS, whose last step to 0 is a polynomial extrapolation, not D).

diffusers (discrete VP, ε-prediction, `DPMSolverMultistepScheduler` and `UniPCMultistepScheduler`)
---------------------------------------------------------------------------------------------------
* Table: ᾱ_k = Π(1 − β), β = linspace(1e-4, 0.02, 1000) built in float32 exactly as diffusers does (checked
  bit-for-bit against the scheduler's `alphas_cumprod`); σ_k = √((1 − ᾱ_k)/ᾱ_k).
* Toy model: ε(x_vp, k) is the exact noise of the Gaussian mixture at σ_k in VP coordinates:
  x_ve = x_vp·√(1 + σ_k²), ε = (x_ve − D_GM(x_ve, σ_k))/σ_k. diffusers calls it with its integer timestep.
* fewstep's denoiser wraps the same ε: D(x, σ) = x − σ·ε(x/√(1 + σ²), k(σ)), with k(σ) the timestep found by
  log-σ interpolation over the table (`fewstep.schedules.sigma_to_timestep`) snapped to the nearest integer;
  the test asserts that every σ asked for is a table σ (fractional part < 1e-3), i.e. no interpolated
  timestep is ever used. diffusers' x̂₀ = (x_vp − s_k ε)/α_k with α = 1/√(1+σ²), s = σα is exactly this D.
* Grid: `set_timesteps(n)` with the default "linspace" spacing gives n integer timesteps from 999 down (0
  excluded) and `final_sigmas_type="sigma_min"` appends σ of ᾱ_0 (≈ 0.01): n + 1 strictly decreasing positive
  σ's, which is fewstep's `custom` schedule (N = n + 1 points, n intervals, NFE = n on both sides). diffusers
  stores these σ's in float32; we take those exact values as float64 for both, and upcast the scheduler's σ
  tensor to float64 so that its step coefficients (α, λ, h, φ's, UniPC's ρ) are computed in float64 too
  (left in float32 they put UniPC's noise-prediction variant up to 2e-4 away: h = λ_t − λ_s loses digits).
  DPM-Solver's `step` still rounds the state to float32 once per step (`sample.to(torch.float32)`), which
  leaves differences of a few 1e-7 there; UniPC then agrees to ~1e-13.
* Coordinates: diffusers' state is x_vp = x_ve/√(1 + σ²); its initial x_vp = noise·init_noise_sigma with
  init_noise_sigma = 1, i.e. x_ve = noise·√(1 + σ_0²), so fewstep gets noise·√(1 + σ_0²)/σ_0 (it scales by σ_0);
  the final diffusers state is mapped back with x_ve = x_vp·√(1 + σ_last²). Both updates are the same formula in
  the two coordinate systems (e.g. (s_t/s_s)·x_vp/α_t = (σ_t/σ_s)·x_ve).
* Orders: diffusers warms up like fewstep (order ≤ number of stored outputs). DPMSolverMultistep's
  `lower_order_final` lowers the last two steps only when there are fewer than 15 steps: n = 10 with
  lower_order_final=True/False maps to ours True/False, and n = 15 with diffusers' True maps to ours False.
  UniPC's `lower_order_final` has no such limit (order ≤ steps left, as ours). `euler_at_final=False`.
* algorithm_type="dpmsolver++" with solver_type="midpoint" is our data-prediction dpmpp (2M: D0 + ½D1);
  "dpmsolver" (noise prediction; deprecated in diffusers but still implemented) is our predict_x0=False.
* UniPC: `disable_corrector=[]` (corrector after every step but the last, as ours), `solver_p=None`,
  solver_type bh1/bh2 = our variant, predict_x0 = ours. The corrector's fresh model output is evaluated at the
  *uncorrected* predictor state and reused by the next predictor in both implementations.
* `final_sigmas_type="zero"`: diffusers' last step goes to σ = 0 and returns x̂₀ of the last state (h = ∞),
  i.e. fewstep's `denoise_to_zero=True` on the grid without the 0. diffusers then forces first order on that
  last step only, so the step *into* the last positive σ keeps its order: diffusers lower_order_final=False
  ↔ ours lower_order_final=False.
* thresholding is off on both sides; the toy data are not pixels.
"""

from __future__ import annotations

import math
import warnings

import k_diffusion.sampling as K
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

import fewstep
from fewstep.models import GaussianMixture
from fewstep.schedules import sigma_to_timestep

RTOL = 1e-5
DIM = 16
BATCH = 6


# ------------------------------------------------------------------------------------------------ helpers


def _gmm() -> GaussianMixture:
    g = torch.Generator().manual_seed(1234)
    means = 0.8 * torch.randn(4, DIM, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.2 * torch.rand(4, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(4, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


GMM = _gmm()
NOISE = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


class Counted:
    """Wrap a callable and count its calls (= NFE)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_parity(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: the reference produced non-finite values"
    assert torch.isfinite(ours).all(), f"{what}: fewstep produced non-finite values"
    r = rel_diff(ours, ref)
    assert r <= RTOL, f"{what}: max|fewstep - reference| / max|reference| = {r:.3e} > {RTOL:g}"
    return r


# ------------------------------------------------------------------------------------------------ k-diffusion


def karras_grid(n: int) -> torch.Tensor:
    return fewstep.get_schedule("polynomial", n, sigma_min=0.002, sigma_max=80.0, rho=7.0)


@pytest.mark.parametrize("n", [6, 12])
def test_polynomial_schedule_matches_k_diffusion(n):
    ref = K.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()
    assert ref[-1] == 0 and len(ref) == n + 1, "k-diffusion appends a trailing zero"
    ours = karras_grid(n)
    r = ((ours - ref[:-1]).abs() / ref[:-1]).max().item()
    assert r <= 1e-6, f"polynomial schedule vs get_sigmas_karras: max relative difference {r:.3e}"


def sample_gradient_estimation(model, x, sigmas, disable=None, ge_gamma=2.0):
    """Permenter & Yuan's gradient-estimation sampler (ICML 2024) written here in k-diffusion's form, as an
    independent reference: k-diffusion has none (ComfyUI's own is compared in tests/test_comfyui.py)."""
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            d_bar = d if old_d is None else ge_gamma * d + (1 - ge_gamma) * old_d
            x = x + d_bar * (sigmas[i + 1] - sigmas[i])
        old_d = d
    return x


# (fewstep solver, its options, reference sampler (k-diffusion's, or the one above), its kwargs)
KD_CASES = [
    ("euler", {}, K.sample_euler, {}),
    ("heun", {}, K.sample_heun, {}),
    ("dpm2", {"r": 0.5}, K.sample_dpm_2, {}),
    ("dpmpp", {"max_order": 2, "lower_order_final": False}, K.sample_dpmpp_2m, {}),
    ("gradient_estimation", {}, sample_gradient_estimation, {}),
    ("gradient_estimation", {"gamma": 1.5}, sample_gradient_estimation, {"ge_gamma": 1.5}),
    *[("ipndm_v", {"max_order": k}, K.sample_lms, {"order": k}) for k in (1, 2, 3, 4)],
    *[("deis", {"deis_mode": "rhoab", "max_order": k}, K.sample_lms, {"order": k}) for k in (1, 2, 3, 4)],
]


def _case_id(case) -> str:
    solver, opts, ref, _ = case
    return f"{solver}[{','.join(f'{k}={v}' for k, v in opts.items())}]-vs-{ref.__name__}"


@pytest.mark.parametrize("n", [6, 12])
@pytest.mark.parametrize("case", KD_CASES, ids=_case_id)
def test_k_diffusion_parity(case, n):
    solver, opts, ref_sampler, ref_kwargs = case
    sigmas = karras_grid(n)  # no trailing zero: both end at sigma_min
    ref_model = Counted(GMM)
    ref = ref_sampler(ref_model, NOISE * sigmas[0], sigmas, disable=True, **ref_kwargs)
    our_model = Counted(GMM)
    ours = fewstep.sample(our_model, NOISE, solver=solver, schedule=sigmas, **opts)
    assert_parity(ours, ref, f"{_case_id(case)}, N={n}")
    assert our_model.calls == ref_model.calls, f"NFE: fewstep {our_model.calls} vs k-diffusion {ref_model.calls}"
    assert our_model.calls == fewstep.nfe(solver, n, **opts)


@pytest.mark.parametrize("case", KD_CASES[:5], ids=_case_id)
def test_k_diffusion_trailing_zero_is_denoise_to_zero(case):
    solver, opts, ref_sampler, ref_kwargs = case
    n = 8
    sigmas = karras_grid(n)
    ref_model = Counted(GMM)
    ref = ref_sampler(ref_model, NOISE * sigmas[0], torch.cat([sigmas, sigmas.new_zeros(1)]), disable=True)
    our_model = Counted(GMM)
    ours = fewstep.sample(our_model, NOISE, solver=solver, schedule=sigmas, denoise_to_zero=True, **opts)
    assert_parity(ours, ref, f"{_case_id(case)} with a final sigma = 0 vs denoise_to_zero")
    assert our_model.calls == ref_model.calls, f"NFE: fewstep {our_model.calls} vs k-diffusion {ref_model.calls}"


# ------------------------------------------------------------------------------------------------ diffusers

NUM_TRAIN = 1000
BETAS32 = torch.linspace(1e-4, 0.02, NUM_TRAIN, dtype=torch.float32)  # diffusers' "linear" beta schedule
ALPHAS_CUMPROD = torch.cumprod(1.0 - BETAS32, dim=0).double()
SIGMA_TABLE = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt()  # increasing in k


def vp_eps(x_vp: torch.Tensor, timestep) -> torch.Tensor:
    """Toy ε-prediction network: the exact ε of the Gaussian mixture at σ_k, in VP coordinates."""
    k = torch.as_tensor(timestep).long().reshape(-1)
    s = SIGMA_TABLE[k].reshape(-1, 1).expand(x_vp.shape[0], 1)
    x_ve = x_vp * torch.sqrt(1 + s**2)
    return (x_ve - GMM(x_ve, s[:, 0])) / s


def vp_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """fewstep's view of the toy model: D(x, σ) = x − σ·ε(x/√(1+σ²), k(σ)) with the integer timestep k(σ)."""
    frac = sigma_to_timestep(sigma, SIGMA_TABLE)
    k = frac.round()
    assert (frac - k).abs().max() < 1e-3, f"sigma {sigma.tolist()} is not a table sigma (timestep {frac.tolist()})"
    s = sigma.reshape(-1, 1)
    return x - s * vp_eps(x / torch.sqrt(1 + s**2), k)


def run_diffusers(sched, n: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """diffusers' sampling loop; returns (final state in VE coordinates, its σ grid in float64, NFE)."""
    assert torch.equal(sched.alphas_cumprod, ALPHAS_CUMPROD.float()), "scheduler table differs from the model's"
    assert sched.init_noise_sigma == 1.0
    sched.set_timesteps(n)
    sched.sigmas = sched.sigmas.double()  # same float32-valued grid, float64 step arithmetic
    x = noise * sched.init_noise_sigma  # x_vp
    calls = 0
    for t in sched.timesteps:
        eps = vp_eps(sched.scale_model_input(x, t), t)
        calls += 1
        x = sched.step(eps, t, x).prev_sample
    sig_last = float(sched.sigmas[-1])
    return x.double() * math.sqrt(1 + sig_last**2), sched.sigmas.clone(), calls


def run_fewstep_vp(sigmas: torch.Tensor, noise: torch.Tensor, solver: str, **opts) -> tuple[torch.Tensor, int]:
    """fewstep on the same grid, started from the same VE state noise·√(1+σ_0²)."""
    schedule = fewstep.get_schedule("custom", sigmas=sigmas)
    s0 = float(schedule[0])
    model = Counted(vp_denoiser)
    out = fewstep.sample(model, noise * math.sqrt(1 + s0**2) / s0, solver=solver, schedule=schedule, **opts)
    return out, model.calls


def _dpm_scheduler(**cfg) -> DPMSolverMultistepScheduler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # algorithm_type="dpmsolver" is deprecated
        return DPMSolverMultistepScheduler(
            num_train_timesteps=NUM_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
            prediction_type="epsilon", solver_type="midpoint", euler_at_final=False, thresholding=False,
            timestep_spacing="linspace", **cfg,
        )


# (diffusers order, diffusers lower_order_final, n steps, ours lower_order_final)
DPM_ORDER_CASES = [
    (order, lof, 10, lof) for order in (1, 2, 3) for lof in (True, False)
] + [(2, True, 15, False), (3, True, 15, False)]  # diffusers ignores lower_order_final from 15 steps on


@pytest.mark.parametrize("predict_x0", [True, False], ids=["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("order,d_lof,n,our_lof", DPM_ORDER_CASES)
def test_diffusers_dpmsolver_multistep(order, d_lof, n, our_lof, predict_x0):
    sched = _dpm_scheduler(
        solver_order=order, algorithm_type="dpmsolver++" if predict_x0 else "dpmsolver",
        lower_order_final=d_lof, final_sigmas_type="sigma_min",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref, sigmas, ref_calls = run_diffusers(sched, n, NOISE)
    assert len(sigmas) == n + 1 and sigmas[-1] > 0
    ours, calls = run_fewstep_vp(sigmas, NOISE, "dpmpp", max_order=order, predict_x0=predict_x0,
                                 lower_order_final=our_lof)
    what = (f"dpmpp(max_order={order}, predict_x0={predict_x0}, lower_order_final={our_lof}) vs diffusers "
            f"DPMSolverMultistep(order={order}, lower_order_final={d_lof}), {n} steps")
    assert_parity(ours, ref, what)
    assert calls == ref_calls == n, f"NFE: fewstep {calls} vs diffusers {ref_calls}"


@pytest.mark.parametrize("order", [2, 3])
def test_diffusers_dpmsolver_final_zero_is_denoise_to_zero(order):
    n = 10
    sched = _dpm_scheduler(solver_order=order, algorithm_type="dpmsolver++", lower_order_final=False,
                           final_sigmas_type="zero")
    ref, sigmas, ref_calls = run_diffusers(sched, n, NOISE)
    assert sigmas[-1] == 0
    ours, calls = run_fewstep_vp(sigmas[:-1], NOISE, "dpmpp", max_order=order, lower_order_final=False,
                                 denoise_to_zero=True)
    assert_parity(ours, ref, f"dpmpp(max_order={order}) + denoise_to_zero vs diffusers final_sigmas_type='zero'")
    assert calls == ref_calls == n, f"NFE: fewstep {calls} vs diffusers {ref_calls}"


@pytest.mark.parametrize("predict_x0", [True, False], ids=["x0", "eps"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order,lof,n", [(1, True, 10), (2, True, 10), (3, True, 10), (2, False, 8), (3, False, 8)])
def test_diffusers_unipc(order, lof, n, variant, predict_x0):
    sched = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", solver_order=order, solver_type=variant, predict_x0=predict_x0,
        lower_order_final=lof, disable_corrector=[], solver_p=None, thresholding=False,
        timestep_spacing="linspace", final_sigmas_type="sigma_min",
    )
    ref, sigmas, ref_calls = run_diffusers(sched, n, NOISE)
    assert len(sigmas) == n + 1 and sigmas[-1] > 0
    ours, calls = run_fewstep_vp(sigmas, NOISE, "unipc", max_order=order, variant=variant,
                                 predict_x0=predict_x0, lower_order_final=lof)
    what = (f"unipc(max_order={order}, variant={variant}, predict_x0={predict_x0}, lower_order_final={lof}) "
            f"vs diffusers UniPCMultistep, {n} steps")
    assert_parity(ours, ref, what)
    assert calls == ref_calls == n, f"NFE: fewstep {calls} vs diffusers {ref_calls}"
