"""Analytic denoisers (docs/maths.md §2) checked against independent computations, and the built-in models."""

from __future__ import annotations

import math

import pytest
import torch

import fewstep
from fewstep.errors import DenoiserError, ModelError
from fewstep.models import EmpiricalDenoiser, GaussianMixture, load_model


def tweedie_denoiser(means, variances, weights, x, sigma):
    """D = x + σ²∇ log p_σ(x) with p_σ = Σ_k w_k N(μ_k, diag(s_k² + σ²)), the gradient from autograd.

    means/variances: [K, D], weights: [K], x: [B, D], sigma: [B]. Written from the closed-form density only.
    """
    x = x.detach().clone().requires_grad_(True)
    var = variances[None] + sigma[:, None, None] ** 2  # [B, K, D]
    diff = x[:, None, :] - means[None]
    log_normal = -0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)  # [B, K]
    log_p = torch.logsumexp(log_normal + torch.log(weights)[None], dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), x)
    return (x + sigma[:, None] ** 2 * grad).detach()


def random_mixture(shape=(2, 3), k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, *shape, generator=g, dtype=torch.float64)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1  # unequal, unnormalised
    return means, weights, g


SIGMAS = [0.01, 0.1, 0.5, 1.0, 3.0, 20.0]


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "scalar", "uniform-weights"])
def test_gaussian_mixture_is_tweedie(kind):
    shape = (2, 3)
    means, weights, g = random_mixture(shape)
    dim = 6
    if kind == "isotropic":
        stds = torch.tensor([0.1, 0.3, 0.5, 0.05], dtype=torch.float64)
        variances = (stds**2)[:, None].expand(4, dim)
    elif kind == "diagonal":
        stds = torch.rand(4, *shape, generator=g, dtype=torch.float64) * 0.6 + 0.02
        variances = stds.reshape(4, dim) ** 2
    else:
        stds = 0.2
        variances = torch.full((4, dim), 0.04, dtype=torch.float64)
    if kind == "uniform-weights":
        gm, weights = GaussianMixture(means, stds), torch.ones(4, dtype=torch.float64)
    else:
        gm = GaussianMixture(means, stds, weights)
    x = torch.randn(5, *shape, generator=g, dtype=torch.float64) * 1.5
    for s in SIGMAS:
        sigma = torch.full((5,), s, dtype=torch.float64)
        expected = tweedie_denoiser(means.reshape(4, dim), variances, weights / weights.sum(), x.reshape(5, dim), sigma)
        torch.testing.assert_close(gm(x, sigma).reshape(5, dim), expected, rtol=1e-9, atol=1e-10)
    # per-sample σ in one call
    sigma = torch.tensor(SIGMAS[:5], dtype=torch.float64)
    expected = tweedie_denoiser(means.reshape(4, dim), variances, weights / weights.sum(), x.reshape(5, dim), sigma)
    torch.testing.assert_close(gm(x, sigma).reshape(5, dim), expected, rtol=1e-9, atol=1e-10)


def test_gaussian_mixture_sigma_forms_and_dtype():
    means, weights, g = random_mixture((4,))
    gm = GaussianMixture(means, 0.3, weights)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = gm(x, torch.full((3,), 0.7, dtype=torch.float64))
    f64 = {"dtype": torch.float64}
    for sigma in (0.7, torch.tensor(0.7, **f64), torch.tensor([0.7], **f64), torch.full((3, 1, 1), 0.7, **f64)):
        torch.testing.assert_close(gm(x, sigma), ref, rtol=1e-12, atol=0)
    out32 = gm(x.float(), torch.full((3,), 0.7))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(DenoiserError):
        gm(x, torch.tensor([0.5, 0.7]))


def test_gaussian_mixture_limits():
    means, weights, g = random_mixture((3,))
    gm = GaussianMixture(means, torch.tensor([0.2, 0.3, 0.1, 0.25]), weights)
    w = weights / weights.sum()
    # σ → ∞: D → the mixture mean
    far = gm(torch.randn(2, 3, generator=g, dtype=torch.float64), torch.full((2,), 1e6, dtype=torch.float64))
    torch.testing.assert_close(far, (w[:, None] * means).sum(0).expand(2, 3), rtol=0, atol=1e-6)
    # σ → 0: D(x) → x
    x = torch.randn(2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gm(x, torch.full((2,), 1e-7, dtype=torch.float64)), x, rtol=0, atol=1e-9)
    # no overflow far from every component
    assert torch.isfinite(gm(torch.full((2, 3), 1e4, dtype=torch.float64), torch.full((2,), 1e-3))).all()


