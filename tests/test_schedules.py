"""Schedules (docs/maths.md §3): endpoints, monotonicity, each formula against an independent numpy implementation,
the VP-linear time map, the model-driven `discrete` schedule and the validation of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.errors import FewstepError, ModelError, ScheduleError
from fewstep.schedules import VP_EPS_S, VPLinear, check_schedule

RANGES = [(0.002, 80.0), (0.02, 10.0), (0.0292, 14.6146), (1e-3, 1.0)]
SIZES = [2, 3, 6, 19, 100]
FORMULA_SCHEDULES = [("polynomial", 7.0), ("polynomial", 3.0), ("polynomial", 1.0), ("logsnr", None),
                     ("time_uniform", 1.0), ("time_uniform", 2.0)]


def u_grid(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n)


def np_polynomial(n, lo, hi, rho):
    u = u_grid(n)
    return (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def np_logsnr(n, lo, hi):
    return np.exp(np.log(hi) + u_grid(n) * (np.log(lo) - np.log(hi)))


def np_vp_fit(lo, hi, eps=1e-3):
    beta_d = 2 * (np.log(lo**2 + 1) / eps - np.log(hi**2 + 1)) / (eps - 1)
    beta_min = np.log(hi**2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def np_time_uniform(n, lo, hi, rho):
    beta_d, beta_min = np_vp_fit(lo, hi)
    tau = (1 + u_grid(n) * (1e-3 ** (1 / rho) - 1)) ** rho
    return np.sqrt(np.expm1(0.5 * beta_d * tau**2 + beta_min * tau))


def np_vp_time(sigma, lo, hi):
    """τ(σ): the positive root of ½β_d τ² + β_min τ − ln(1 + σ²) = 0, in a cancellation-free form."""
    beta_d, beta_min = np_vp_fit(lo, hi)
    c = np.log1p(np.asarray(sigma) ** 2)
    root = np.sqrt(beta_min**2 + 2 * beta_d * c)
    return 2 * c / (beta_min + root) if beta_min > 0 else (root - beta_min) / beta_d


def np_reference(name, n, lo, hi, rho):
    if name == "polynomial":
        return np_polynomial(n, lo, hi, rho)
    if name == "logsnr":
        return np_logsnr(n, lo, hi)
    return np_time_uniform(n, lo, hi, rho)


# --------------------------------------------------------------------- shape, endpoints, formulas


@pytest.mark.parametrize("name,rho", FORMULA_SCHEDULES)
@pytest.mark.parametrize("lo,hi", RANGES)
def test_endpoints_monotonicity_and_dtype(name, rho, lo, hi):
    for n in SIZES:
        t = fewstep.get_schedule(name, n, lo, hi, rho=rho)
        assert t.dtype == torch.float64 and t.shape == (n,)
        # polynomial and logsnr reach the ends through the formula, up to round-off (ρ = 1 on [0.002, 80]:
        # 80 + (0.002 − 80) leaves a relative 2e-12); time_uniform pins them exactly
        tol = 0 if name == "time_uniform" else 1e-10
        assert math.isclose(t[0].item(), hi, rel_tol=tol) and math.isclose(t[-1].item(), lo, rel_tol=tol)
        assert (t[1:] < t[:-1]).all() and (t > 0).all()


@pytest.mark.parametrize("name,rho", FORMULA_SCHEDULES)
@pytest.mark.parametrize("lo,hi", RANGES)
def test_formula_matches_independent_numpy(name, rho, lo, hi):
    for n in SIZES:
        t = fewstep.get_schedule(name, n, lo, hi, rho=rho).numpy()
        np.testing.assert_allclose(t, np_reference(name, n, lo, hi, rho), rtol=1e-10)


def test_default_rho():
    lo, hi = 0.002, 80.0
    np.testing.assert_allclose(fewstep.get_schedule("polynomial", 18, lo, hi).numpy(),
                               np_polynomial(18, lo, hi, 7.0), rtol=1e-12)
    np.testing.assert_allclose(fewstep.get_schedule("time_uniform", 18, lo, hi).numpy(),
                               np_time_uniform(18, lo, hi, 1.0), rtol=1e-10)


def test_default_range_is_edm():
    t = fewstep.get_schedule("polynomial", 10)
    assert math.isclose(t[0].item(), 80.0) and math.isclose(t[-1].item(), 0.002)


def test_polynomial_tends_to_logsnr_for_large_rho():
    a = fewstep.get_schedule("polynomial", 12, 0.01, 50.0, rho=1e5)
    b = fewstep.get_schedule("logsnr", 12, 0.01, 50.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


def test_polynomial_rho_1_is_uniform_in_sigma():
    t = fewstep.get_schedule("polynomial", 9, 0.5, 4.5, rho=1.0)
    torch.testing.assert_close(t, torch.linspace(4.5, 0.5, 9, dtype=torch.float64), rtol=1e-13, atol=0)


def test_logsnr_is_uniform_in_log_sigma():
    t = fewstep.get_schedule("logsnr", 25, 0.002, 80.0)
    steps = torch.diff(t.log())
    torch.testing.assert_close(steps, torch.full_like(steps, steps.mean().item()), rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- VP-linear time


@pytest.mark.parametrize("lo,hi", RANGES)
def test_time_uniform_rho_1_is_uniform_in_vp_time(lo, hi):
    n = 17
    t = fewstep.get_schedule("time_uniform", n, lo, hi, rho=1.0).numpy()
    np.testing.assert_allclose(np_vp_time(t, lo, hi), np.linspace(1.0, 1e-3, n), rtol=1e-9, atol=1e-12)
    # and fewstep's own inverse agrees
    vp = VPLinear.fit(lo, hi)
    np.testing.assert_allclose(vp.tau(torch.from_numpy(t)).numpy(), np.linspace(1.0, 1e-3, n), rtol=1e-8)


@pytest.mark.parametrize("lo,hi", RANGES)
def test_time_uniform_rho_2_is_quadratic_in_vp_time(lo, hi):
    t = fewstep.get_schedule("time_uniform", 11, lo, hi, rho=2.0).numpy()
    u = np.linspace(0, 1, 11)
    np.testing.assert_allclose(np.sqrt(np_vp_time(t, lo, hi)), 1 + u * (math.sqrt(1e-3) - 1), rtol=1e-9)


@pytest.mark.parametrize("lo,hi", RANGES)
def test_vp_fit_hits_the_range(lo, hi):
    vp = VPLinear.fit(lo, hi)
    beta_d, beta_min = np_vp_fit(lo, hi)
    assert math.isclose(vp.beta_d, beta_d, rel_tol=1e-12) and math.isclose(vp.beta_min, beta_min, rel_tol=1e-9)
    s = vp.sigma(torch.tensor([VP_EPS_S, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s, torch.tensor([lo, hi], dtype=torch.float64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("lo,hi", RANGES)
def test_vp_tau_inverts_sigma(lo, hi):
    vp = VPLinear.fit(lo, hi)
    tau = torch.linspace(VP_EPS_S, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(vp.tau(vp.sigma(tau)), tau, rtol=1e-9, atol=1e-13)
    sigma = torch.logspace(math.log10(lo), math.log10(hi), 101, dtype=torch.float64)
    torch.testing.assert_close(vp.sigma(vp.tau(sigma)), sigma, rtol=1e-9, atol=0)


def test_vp_dsigma_dtau_matches_finite_differences():
    vp = VPLinear.fit(0.002, 80.0)
    tau = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    eps = 1e-6
    fd = (vp.sigma(tau + eps) - vp.sigma(tau - eps)) / (2 * eps)
    torch.testing.assert_close(vp.dsigma_dtau(tau), fd, rtol=1e-6, atol=0)


def test_spec_vp_linear_constants():
    """The continuous VP-linear model (β_min = 0.1, β_d = 19.9) through the same class."""
    vp = VPLinear(beta_d=19.9, beta_min=0.1)
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    expected = np.sqrt(np.exp(0.5 * 19.9 * t.numpy() ** 2 + 0.1 * t.numpy()) - 1)
    np.testing.assert_allclose(vp.sigma(t).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(vp.tau(vp.sigma(t)).numpy(), t.numpy(), rtol=1e-9)


# --------------------------------------------------------------------------------- discrete


class FakeDiscreteModel:
    """Stands in for a discrete-VP model: only `sigma_table` (increasing σ_k of a linear-β DDPM) is needed."""

    def __init__(self):
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.sigma_table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


MODEL = FakeDiscreteModel()
TABLE = MODEL.sigma_table


def test_discrete_full_range_hits_table_entries():
    t = fewstep.get_schedule("discrete", 10, TABLE[0].item(), TABLE[-1].item(), model=MODEL)
    expected = TABLE[torch.arange(999, -1, -111)]  # timesteps 999, 888, …, 0
    torch.testing.assert_close(t, expected, rtol=1e-12, atol=0)


def test_discrete_fractional_timesteps_interpolate_log_sigma():
    t = fewstep.get_schedule("discrete", 11, TABLE[0].item(), TABLE[-1].item(), model=MODEL).numpy()
    timesteps = np.linspace(999, 0, 11)
    expected = np.exp(np.interp(timesteps, np.arange(1000), np.log(TABLE.numpy())))
    np.testing.assert_allclose(t, expected, rtol=1e-12)


def test_discrete_sub_range_is_uniform_in_model_timestep():
    lo, hi = 0.1, 10.0
    t = fewstep.get_schedule("discrete", 9, lo, hi, model=MODEL).numpy()
    assert math.isclose(t[0], hi, rel_tol=1e-10) and math.isclose(t[-1], lo, rel_tol=1e-10)
    timesteps = np.interp(np.log(t), np.log(TABLE.numpy()), np.arange(1000))
    np.testing.assert_allclose(np.diff(timesteps), np.full(8, (timesteps[-1] - timesteps[0]) / 8), rtol=1e-8)
    assert (np.diff(t) < 0).all()


def test_discrete_needs_a_sigma_table():
    with pytest.raises(ModelError, match="sigma_table"):
        fewstep.get_schedule("discrete", 5, 0.1, 10.0, model=object())
    with pytest.raises(ModelError):
        fewstep.get_schedule("discrete", 5, 0.1, 10.0)  # no model at all
    assert issubclass(ModelError, FewstepError)


def test_discrete_range_must_lie_in_the_table():
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("discrete", 5, 0.1, 1000.0, model=MODEL)
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("discrete", 5, 1e-4, 10.0, model=MODEL)


def test_discrete_rejects_a_non_increasing_table():
    class Bad:
        sigma_table = torch.tensor([0.1, 0.5, 0.5, 2.0], dtype=torch.float64)

    with pytest.raises(ScheduleError):
        fewstep.get_schedule("discrete", 3, 0.1, 2.0, model=Bad())


# ---------------------------------------------------------------------------------- custom


def test_custom_returns_the_list_as_float64():
    values = [14.6, 3.2, 0.7, 0.0292]
    for given in (values, torch.tensor(values, dtype=torch.float32), np.array(values)):
        t = fewstep.get_schedule("custom", sigmas=given)
        assert t.dtype == torch.float64 and t.shape == (4,)
        torch.testing.assert_close(t, torch.as_tensor(given, dtype=torch.float64))
    assert fewstep.get_schedule("custom", 4, sigmas=values).shape == (4,)


@pytest.mark.parametrize("bad", [
    [1.0, 2.0, 0.5], [2.0, 1.0, 1.0], [2.0, 1.0, 0.0], [2.0, 1.0, -0.5], [2.0, float("nan"), 0.5],
    [float("inf"), 1.0, 0.5], [1.0], [], [[2.0, 1.0], [0.5, 0.1]],
])
def test_custom_validation(bad):
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("custom", sigmas=bad)
    with pytest.raises(ScheduleError):
        check_schedule(bad)


def test_custom_errors_name_the_offending_point():
    with pytest.raises(ScheduleError, match="point 2"):
        fewstep.get_schedule("custom", sigmas=[3.0, 2.0, 2.5, 1.0])


def test_custom_needs_sigmas_and_a_matching_length():
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("custom")
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("custom", 5, sigmas=[3.0, 2.0, 1.0])


# ------------------------------------------------------------------------------ bad requests


@pytest.mark.parametrize("kwargs", [
    {"name": "karras", "num_steps": 5},
    {"name": "polynomial", "num_steps": 1},
    {"name": "polynomial", "num_steps": 0},
    {"name": "polynomial", "num_steps": 2.5},
    {"name": "polynomial", "num_steps": True},
    {"name": "polynomial"},
    {"name": "polynomial", "num_steps": 5, "sigma_min": 0.0},
    {"name": "polynomial", "num_steps": 5, "sigma_min": -1.0},
    {"name": "polynomial", "num_steps": 5, "sigma_max": float("inf")},
    {"name": "polynomial", "num_steps": 5, "sigma_min": float("nan")},
    {"name": "polynomial", "num_steps": 5, "sigma_min": 5.0, "sigma_max": 5.0},
    {"name": "logsnr", "num_steps": 5, "sigma_min": 10.0, "sigma_max": 1.0},
    {"name": "time_uniform", "num_steps": 5, "sigma_min": 10.0, "sigma_max": 1.0},
    {"name": "polynomial", "num_steps": 5, "rho": 0.0},
    {"name": "polynomial", "num_steps": 5, "rho": -7.0},
    {"name": "time_uniform", "num_steps": 5, "rho": float("nan")},
    {"name": "logsnr", "num_steps": 5, "rho": 7.0},
    {"name": "polynomial:7", "num_steps": 5},
])
def test_bad_requests_raise_schedule_error(kwargs):
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    with pytest.raises(ScheduleError):
        fewstep.get_schedule(name, **kwargs)
