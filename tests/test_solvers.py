"""The solver driver's contract (docs/maths.md §1, §6–7): NFE, statelessness, per-sample independence, trajectories,
denoise_to_zero, AFS, dynamic thresholding, dtypes, and every bad input ending in a named FewstepError."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.errors import DenoiserError, FewstepError, ScheduleError, SolverError
from fewstep.models import GaussianMixture
from fewstep.solvers import SOLVERS

CLASSIC = ("euler", "heun", "dpm2", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc", "gradient_estimation")



def make_gmm(scale: float = 1.0, dim: int = 6) -> GaussianMixture:
    g = torch.Generator().manual_seed(7)
    means = torch.randn(3, 2, dim // 2, generator=g, dtype=torch.float64) * 0.7 * scale
    return GaussianMixture(means, torch.tensor([0.2, 0.4, 0.3]), torch.tensor([0.2, 0.5, 0.3]))


GMM = make_gmm()


def make_noise(batch: int = 3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


class Counter:
    """Wraps a denoiser and counts its calls (and remembers what it was given)."""

    def __init__(self, denoiser=GMM):
        self.denoiser = denoiser
        self.calls = 0
        self.sigmas: list[torch.Tensor] = []
        self.dtypes: list[torch.dtype] = []

    def __call__(self, x, sigma):
        self.calls += 1
        self.sigmas.append(sigma.clone())
        self.dtypes.append(x.dtype)
        return self.denoiser(x, sigma)


def option_grid(solver: str) -> list[dict]:
    """Every combination of a solver's discrete options (max_order over its whole range, r at two values)."""
    values = []
    for name, opt in SOLVERS[solver].options.items():
        if opt.choices is not None:
            values.append([(name, v) for v in opt.choices])
        elif name == "max_order":
            values.append([(name, k) for k in range(int(opt.low), int(opt.high) + 1)])
        elif name == "r":
            values.append([(name, 0.5), (name, 0.3)])
        else:
            values.append([(name, opt.default)])
    return [dict(c) for c in itertools.product(*values)] if values else [{}]


def sched(n: int = 6, lo: float = 0.01, hi: float = 40.0) -> torch.Tensor:
    return fewstep.get_schedule("polynomial", n, lo, hi)


# --------------------------------------------------------------------------------------------- NFE


def test_classic_solvers_are_registered():
    assert set(CLASSIC) <= set(SOLVERS)


@pytest.mark.parametrize("solver", CLASSIC)
def test_nfe_matches_calls_for_every_option_combination(solver):
    noise = make_noise(2)
    for options, n, afs, dtz in itertools.product(option_grid(solver), (2, 3, 6), (False, True), (False, True)):
        counter = Counter()
        fewstep.sample(counter, noise, solver, sched(n), afs=afs, denoise_to_zero=dtz, **options)
        expected = fewstep.nfe(solver, n, afs=afs, denoise_to_zero=dtz, **options)
        assert counter.calls == expected, (solver, options, n, afs, dtz)
        per_interval = 2 if solver in ("heun", "dpm2") else 1
        assert expected == per_interval * (n - 1) - afs + dtz


@pytest.mark.parametrize("solver", CLASSIC)
def test_num_steps_for_nfe_inverts_nfe(solver):
    for target in range(1, 12):
        for afs in (False, True):
            n = fewstep.num_steps_for_nfe(solver, target, afs=afs)
            if n is None:
                assert solver in ("heun", "dpm2") and (target + afs) % 2 == 1
            else:
                assert fewstep.nfe(solver, n, afs=afs) == target


def test_nfe_rejects_too_few_steps_and_bad_options():
    with pytest.raises(SolverError):
        fewstep.nfe("euler", 1)
    with pytest.raises(SolverError):
        fewstep.nfe("ipndm", 5, max_order=5)
    with pytest.raises(SolverError):
        fewstep.nfe("nope", 5)


# ------------------------------------------------------------------ statelessness and independence

