"""Every solver on flow models, from t = 1 exactly (docs/maths.md §15): precision, convergence, parity with
diffusers' flow schedulers, and the equivalence of the exponential integrators across frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.errors import SolverError
from fewstep.flow import sigma_of
from fewstep.frames import EDM, FLOW
from fewstep.models.analytic import GaussianMixture
from fewstep.models.flow import FlowGaussianMixture
from fewstep.models.registry import gmm_parameters
from fewstep.solvers import Evaluator, GridPoint, answer, get_solver, run
from ode_reference import rk4

GMM_FLOW = FlowGaussianMixture(*gmm_parameters())
SMOOTH_FLOW = FlowGaussianMixture(gmm_parameters()[0], 0.25, gmm_parameters()[2])  # a well-conditioned ODE
NOISE64 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

# every solver configuration (AMED-Plugin and cards are checked in their own tests)
CONFIGS: list[tuple[str, dict]] = [
    ("euler", {}), ("heun", {}), ("dpm2", {}), ("amed", {}), ("gradient_estimation", {}),
    *[("ipndm", {"max_order": k}) for k in (1, 2, 3, 4)],
    *[("ipndm_v", {"max_order": k}) for k in (1, 2, 3, 4)],
    *[("deis", {"max_order": k, "deis_mode": m}) for m in ("tab", "rhoab") for k in (1, 2, 3, 4)],
    *[("dpmpp", {"max_order": k}) for k in (1, 2, 3)],
    *[("unipc", {"max_order": p, "variant": v}) for v in ("bh1", "bh2") for p in (1, 2, 3)],
]


def _id(cfg) -> str:
    return cfg[0] + "".join(f"-{v}" for v in cfg[1].values())


def flow_grid(n: int, shift: float = 3.0) -> torch.Tensor:
    return fewstep.get_schedule(f"flow:shift={shift}", n, 1e-3, 1.0)


@pytest.mark.parametrize("afs", [False, True], ids=["plain", "afs"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[_id(c) for c in CONFIGS])
def test_float32_matches_float64_from_t1(cfg, afs):
    """The same solve from t = 1 in float32 and float64 agrees to 1e-5 relative: nothing is O(σ) = O(∞).
    (In σ-space from σ = 1e6, DEIS loses 4e-2.) On a well-conditioned problem: the gmm's sharp components
    (s = 0.05…0.26) amplify a float32 rounding of the noise (6e-8) to 1.3e-5 at the sample, which no float32
    solve can beat; with s = 0.25 the worst here is Heun at 3.4e-6 (its last d = (x − D)/t at t = 1e-3
    multiplies the rounding of x − D by h/t), the same on every CPU kernel set; 1e-5 leaves a factor 3."""
    solver, opts = cfg
    grid = flow_grid(9)
    x64 = fewstep.sample(SMOOTH_FLOW, NOISE64, solver, grid, afs=afs, **opts)
    x32 = fewstep.sample(SMOOTH_FLOW, NOISE64.float(), solver, grid, afs=afs, **opts)
    assert x64.dtype == torch.float64 and x32.dtype == torch.float32
    assert torch.isfinite(x64).all()
    rel = ((x32.double() - x64).norm() / x64.norm()).item()
    assert rel < 1e-5, f"{_id(cfg)}: float32 vs float64 relative difference {rel:.2e}"


def test_flow_run_starts_at_t1_and_ends_with_the_step_to_zero():
    """x_T = 1·ε, the first call is at t = 1 exactly, and the sample is D at the last grid time (one more call)."""
    seen: list[float] = []

    def model(x, t):
        seen.append(float(t[0]))
        return GMM_FLOW(x, t)

    model.frame = FLOW
    grid = flow_grid(5)
    x = fewstep.sample(model, NOISE64, "euler", grid)
    assert seen == [*grid.tolist()[:-1], float(grid[-1])]  # 4 grid points + the final denoise at t_min
    assert seen[0] == 1.0
    # Euler = DDIM in t: x' = (t'/t)·x + (1 − t'/t)·D, finite at t = 1; ends with x₀ = D(x, t_min)
    xs = NOISE64.clone()
    for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        d = GMM_FLOW(xs, torch.full((16,), t, dtype=torch.float64))
        xs = (t_next / t) * xs + (1 - t_next / t) * d
    ref = GMM_FLOW(xs, torch.full((16,), float(grid[-1]), dtype=torch.float64))
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)


def test_afs_on_flow_is_zero_mean_at_t1():
    """AFS's first node at t = 1 is D₀ = 0 (no call), so AFS Euler's first step lands on t'·ε."""
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return GMM_FLOW(x, t)

    model.frame = FLOW
    grid = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = fewstep.sample(model, NOISE64, "euler", grid, afs=True, denoise_to_zero=False)
    torch.testing.assert_close(x, 0.5 * NOISE64)
    assert calls == []


