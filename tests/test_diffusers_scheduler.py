"""The diffusers scheduler as a consumer of the one sampling loop: O(1) solver work per step, latents edited
between steps, and the contract gaps of diffusers' SchedulerCommonTest. Skipped without diffusers (the loop's own
tests in test_driver.py do not need it)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fewstep
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.solvers import Evaluator, get_solver, integrate

diffusers = pytest.importorskip("diffusers")
from fewstep.integrations.diffusers import FewstepScheduler  # noqa: E402

GMM = load_model("gmm")
CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def eps_of(sched: FewstepScheduler):
    """A near-exact ε-network for GMM in the scheduler's VP coordinates (D from the analytic denoiser)."""

    def eps(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = fewstep.schedules.timestep_to_sigma(t.double().reshape(-1), sched.sigma_table).to(x_vp.dtype)
        s = sigma.reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp * torch.sqrt(1 + s * s)
        return (x - GMM.denoiser(x, sigma.expand(x.shape[0]))) / s

    return eps


def diffusers_loop(sched: FewstepScheduler, z: torch.Tensor, steps: int, edit=None) -> torch.Tensor:
    """diffusers' pipeline loop, with an optional `callback_on_step_end`-style edit(i, latents) → latents."""
    sched.set_timesteps(steps)
    eps = eps_of(sched)
    latents = z * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(latents, t)
        latents = sched.step(eps(model_input, t.expand(latents.shape[0])), t, latents).prev_sample
        if edit is not None:
            latents = edit(i, latents)
    return latents


def test_scheduler_does_constant_solver_work_per_step(monkeypatch):
    sched = FewstepScheduler(**CONFIG, solver="dpmpp", final_sigmas_type="sigma_min")
    steps = []
    step = sched._algo.step
    monkeypatch.setattr(sched._algo, "step", lambda *a, **k: steps.append(1) or step(*a, **k))
    z = seeded_noise(range(2), GMM.shape)
    out = diffusers_loop(sched, z, 50)
    # 50 in set_timesteps' dry run of the model σ's, 50 in the run (replaying from x_T would take 50 + 1 275)
    assert len(steps) == 2 * 50
    assert torch.isfinite(out).all()


def test_scheduler_honours_latents_edited_between_steps():
    """An edit of the returned latents (callback_on_step_end) is the state the run continues from."""
    z = seeded_noise(range(2), GMM.shape)
    sched = FewstepScheduler(**CONFIG, solver="euler", final_sigmas_type="sigma_min")
    k = 2

    def edit(i: int, latents: torch.Tensor) -> torch.Tensor:
        return latents * 0.5 if i == k else latents

    plain = diffusers_loop(sched, z, 6)
    edited = diffusers_loop(sched, z, 6, edit)
    sigmas = sched.grid
    ev = Evaluator(lambda x, s: eps_to_d(sched, x, s))
    head = integrate(get_solver("euler"), ev, z * float(sigmas[0]), sigmas[: k + 2])
    expected = integrate(get_solver("euler"), ev, head * 0.5, sigmas[k + 1 :])
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert (edited - plain).abs().max() > 1e-3


def eps_to_d(sched: FewstepScheduler, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D through the same VP conversion the scheduler uses (model input → ε → D)."""
    x_vp = sched._table.model_input(x, sigma)
    return sched._table.denoised(x, sigma, eps_of(sched)(x_vp, sched._table.timesteps(sigma)))


def test_scheduler_contract_gaps_of_diffusers_common_tests(tmp_path):
    sched = FewstepScheduler(**CONFIG)
    sample = torch.randn(2, 1, 8, 8)
    assert sched.scale_model_input(sample, 0.0) is sample  # before set_timesteps, as diffusers' schedulers do
    trained = FewstepScheduler(**CONFIG, trained_betas=[0.1, 0.3])
    trained.save_pretrained(tmp_path)
    again = FewstepScheduler.from_pretrained(tmp_path)
    assert trained.betas.tolist() == again.betas.tolist() == pytest.approx([0.1, 0.3])
    assert torch.equal(sched.betas, diffusers.DDPMScheduler(**CONFIG).betas)


def test_scheduler_warns_when_an_intermediate_state_is_edited():
    sched = FewstepScheduler(**CONFIG, solver="heun", final_sigmas_type="sigma_min")
    z = seeded_noise(range(2), GMM.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffusers_loop(sched, z, 3, lambda i, latents: latents + 0.01 if i == 0 else latents)
    assert any("intermediate" in str(w.message) for w in caught)
