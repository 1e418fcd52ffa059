"""k-diffusion / ComfyUI samplers on flow models (ComfyUI's "CONST" convention): `sigmas` are flow times t
(starting at exactly 1, ending with 0), `x` is x_t, `model(x, t)` returns x₀; selected by `flow=True` or found on
the model wrapper. Checked on the exact flow mixture."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep.frames import EDM, FLOW
from fewstep.integrations import kdiffusion as KF
from fewstep.models.flow import FlowGaussianMixture
from fewstep.models.registry import gmm_parameters

GMM_FLOW = FlowGaussianMixture(*gmm_parameters())
NOISE = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
GRID = fewstep.get_schedule("flow:shift=3", 8, 1e-3, 1.0)  # starts at t = 1 exactly
SIGMAS = torch.cat([GRID, GRID.new_zeros(1)])


def model(x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
    """A ComfyUI-style flow model: x₀ = D(x_t, t) (no frame attribute: the convention must be asked for)."""
    return GMM_FLOW(x, t)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm()).item()


def test_euler_equals_k_diffusion_euler():
    """k-diffusion's Euler x + (t' − t)(x − D)/t is frame-independent: the same method in flow times."""
    K = pytest.importorskip("k_diffusion")
    ours = KF.sample_euler(model, NOISE.clone(), SIGMAS, disable=True, flow=True)
    ref = K.sampling.sample_euler(model, NOISE.clone(), SIGMAS, disable=True)
    assert rel(ours, ref) <= 1e-12
    assert rel(ours, fewstep.sample(GMM_FLOW, NOISE, "euler", GRID)) <= 1e-12


def test_dpmpp_2m_is_flow_aware():
    """fewstep's DPM-Solver++(2M) in flow mode is the flow-frame run (λ = log((1 − t)/t), from t = 1 exactly).
    k-diffusion's own `sample_dpmpp_2m` on the same sigmas steps in −log t (the flow t read as σ; it equals
    fewstep's EDM-frame 2M, `flow=False`, to 2e-15) and lands elsewhere. Measured on this 8-point shift-3 grid
    (7 steps + the final step to 0), relative to each other 0.25; against a 400-point flow DPM-Solver++(3M) solve
    (itself within 1.4e-3 of 800 points) the flow run is off by 0.54 and k-diffusion's by 0.86 (5 points: 1.56 vs
    4.11; 10: 0.18 vs 0.37; 20: 0.25 vs 0.34 — few-step solves of this sharp 64-d mixture are far from exact)."""
    K = pytest.importorskip("k_diffusion")
    ours = KF.sample_dpmpp(model, NOISE.clone(), SIGMAS, disable=True, flow=True, max_order=2)
    flow_run = fewstep.sample(GMM_FLOW, NOISE, "dpmpp", GRID, max_order=2)
    assert rel(ours, flow_run) <= 1e-12
    theirs = K.sampling.sample_dpmpp_2m(model, NOISE.clone(), SIGMAS, disable=True)
    fine = fewstep.sample(GMM_FLOW, NOISE, "dpmpp", fewstep.get_schedule("flow:shift=3", 400, 1e-3, 1.0), max_order=3)
    assert rel(theirs, ours) > 0.1 and rel(ours, fine) < 0.75 * rel(theirs, fine)
    # read as EDM σ's (flow=False) the same sigmas give k-diffusion's stepping
    edm = KF.sample_dpmpp(model, NOISE.clone(), SIGMAS, disable=True, flow=False, max_order=2)
    assert rel(edm, theirs) <= 1e-12


class CONST:  # ComfyUI's flow ("CONST") model sampling, a base class of the sampling object
    pass


class ModelSamplingDiscreteFlow(CONST):
    pass


class _Base:  # ComfyUI's BaseModel
    def __init__(self, sampling):
        self.model_sampling = sampling


class _Wrapper(torch.nn.Module):  # KSamplerX0Inpaint → CFGGuider → BaseModel
    def __init__(self, inner):
        super().__init__()
        self.inner_model = inner

    def forward(self, x, sigma, **extra):
        return GMM_FLOW(x, sigma)


def test_flow_convention_is_found_on_the_model_wrapper():
    comfy = _Wrapper(_Wrapper(_Base(ModelSamplingDiscreteFlow())))
    assert KF.model_frame(comfy) is FLOW
    assert KF.model_frame(_Wrapper(_Base(object()))) is EDM and KF.model_frame(model) is EDM
    assert KF.model_frame(GMM_FLOW) is FLOW  # a fewstep flow denoiser declares its frame
    assert KF.model_frame(comfy, flow=False) is EDM
    out = KF.sample_unipc(comfy, NOISE.clone(), SIGMAS, disable=True)
    assert rel(out, fewstep.sample(GMM_FLOW, NOISE, "unipc", GRID)) <= 1e-12


@pytest.mark.parametrize("solver", ["heun", "dpm2", "ipndm", "deis", "unipc", "dpmpp"])
def test_every_solver_in_flow_mode_equals_fewstep_sample(solver):
    seen: list[dict] = []
    out = getattr(KF, f"sample_{solver}")(model, NOISE.clone(), SIGMAS, disable=True, flow=True,
                                          callback=seen.append)
    assert rel(out, fewstep.sample(GMM_FLOW, NOISE, solver, GRID)) <= 1e-12
    assert float(seen[0]["sigma"]) == 1.0 and len(seen) == len(GRID)


def test_afs_and_a_grid_without_the_final_zero():
    """AFS at t = 1 is D₀ = 0 (one call fewer); without the trailing 0 the run ends at x_{t_last}."""
    calls = []

    def counting(x, t):
        calls.append(float(t[0]))
        return GMM_FLOW(x, t)

    out = KF.sample_ipndm(counting, NOISE.clone(), SIGMAS, disable=True, flow=True, afs=True)
    assert 1.0 not in calls and len(calls) == len(GRID) - 1
    assert rel(out, fewstep.sample(GMM_FLOW, NOISE, "ipndm", GRID, afs=True)) <= 1e-12
    last = KF.sample_euler(model, NOISE.clone(), GRID, disable=True, flow=True)
    assert rel(last, fewstep.sample(GMM_FLOW, NOISE, "euler", GRID, denoise_to_zero=False)) <= 1e-12
    with pytest.raises(fewstep.errors.ScheduleError, match=r"\(0, 1\]"):
        KF.sample_euler(model, NOISE.clone(), torch.tensor([2.0, 1.0, 0.0]), disable=True, flow=True)
