"""Flow-matching models and grids: the flow frame's exact mixture, the adapter, the shifted grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.errors import DenoiserError, ScheduleError
from fewstep.flow import dynamic_mu, flow_grid, mu_to_shift, oss_grid, shift_time, sigma_of, time_of, unshift_time
from fewstep.frames import EDM, FLOW, frame_of
from fewstep.models import load_model
from fewstep.models.analytic import GaussianMixture
from fewstep.models.flow import FlowDenoiser, FlowGaussianMixture
from fewstep.models.registry import gmm_parameters
from fewstep.schedules import get_schedule


def mixture() -> FlowGaussianMixture:
    return FlowGaussianMixture(*gmm_parameters())


def test_flow_mixture_is_the_edm_mixture_in_flow_coordinates():
    """D_flow(x_t, t) = D_edm(x_t/(1 − t), t/(1 − t)) for t < 1 (the bridge of docs/maths.md §15)."""
    flow, edm = mixture(), GaussianMixture(*gmm_parameters())
    gen = torch.Generator().manual_seed(0)
    for t in (0.02, 0.3, 0.7, 0.99):
        x = torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
        tt = torch.full((16,), t, dtype=torch.float64)
        ref = edm(x / (1 - t), sigma_of(tt))
        torch.testing.assert_close(flow(x, tt), ref, rtol=1e-10, atol=1e-12)


def test_flow_mixture_at_t1_is_the_data_mean():
    flow = mixture()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    mean = (flow.log_weights.exp()[:, None] * flow.means).sum(0).reshape(1, 1, 8, 8)
    torch.testing.assert_close(flow(x, torch.ones(4, dtype=torch.float64)), mean.expand(4, -1, -1, -1))
    with pytest.raises(DenoiserError, match="outside"):
        flow(x, torch.full((4,), 1.5, dtype=torch.float64))


def test_flow_denoiser_predictions_agree():
    """Velocity, x₀ and ε networks of the same model give the same D; guidance on v is guidance on D."""
    flow = mixture()
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    t = torch.full((8,), 0.4, dtype=torch.float64)
    d = flow(x, t)
    v = flow.velocity(x, t)
    eps = x + (1 - 0.4) * v  # ε = x_t + (1 − t)·v
    assert frame_of(FlowDenoiser(lambda *a: v)) is FLOW and frame_of(flow) is FLOW and frame_of(lambda x, s: x) is EDM
    torch.testing.assert_close(FlowDenoiser(lambda x_, t_: v)(x, t), d)
    torch.testing.assert_close(FlowDenoiser(lambda x_, t_: d, prediction="x0")(x, t), d)
    torch.testing.assert_close(FlowDenoiser(lambda x_, t_: eps, prediction="epsilon")(x, t), d)
    seen = []
    FlowDenoiser(lambda x_, t_: seen.append(t_) or v, time_scale=1000)(x, t)
    torch.testing.assert_close(seen[0], t * 1000)
    with pytest.raises(DenoiserError, match="t = 1"):
        FlowDenoiser(lambda x_, t_: eps, prediction="epsilon")(x, torch.ones(8, dtype=torch.float64))


def test_time_maps():
    t = torch.tensor([1.0, 0.75, 0.5, 1e-3], dtype=torch.float64)
    assert math.isinf(float(sigma_of(t)[0]))
    torch.testing.assert_close(time_of(sigma_of(t)), t)
    torch.testing.assert_close(unshift_time(shift_time(t, 3.0), 3.0), t)
    assert shift_time(t, 3.0)[0] == 1.0
    # Flux's exponential shift by μ is the static shift e^μ
    mu = 1.15
    torch.testing.assert_close(shift_time(t, mu_to_shift(mu)), math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
    assert dynamic_mu(256) == pytest.approx(0.5) and dynamic_mu(4096) == pytest.approx(1.15)


def test_flow_grid_equals_diffusers_flow_match_euler_shifted_once():
    """fewstep's `flow:shift=3` on [shift(1/1000), 1] is diffusers' grid shifted once (its default
    set_timesteps shifts the stored range a second time; passing the unshifted sigmas avoids that)."""
    diffusers = pytest.importorskip("diffusers")
    for n in (3, 5, 9):
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(sigmas=np.linspace(1, 1 / 1000, n))
        t_min = float(shift_time(torch.tensor(1 / 1000, dtype=torch.float64), 3.0))
        ours = get_schedule("flow:shift=3", n, t_min, 1.0)
        torch.testing.assert_close(ours, sched.sigmas[:-1].double(), rtol=1e-6, atol=1e-7)  # diffusers: float32
        dyn = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        dyn.set_timesteps(sigmas=np.linspace(1, 1 / 1000, n), mu=1.15)
        t_min = float(shift_time(torch.tensor(1 / 1000, dtype=torch.float64), math.exp(1.15)))
        torch.testing.assert_close(get_schedule("flow:mu=1.15", n, t_min, 1.0), dyn.sigmas[:-1].double(),
                                   rtol=1e-6, atol=1e-7)


def test_flow_grid_options():
    g = flow_grid(6, 1e-3, shift=3, terminal=0.1)
    assert float(g[0]) == 1.0 and float(g[-1]) == pytest.approx(0.1)
    for spacing in ("karras", "exponential", "beta"):
        g = flow_grid(6, 1e-3, shift=3, spacing=spacing)
        assert float(g[0]) == pytest.approx(1.0) and float(g[-1]) == pytest.approx(1e-3)
        assert bool((g[1:] < g[:-1]).all())
    assert len(oss_grid(5, "flux")) == 5 and float(oss_grid(10, "flux")[-1]) == 0.2808
    for bad in ("flow:shift=0", "flow:shift=nan", "flow:shift=-2", "flow:mu=inf", "flow:spacing=odd", "flow:x=1",
                "oss:sd3", "oss"):
        with pytest.raises(ScheduleError):
            get_schedule(bad, 6, 1e-3, 1.0)
    with pytest.raises(ScheduleError, match="t_max <= 1"):
        get_schedule("flow:shift=3", 6, 0.002, 80.0)  # an EDM σ range is not a flow-time range


def test_builtin_flow_models():
    model = load_model("gmm-flow")
    assert model.frame is FLOW and model.sigma_max == 1.0 and model.exact
    x = torch.randn(3, 1, 8, 8)
    assert model.denoiser(x, torch.ones(3)).shape == x.shape