def test_gaussian_mixture_sample_statistics():
    means = torch.tensor([[-2.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    gm = GaussianMixture(means, torch.tensor([0.5, 0.2]), torch.tensor([0.25, 0.75]))
    xs = gm.sample(40000, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (40000, 2)
    torch.testing.assert_close(xs.mean(0), 0.25 * means[0] + 0.75 * means[1], rtol=0, atol=0.03)


@pytest.mark.parametrize("bad", [
    dict(means=torch.zeros(3), stds=0.1),                                   # means not [K, *shape]
    dict(means=torch.zeros(3, 2), stds=torch.ones(2)),                      # stds neither [K] nor [K, *shape]
    dict(means=torch.zeros(3, 2), stds=torch.tensor([0.1, -0.2, 0.3])),    # negative
    dict(means=torch.zeros(3, 2), stds=torch.tensor([0.1, float("inf"), 0.3])),
    dict(means=torch.zeros(3, 2), stds=0.1, weights=torch.tensor([1.0, -1.0, 1.0])),
    dict(means=torch.zeros(3, 2), stds=0.1, weights=torch.ones(2)),
])
def test_gaussian_mixture_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        GaussianMixture(**bad)


# ------------------------------------------------------------------------------- empirical


def broadcast_empirical(data: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D*(x, σ) = Σ_i softmax_i(−‖x − y_i‖²/2σ²)·y_i with explicit differences (no matmul trick)."""
    y = data.reshape(data.shape[0], -1)
    xf = x.reshape(x.shape[0], -1)
    dist2 = ((xf[:, None, :] - y[None]) ** 2).sum(-1)
    weights = torch.softmax(-dist2 / (2 * sigma[:, None] ** 2), dim=1)
    return (weights @ y).reshape(x.shape)


def random_data(m=50, shape=(2, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, *shape, generator=g, dtype=torch.float64) * 2 - 1, g


@pytest.mark.parametrize("s", [0.02, 0.1, 0.3, 1.0, 5.0, 100.0])
def test_empirical_matches_broadcast_softmax(s):
    data, g = random_data()
    den = EmpiricalDenoiser(data)
    x = data[:7] + 0.3 * torch.randn(7, 2, 4, generator=g, dtype=torch.float64)
    sigma = torch.full((7,), s, dtype=torch.float64)
    torch.testing.assert_close(den(x, sigma), broadcast_empirical(data, x, sigma), rtol=1e-10, atol=1e-10)


def test_empirical_chunks_and_per_sample_sigma():
    data, g = random_data()
    x = torch.randn(9, 2, 4, generator=g, dtype=torch.float64)
    sigma = torch.linspace(0.05, 3.0, 9, dtype=torch.float64)
    expected = broadcast_empirical(data, x, sigma)
    torch.testing.assert_close(EmpiricalDenoiser(data, chunk=2)(x, sigma), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(EmpiricalDenoiser(data)(x, sigma), expected, rtol=1e-10, atol=1e-10)


def test_empirical_is_a_mixture_of_zero_width_components():
    data, g = random_data(m=20)
    x = torch.randn(4, 2, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.4, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(EmpiricalDenoiser(data)(x, sigma), GaussianMixture(data, 0.0)(x, sigma),
                               rtol=1e-9, atol=1e-10)


def test_empirical_small_sigma_tends_to_nearest_data_point():
    data, g = random_data()
    x = data[[3, 17, 42]] + 0.05 * torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    nearest = ((x.reshape(3, 1, -1) - data.reshape(1, 50, -1)) ** 2).sum(-1).argmin(1)
    out = EmpiricalDenoiser(data)(x, torch.full((3,), 1e-3, dtype=torch.float64))
    torch.testing.assert_close(out, data[nearest], rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()


def test_empirical_large_sigma_tends_to_data_mean():
    data, g = random_data()
    x = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    out = EmpiricalDenoiser(data)(x, torch.full((3,), 1e4, dtype=torch.float64))
    torch.testing.assert_close(out, data.mean(0).expand(3, 2, 4), rtol=0, atol=1e-7)


def test_empirical_dtype_and_bad_data():
    data, _ = random_data()
    out = EmpiricalDenoiser(data)(torch.zeros(2, 2, 4), torch.full((2,), 0.5))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError):
        EmpiricalDenoiser(torch.zeros(5))
    with pytest.raises(ValueError):
        EmpiricalDenoiser(torch.zeros(0, 3))


# ------------------------------------------------------------------------------- built-ins


def test_builtin_gmm():
    info = load_model("gmm")
    assert info.name == "gmm" and info.shape == (1, 8, 8) and info.exact
    den = info.denoiser
    assert isinstance(den, GaussianMixture) and den.means.shape == (8, 64)
    assert den.means.abs().max() <= 0.6 + 1e-12
    xs = den.sample(4000, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (4000, 1, 8, 8)
    assert xs.abs().quantile(0.99) < 1.2  # "roughly [-1, 1]"
    x = torch.randn(3, 1, 8, 8)
    out = den(x, torch.full((3,), 2.0))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    # a short solve gives data-like samples
    sample = fewstep.sample(den, torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1),
                                             dtype=torch.float64), "heun", num_steps=18)
    assert sample.abs().max() < 1.5


def test_builtin_digits_opt():
    info = load_model("digits-opt")
    assert info.name == "digits-opt" and info.shape == (1, 8, 8) and info.exact
    den = info.denoiser
    assert isinstance(den, EmpiricalDenoiser) and den.data.shape == (1797, 64)
    assert den.data.min() == -1.0 and den.data.max() == 1.0
    x = torch.randn(2, 1, 8, 8)
    out = den(x, torch.full((2,), 0.5))
    assert out.shape == x.shape and out.abs().max() <= 1.0 + 1e-6


def test_load_model_is_cached_and_rejects_unknown_names():
    assert load_model("gmm") is load_model("gmm")
    with pytest.raises(ModelError):
        load_model("no-such-model")