SOLVER_CONFIGS = [
    ("euler", {}), ("heun", {}), ("dpm2", {"r": 0.4}),
    ("ipndm", {"max_order": 4}), ("ipndm_v", {"max_order": 3}),
    ("deis", {"deis_mode": "tab"}), ("deis", {"deis_mode": "rhoab", "max_order": 2}),
    ("dpmpp", {"max_order": 3}), ("dpmpp", {"max_order": 2, "predict_x0": False}),
    ("unipc", {"max_order": 3}), ("unipc", {"max_order": 2, "variant": "bh1", "predict_x0": False}),
]
CONFIG_IDS = [s + "".join(f"-{v}" for v in o.values()) for s, o in SOLVER_CONFIGS]


@pytest.mark.parametrize("solver,options", SOLVER_CONFIGS, ids=CONFIG_IDS)
def test_runs_do_not_share_state(solver, options):
    a, b = make_noise(3, seed=1), make_noise(2, seed=2)
    first = fewstep.sample(GMM, a, solver, sched(7), **options)
    other = fewstep.sample(GMM, b, solver, sched(5), afs=True, **options)  # different batch, grid, AFS
    again = fewstep.sample(GMM, a, solver, sched(7), **options)
    assert torch.equal(first, again)
    assert torch.equal(other, fewstep.sample(GMM, b, solver, sched(5), afs=True, **options))


@pytest.mark.parametrize("solver,options", SOLVER_CONFIGS, ids=CONFIG_IDS)
def test_reentrant_sampling_inside_the_denoiser(solver, options):
    """A denoiser that itself runs `sample` (with the same solver) in the middle of the outer run changes nothing."""
    inner_results = []

    def nested(x, sigma):
        if not inner_results:
            inner_results.append(fewstep.sample(GMM, make_noise(4, seed=9), solver, sched(5), **options))
        return GMM(x, sigma)

    noise = make_noise(3, seed=3)
    plain = fewstep.sample(GMM, noise, solver, sched(7), **options)
    assert torch.equal(fewstep.sample(nested, noise, solver, sched(7), **options), plain)
    assert torch.equal(inner_results[0], fewstep.sample(GMM, make_noise(4, seed=9), solver, sched(5), **options))


@pytest.mark.parametrize("solver,options", SOLVER_CONFIGS, ids=CONFIG_IDS)
def test_batch_equals_concatenated_single_samples(solver, options):
    noise = make_noise(5, seed=4)
    batch = fewstep.sample(GMM, noise, solver, sched(8), afs=True, denoise_to_zero=True, **options)
    singles = torch.cat([fewstep.sample(GMM, noise[i : i + 1], solver, sched(8), afs=True, denoise_to_zero=True,
                                        **options) for i in range(5)])
    torch.testing.assert_close(batch, singles, rtol=1e-12, atol=1e-12)


def test_recommended_schedule_is_used_without_a_schedule():
    noise = make_noise(2)
    for solver in CLASSIC:
        name, rho = SOLVERS[solver].recommended_schedule
        expected = fewstep.sample(GMM, noise, solver, fewstep.get_schedule(name, 6, rho=rho))
        assert torch.equal(fewstep.sample(GMM, noise, solver, num_steps=6), expected)


# ------------------------------------------------------------- trajectory, denoise_to_zero, AFS


@pytest.mark.parametrize("solver,options", SOLVER_CONFIGS, ids=CONFIG_IDS)
def test_return_trajectory(solver, options):
    noise, grid = make_noise(3), sched(6)
    final = fewstep.sample(GMM, noise, solver, grid, **options)
    traj = fewstep.sample(GMM, noise, solver, grid, return_trajectory=True, **options)
    assert traj.shape == (6, *noise.shape)
    assert torch.equal(traj[0], noise * grid[0])
    assert torch.equal(traj[-1], final)
    denoised = fewstep.sample(GMM, noise, solver, grid, denoise_to_zero=True, **options)
    traj_dtz = fewstep.sample(GMM, noise, solver, grid, denoise_to_zero=True, return_trajectory=True, **options)
    assert traj_dtz.shape == (6, *noise.shape)
    assert torch.equal(traj_dtz[-1], denoised)
    if solver in ("dpmpp", "unipc"):
        options = without_final_cap(options)
        traj = fewstep.sample(GMM, noise, solver, grid, return_trajectory=True, **options)
        traj_dtz = fewstep.sample(GMM, noise, solver, grid, denoise_to_zero=True, return_trajectory=True, **options)
    assert torch.equal(traj_dtz[:-1], traj[:-1])