@pytest.mark.parametrize("cfg", [("dpmpp", {"max_order": k}) for k in (1, 2, 3)]
                         + [("unipc", {"max_order": p, "variant": v}) for v in ("bh1", "bh2") for p in (1, 2, 3)],
                         ids=lambda c: _id(c) if isinstance(c, tuple) else str(c))
def test_exponential_integrators_are_the_same_method_in_both_frames(cfg):
    """DPM-Solver++ and UniPC are invariant under the change of variables x̂ = x_t/(1 − t), σ = t/(1 − t): on a
    grid below t = 1, the flow-frame solve equals the EDM-frame solve of the σ-space view of the same model
    (mapped back), up to float64 round-off."""
    solver, opts = cfg
    grid = flow_grid(8)[1:]  # start at t_1 < 1 so that σ-space can represent it
    edm = GaussianMixture(*gmm_parameters())
    sig = sigma_of(grid)
    ours = fewstep.sample(GMM_FLOW, NOISE64, solver, grid, denoise_to_zero=False, **opts)
    # x̂_0 = x_t0/(1 − t_0) = σ_0·ε: the same noise; the result maps back by x_t = (1 − t)·x̂
    ref = fewstep.sample(edm, NOISE64, solver, sig, **opts) * (1 - float(grid[-1]))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_noise_prediction_is_refused_on_flow_models():
    with pytest.raises(SolverError, match="noise prediction"):
        fewstep.sample(GMM_FLOW, NOISE64, "dpmpp", flow_grid(5), predict_x0=False)


def test_flow_grid_times_must_be_at_most_one():
    with pytest.raises(fewstep.errors.ScheduleError, match=r"\(0, 1\]"):
        fewstep.sample(GMM_FLOW, NOISE64, "euler", torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))


# ----------------------------------------------------------------------------------------- convergence orders
#
# Measured from t = 1 on grids uniform in t over [0.02, 1] (+ the final denoise), 4 samples, against classic RK4
# written here on dx/dt = (x − D)/t (independent of fewstep's solvers; its error, ‖RK4(2000) − RK4(1000)‖/15, is
# ~3e-13). Slopes for N − 1 = 40 → 80 → 160 → 320 → 640 (* = the asserted interval):
#     euler 0.98 0.99* 1.00 1.00      heun 1.93 1.97* 1.98 1.99       dpm2 1.99 2.00* 2.00 2.00
#     ipndm_v k=2 2.00 2.00* 2.00 2.00   deis(tab) k=2 1.79 1.88* 1.93 1.96   dpmpp 2M 2.00 2.05* 2.04 2.02
#     unipc bh2 p=1 1.77 1.88* 1.94 1.97   p=2 2.58 2.80* 2.90 2.95   p=3 3.01 3.56 3.79* 3.90
#     ipndm_v k=3 2.70 2.70 2.47 2.21 then 2.07* (640 → 1280): second order, like k=4 (2.01)
# Multistep methods of order ≥ 3 fall to 2 from t = 1: their first-order warm-up step has local error O(h²), and
# unlike EDM's start at large σ (where the trajectory is straight, docs/maths.md §4) a flow model's D moves at
# O(1) speed at t = 1, so that error does not fade. UniPC's warm-up is already second order (its corrector), so
# p = 3 keeps order 4. DPM-Solver++(3M) is second order in both frames (test_convergence).

T_MIN = 0.02


def rk4_flow(noise: torch.Tensor, steps: int) -> torch.Tensor:
    def f(t, y):
        return (y - GMM_FLOW(y, t.expand(y.shape[0]))) / t

    x = rk4(f, noise.clone(), torch.linspace(1.0, T_MIN, steps + 1, dtype=torch.float64))
    return GMM_FLOW(x, torch.full((x.shape[0],), T_MIN, dtype=torch.float64))  # the final step to t = 0


@pytest.fixture(scope="module")
def flow_reference() -> torch.Tensor:
    fine, coarse = rk4_flow(NOISE64[:4], 2000), rk4_flow(NOISE64[:4], 1000)
    assert (fine - coarse).pow(2).mean().sqrt().item() / 15 < 1e-11
    return fine


LOF = {"lower_order_final": False}
ORDER_CASES = [
    ("euler", {}, 1, 80), ("heun", {}, 2, 80), ("dpm2", {}, 2, 80), ("gradient_estimation", {}, 1, 80),
    ("ipndm_v", {"max_order": 2}, 2, 80), ("deis", {"max_order": 2}, 2, 80), ("dpmpp", {"max_order": 2, **LOF}, 2, 80),
    ("unipc", {"max_order": 1, **LOF}, 2, 80), ("unipc", {"max_order": 2, **LOF}, 3, 80),
    ("unipc", {"max_order": 3, **LOF}, 4, 160), ("ipndm_v", {"max_order": 3}, 2, 640),
]


