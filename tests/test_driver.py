"""The one sampling loop (`fewstep.solvers.run`) and its consumers: requests per model call, AMED's training
rollout = `sample`, the diffusers scheduler's O(1) work per step and its latent edits, the scheduler contract
gaps of diffusers' SchedulerCommonTest, and imports of every module in isolation."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.amed.predictor import AMEDPredictor
from fewstep.amed.train import TrainConfig, rollout
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.solvers import Evaluator, GridPoint, ModelRequest, get_solver, integrate, run

GMM = load_model("gmm")


def grid(n: int = 6) -> torch.Tensor:
    return fewstep.get_schedule("polynomial", n, GMM.sigma_min, GMM.sigma_max)


@pytest.mark.parametrize("solver,afs,dtz", [("heun", False, True), ("dpm2", True, False), ("unipc", False, True),
                                            ("ipndm", True, False), ("amed", False, False)])
def test_every_model_call_is_a_request(solver, afs, dtz):
    noise = seeded_noise(range(3), GMM.shape)
    sigmas = grid()
    steps = run(get_solver(solver), noise * float(sigmas[0]), sigmas, afs=afs, denoise_to_zero=dtz)
    requests, points, reply = 0, [], None
    while True:
        try:
            msg = steps.send(reply)
        except StopIteration as stop:
            result = stop.value
            break
        if isinstance(msg, ModelRequest):
            requests += 1
            reply = GMM.denoiser(msg.x, msg.model_sigma.to(msg.x.dtype).expand(msg.x.shape[0]))  # a bare D
        else:
            assert isinstance(msg, GridPoint)
            points.append(msg.index)
            reply = None
    assert requests == fewstep.nfe(solver, len(sigmas), afs=afs, denoise_to_zero=dtz)
    assert points == list(range(len(sigmas)))
    expected = fewstep.sample(GMM.denoiser, noise, solver, sigmas, afs=afs, denoise_to_zero=dtz)
    assert torch.equal(result, expected)


@pytest.mark.parametrize("student,loss", [("ipndm", "step"), ("unipc", "e2e"), ("amed", "step+e2e"),
                                          ("euler", "step")])
def test_amed_training_rollout_equals_sample(student, loss):
    """Multistep students roll out freely; single-step ones restart from the teacher's states, which here are
    the student's own trajectory: both must then reproduce `sample` with the same predictor."""
    torch.manual_seed(0)
    predictor = AMEDPredictor(scale_dir=0.1, scale_time=0.2)
    cfg = TrainConfig(student=student, num_steps=4, afs=True, loss=loss)
    sigmas = fewstep.get_schedule("time_uniform", 4, GMM.sigma_min, GMM.sigma_max, rho=1.0)
    noise = seeded_noise(range(4), GMM.shape)
    with torch.no_grad():
        traj = fewstep.sample(GMM.denoiser, noise, student, sigmas, afs=True, predictor=predictor,
                              return_trajectory=True)
    from fewstep.amed.features import feature_source

    with feature_source(None) as features:
        x, losses, controls = rollout(GMM, predictor, cfg, sigmas, traj, features)
    assert torch.equal(x.detach(), traj[-1])
    assert losses == [0.0] * 3 and len(controls) == 3
    assert all(p.grad is not None for p in predictor.parameters() if p.requires_grad)


def test_integrate_is_differentiable_in_the_grid():
    sigmas = grid(5).clone().requires_grad_(True)
    x = integrate(get_solver("dpmpp"), Evaluator(GMM.denoiser), seeded_noise(range(2), GMM.shape) * 80.0, sigmas)
    x.sum().backward()
    assert sigmas.grad is not None and torch.isfinite(sigmas.grad).all() and sigmas.grad.abs().sum() > 0


def module_imports() -> dict[str, set[str]]:
    """Module → the fewstep modules it imports, read from the source: top-level imports and those inside functions
    (a lazy import ties two modules together all the same); `from pkg import name` imports the module pkg.name
    when there is one, else pkg. Relative imports are resolved against the module's package."""
    root = Path(fewstep.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else node.module or ""
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycles():
    """The module graph of fewstep, lazy imports included, is acyclic; a failure names one cycle."""
    graph = module_imports()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_module_imports_first():
    """Each module imports in an interpreter where no other fewstep module was imported before it."""
    names = sorted(n for n in module_imports() if not n.endswith("__main__"))
    code = ("import importlib, sys, torch\n"
            "bad = []\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m.split('.')[0] == 'fewstep']: del sys.modules[m]\n"
            "    try: importlib.import_module(name)\n"
            "    except Exception as e: bad.append(f'{name}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad)); sys.exit(bool(bad))\n")
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(names) > 40


# ------------------------------------------------------------------------------------------------ diffusers

diffusers = pytest.importorskip("diffusers")
from fewstep.integrations.diffusers import FewstepScheduler

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