def without_final_cap(options: dict) -> dict:
    """`lower_order_final` counts the final denoise as a step (as diffusers' and k-diffusion's final step to
    σ = 0 does), so with denoise_to_zero the last intervals may run at a higher order; without that cap a run
    with and without the final denoise takes the same steps."""
    return {**options, "lower_order_final": False}


@pytest.mark.parametrize("solver,options", SOLVER_CONFIGS, ids=CONFIG_IDS)
def test_denoise_to_zero_is_one_final_denoiser_call(solver, options):
    noise, grid = make_noise(3), sched(6)
    if solver in ("dpmpp", "unipc"):
        options = without_final_cap(options)
    x_min = fewstep.sample(GMM, noise, solver, grid, **options)
    counter = Counter()
    out = fewstep.sample(counter, noise, solver, grid, denoise_to_zero=True, **options)
    torch.testing.assert_close(out, GMM(x_min, torch.full((3,), grid[-1].item(), dtype=torch.float64)),
                               rtol=0, atol=1e-14)
    assert counter.calls == fewstep.nfe(solver, 6, **options) + 1
    assert torch.equal(counter.sigmas[-1], torch.full((3,), grid[-1].item(), dtype=torch.float64))


def afs_d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x / math.sqrt(1 + sigma**2)


def test_afs_euler_first_step_is_analytic():
    noise, grid = make_noise(3), sched(2)
    counter = Counter()
    out = fewstep.sample(counter, noise, "euler", grid, afs=True)
    t0, t1 = grid.tolist()
    x0 = noise * t0
    torch.testing.assert_close(out, x0 + (t1 - t0) * afs_d(x0, t0), rtol=1e-14, atol=1e-12)
    assert counter.calls == 0


def test_afs_dpmpp_uses_the_analytic_data_prediction():
    """Data-prediction solvers get D_0 = x_0 − t_0·d_0 from AFS: x_1 = (t_1/t_0)·x_0 − expm1(−h)·D_0."""
    noise, grid = make_noise(3), sched(2)
    out = fewstep.sample(Counter(), noise, "dpmpp", grid, afs=True)
    t0, t1 = grid.tolist()
    x0 = noise * t0
    d0 = x0 - t0 * afs_d(x0, t0)
    h = math.log(t0) - math.log(t1)
    torch.testing.assert_close(out, (t1 / t0) * x0 - math.expm1(-h) * d0, rtol=1e-13, atol=1e-12)


def test_afs_node_enters_multistep_history():
    """iPNDM_v(2) with AFS on 3 points: x1 = x0 + h0·d0(AFS); x2 = x1 + C0·d1 + C1·d0(AFS), C = ∫ Lagrange."""
    noise, grid = make_noise(3), sched(3)
    counter = Counter()
    out = fewstep.sample(counter, noise, "ipndm_v", grid, afs=True, max_order=2)
    t0, t1, t2 = grid.tolist()
    x0 = noise * t0
    d0 = afs_d(x0, t0)
    x1 = x0 + (t1 - t0) * d0
    d1 = (x1 - GMM(x1, torch.full((3,), t1, dtype=torch.float64))) / t1
    basis = [np.polynomial.Polynomial.fromroots([t0]) / (t1 - t0), np.polynomial.Polynomial.fromroots([t1]) / (t0 - t1)]
    c = [(p.integ()(t2) - p.integ()(t1)) for p in basis]  # weights of d1 (node t1) and d0 (node t0)
    torch.testing.assert_close(out, x1 + c[0] * d1 + c[1] * d0, rtol=1e-12, atol=1e-11)
    assert counter.calls == 1
    assert counter.sigmas[0].tolist() == [t1] * 3


@pytest.mark.parametrize("solver,options", SOLVER_CONFIGS, ids=CONFIG_IDS)
def test_afs_skips_exactly_the_first_call(solver, options):
    noise, grid = make_noise(2), sched(5)
    plain, with_afs = Counter(), Counter()
    fewstep.sample(plain, noise, solver, grid, **options)
    fewstep.sample(with_afs, noise, solver, grid, afs=True, **options)
    assert with_afs.calls == plain.calls - 1
    assert [s.tolist() for s in with_afs.sigmas] == [s.tolist() for s in plain.sigmas[1:]]


# ------------------------------------------------------------------------ thresholding, dtypes