@pytest.mark.parametrize("solver,options,order,n", ORDER_CASES, ids=[_id(c[:2]) for c in ORDER_CASES])
def test_convergence_order_from_t1(flow_reference, solver, options, order, n):
    """The measured global order from t = 1 (n → 2n intervals) is the theory's within ±0.3, as in EDM."""
    errs = []
    for m in (n, 2 * n):
        x = fewstep.sample(GMM_FLOW, NOISE64[:4], solver, torch.linspace(1.0, T_MIN, m + 1, dtype=torch.float64),
                           **options)
        errs.append((x - flow_reference).pow(2).mean().sqrt().item())
    slope = math.log(errs[0] / errs[1]) / math.log(2)
    assert abs(slope - order) <= 0.3, f"{solver} {options}: errors {errs}, slope {slope:.2f}, expected {order}"


# --------------------------------------------------------------------------------------- diffusers parity

def _diffusers_loop(sched, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """diffusers' flow sampling loop with the exact mixture's velocity, called at the scheduler's own sigma
    (its int64 `timesteps` only index the steps). Returns (the state at the last positive sigma, the final
    sample after the step to 0, NFE)."""
    calls, last = 0, x
    for i, ts in enumerate(sched.timesteps):
        t = sched.sigmas[i].double().expand(x.shape[0])
        last = x
        x = sched.step(GMM_FLOW.velocity(x, t), ts, x).prev_sample
        calls += 1
    return last, x, calls


def _fewstep_run(solver: str, grid: torch.Tensor, noise: torch.Tensor, **opts) -> tuple[torch.Tensor, torch.Tensor]:
    """fewstep's loop over `grid` with the final step to 0: (the state at the last grid point, the sample)."""
    states = {}

    def on_grid_point(point: GridPoint) -> None:
        states[point.index] = point.x

    x = noise * float(grid[0])
    out = answer(run(get_solver(solver, **opts), x, grid, denoise_to_zero=True, frame=FLOW),
                 Evaluator(GMM_FLOW).answer, on_grid_point)
    return states[len(grid) - 1], out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n", [3, 5, 10])
def test_euler_matches_diffusers_flow_match_euler(n):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1, 1 / 1000, n))
    _, ref, calls = _diffusers_loop(sched, NOISE64.clone())
    grid = sched.sigmas[:-1].double()
    assert float(grid[0]) == 1.0
    ours = fewstep.sample(GMM_FLOW, NOISE64, "euler", grid)
    assert _rel(ours, ref) < 1e-6 and calls == fewstep.nfe("euler", n, denoise_to_zero=True) == n


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers_flow_unipc(order, variant):
    """On diffusers' own grid (it starts at 1 − 1e-6 and ends at linspace's second-to-last point, shifted) the
    states agree to 1e-5 at the last grid point; diffusers' bh1 returns NaN in its step to 0 (B(h) = h = ∞
    there), fewstep's last step is D. Starting at t = 1 exactly instead of 1 − 1e-6 changes the sample by
    (measured, 8 steps, shift 3) bh2 order 1 / 2 / 3: 2e-4 / 3.7e-4 / 6.5e-4; bh1: 5.0e-3 / 3.1e-2 / 4.5e-2 — bh1's
    first corrector has weight B(h) = h ≈ 14 on diffusers' grid and no limit at t = 1, where fewstep skips it."""
    diffusers = pytest.importorskip("diffusers")
    n = 8
    sched = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                              flow_shift=3.0, solver_order=order, solver_type=variant,
                                              predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(n)
    ref_last, ref, calls = _diffusers_loop(sched, NOISE64.clone())
    grid = sched.sigmas[:-1].double()
    opts = {"max_order": order, "variant": variant}
    last, out = _fewstep_run("unipc", grid, NOISE64 / float(grid[0]), **opts)  # x_T = ε, as diffusers
    assert _rel(last, ref_last) < 1e-5 and calls == n == fewstep.nfe("unipc", n, denoise_to_zero=True)
    if variant == "bh2":
        assert _rel(out, ref) < 1e-5
    else:
        assert torch.isnan(ref).all() and torch.isfinite(out).all()
    exact = grid.clone()
    exact[0] = 1.0
    _, from_one = _fewstep_run("unipc", exact, NOISE64, **opts)
    assert _rel(from_one, out) < (1e-3 if variant == "bh2" else 0.1)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_matches_diffusers_flow_dpmsolver(order):
    """≤ 1e-5 on diffusers' grid; from t = 1 exactly instead of its 1 − 1e-6 the sample moves by 1.9e-4
    (measured for every order, 8 steps, shift 3: the first step's weight on D changes by ~2e-5)."""
    diffusers = pytest.importorskip("diffusers")
    n = 8
    sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                  flow_shift=3.0, solver_order=order, algorithm_type="dpmsolver++",
                                                  lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(n)
    _, ref, calls = _diffusers_loop(sched, NOISE64.clone())
    grid = sched.sigmas[:-1].double()
    _, out = _fewstep_run("dpmpp", grid, NOISE64 / float(grid[0]), max_order=order)
    assert _rel(out, ref) < 1e-5 and calls == n
    exact = grid.clone()
    exact[0] = 1.0
    _, from_one = _fewstep_run("dpmpp", exact, NOISE64, max_order=order)
    assert _rel(from_one, out) < 1e-3