def test_dynamic_thresholding_is_off_by_default_and_changes_results_when_on():
    big = make_gmm(scale=4.0)  # data well outside [−1, 1]
    noise, grid = make_noise(3), sched(6)
    default = fewstep.sample(big, noise, "dpmpp", grid, denoise_to_zero=True)
    assert torch.equal(default, fewstep.sample(big, noise, "dpmpp", grid, denoise_to_zero=True, thresholding=False))
    assert default.abs().max() > 1.5
    on = fewstep.sample(big, noise, "dpmpp", grid, denoise_to_zero=True, thresholding=True)
    assert (on - default).abs().max() > 0.1
    assert on.abs().max() <= 1 + 1e-12  # the final output is a thresholded D


def test_dynamic_thresholding_leaves_data_inside_unit_range_alone():
    small = make_gmm(scale=0.5)
    noise, grid = make_noise(3), sched(6)

    def clipped(x, sigma):  # a denoiser whose output is always in [−1, 1]
        return small(x, sigma).clamp(-0.99, 0.99)

    a = fewstep.sample(clipped, noise, "unipc", grid, denoise_to_zero=True)
    b = fewstep.sample(clipped, noise, "unipc", grid, denoise_to_zero=True, thresholding=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype,expected", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                            (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("solver", CLASSIC)
def test_output_dtype(solver, dtype, expected):
    counter = Counter()
    noise = make_noise(2, dtype=dtype)
    out = fewstep.sample(counter, noise, solver, sched(5), denoise_to_zero=True)
    assert out.dtype == expected
    assert set(counter.dtypes) == {expected}
    assert all(s.dtype == expected and s.shape == (2,) for s in counter.sigmas)
    traj = fewstep.sample(GMM, noise, solver, sched(5), return_trajectory=True)
    assert traj.dtype == expected
    if dtype == torch.float32:  # float32 arithmetic stays close to the float64 solve
        ref = fewstep.sample(GMM, noise.double(), solver, sched(5), denoise_to_zero=True)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- bad input


def test_all_errors_are_fewstep_errors():
    for cls in (ScheduleError, SolverError, DenoiserError):
        assert issubclass(cls, FewstepError)
    assert issubclass(ScheduleError, ValueError) and issubclass(SolverError, ValueError)
    assert issubclass(DenoiserError, RuntimeError)


def test_too_few_steps():
    noise = make_noise(2)
    with pytest.raises(ScheduleError):
        fewstep.sample(GMM, noise, "euler", num_steps=1)
    with pytest.raises(ScheduleError):
        fewstep.sample(GMM, noise, "euler", torch.tensor([1.0]))
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("polynomial", 1)


@pytest.mark.parametrize("bad", [
    [1.0, 2.0, 0.5],             # increasing somewhere
    [2.0, 1.0, 1.0],             # repeated point
    [2.0, 1.0, 0.0],             # zero
    [2.0, -1.0, -2.0],           # negative
    [2.0, float("nan"), 0.5],    # NaN
    [float("inf"), 1.0, 0.5],    # infinite
    [[2.0, 1.0], [0.5, 0.1]],    # not 1-D
])
def test_bad_schedule(bad):
    with pytest.raises(ScheduleError):
        fewstep.sample(GMM, make_noise(2), "euler", torch.tensor(bad, dtype=torch.float64))


def test_sigma_range_must_be_ordered():
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("polynomial", 5, sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ScheduleError):
        fewstep.get_schedule("logsnr", 5, sigma_min=1.0, sigma_max=1.0)


def test_schedule_and_num_steps_must_agree():
    with pytest.raises(SolverError):
        fewstep.sample(GMM, make_noise(2), "euler", sched(6), num_steps=5)
    with pytest.raises(SolverError):
        fewstep.sample(GMM, make_noise(2), "euler")  # neither


def test_noise_must_be_a_tensor():
    with pytest.raises(SolverError):
        fewstep.sample(GMM, [[1.0, 2.0]], "euler", sched(3))
    with pytest.raises(SolverError):
        fewstep.sample(GMM, torch.tensor(1.0), "euler", sched(3))


def test_unknown_solver():
    with pytest.raises(SolverError, match="unknown solver"):
        fewstep.sample(GMM, make_noise(2), "rk45", sched(3))


@pytest.mark.parametrize("solver,options", [
    ("euler", {"max_order": 2}),
    ("heun", {"r": 0.5}),
    ("ipndm", {"predict_x0": True}),
    ("unipc", {"deis_mode": "tab"}),
    ("dpmpp", {"orde": 2}),
])
def test_unknown_option(solver, options):
    with pytest.raises(SolverError, match="unknown option"):
        fewstep.sample(GMM, make_noise(2), solver, sched(3), **options)


@pytest.mark.parametrize("solver,bad", [
    *[(s, v) for s in ("ipndm", "ipndm_v", "deis") for v in (0, 5, -1, 2.5, True, "2")],
    *[(s, v) for s in ("dpmpp", "unipc") for v in (0, 4, 2.0)],
])
def test_max_order_out_of_range(solver, bad):
    with pytest.raises(SolverError):
        fewstep.sample(GMM, make_noise(2), solver, sched(3), max_order=bad)
    with pytest.raises(SolverError):
        fewstep.nfe(solver, 5, max_order=bad)


@pytest.mark.parametrize("solver,options", [
    ("deis", {"deis_mode": "lagrange"}), ("unipc", {"variant": "bh3"}), ("dpmpp", {"predict_x0": "yes"}),
    ("dpm2", {"r": 0.0}), ("dpm2", {"r": 1.5}), ("dpmpp", {"lower_order_final": 1.5}),
])
def test_option_values_are_validated(solver, options):
    with pytest.raises(SolverError):
        fewstep.sample(GMM, make_noise(2), solver, sched(3), **options)


def test_denoiser_returning_wrong_shape():
    grid = sched(4)
    with pytest.raises(DenoiserError, match=r"shape \(2, 2, 2\).*at step 0") as info:
        fewstep.sample(lambda x, s: x[..., :2], make_noise(2), "euler", grid)
    assert f"sigma={grid[0].item():.6g}" in str(info.value)
    with pytest.raises(DenoiserError, match="not a tensor"):
        fewstep.sample(lambda x, s: x.numpy(), make_noise(2), "euler", grid)


def failing_at(call_index: int, value: float):
    """A denoiser that puts `value` (NaN/Inf) into its output at the call with this index."""
    state = {"calls": 0}

    def denoiser(x, sigma):
        out = GMM(x, sigma)
        if state["calls"] == call_index:
            out = out.clone()
            out[0, 0, 0] = value
        state["calls"] += 1
        return out

    return denoiser


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_denoiser_output_names_step_and_sigma(value):
    grid = sched(6)
    with pytest.raises(DenoiserError, match="non-finite") as info:
        fewstep.sample(failing_at(3, value), make_noise(2), "euler", grid)
    msg = str(info.value)
    assert "at step 3" in msg and f"sigma={grid[3].item():.6g}" in msg, msg


def test_non_finite_in_an_inner_stage_names_its_sigma():
    """Heun's second call in interval 0 is evaluated at t_1: the error names step 0 and σ = t_1."""
    grid = sched(6)
    with pytest.raises(DenoiserError) as info:
        fewstep.sample(failing_at(1, float("nan")), make_noise(2), "heun", grid)
    msg = str(info.value)
    assert "at step 0" in msg and f"sigma={grid[1].item():.6g}" in msg, msg


def test_non_finite_in_denoise_to_zero_names_the_last_step():
    grid = sched(5)
    with pytest.raises(DenoiserError) as info:
        fewstep.sample(failing_at(4, float("nan")), make_noise(2), "euler", grid, denoise_to_zero=True)
    msg = str(info.value)
    assert "at step 4" in msg and f"sigma={grid[4].item():.6g}" in msg, msg


def test_denoiser_that_raises():
    grid = sched(6)
    state = {"calls": 0}

    def broken(x, sigma):
        state["calls"] += 1
        if state["calls"] == 3:
            raise ZeroDivisionError("boom")
        return GMM(x, sigma)

    with pytest.raises(DenoiserError, match="ZeroDivisionError") as info:
        fewstep.sample(broken, make_noise(2), "dpmpp", grid)
    msg = str(info.value)
    assert "at step 2" in msg and f"sigma={grid[2].item():.6g}" in msg and "boom" in msg, msg
    assert isinstance(info.value.__cause__, ZeroDivisionError)
