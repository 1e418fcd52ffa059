"""The one sampling loop (`fewstep.solvers.run`) and its consumers: requests per model call, AMED's training
rollout = `sample`, and imports of every module in isolation (the diffusers scheduler's loop tests are in
test_diffusers_scheduler.py)."""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.amed.predictor import AMEDPredictor
from fewstep.amed.solver import AMEDPlugin
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
        traj = fewstep.sample(GMM.denoiser, noise, AMEDPlugin(get_solver(student), predictor), sigmas, afs=True,
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


# package → the packages nothing it imports may reach (lazy imports and imports of imports included)
LAYERS = {
    "solvers": ("amed", "learned", "evaluation", "integrations", "cli"),
    "models": ("solvers",),
    "learned": ("evaluation",),
    "gits": ("evaluation",),
}


def test_package_layering():
    """The package rules above, on the module graph; and nothing but the command line itself (and `python -m
    fewstep`) imports `fewstep.cli`. A failure names the module and what it reaches."""
    graph = module_imports()
    package = lambda name: name.split(".")[1] if "." in name else ""  # noqa: E731

    def reach(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    broken = [f"{name} reaches {dep}" for name in sorted(graph) for dep in sorted(reach(name))
              if package(dep) in LAYERS.get(package(name), ())]
    broken += [f"{name} imports {dep}" for name in sorted(graph) if package(name) != "cli"
               and name != "fewstep.__main__" for dep in sorted(graph[name]) if package(dep) == "cli"]
    assert set(LAYERS) <= {package(n) for n in graph}
    assert not broken, "\n".join(broken)


def test_solvers_know_nothing_of_amed():
    """The core loop and the solvers name no AMED concept: the plugin is a Solver wrapper in fewstep.amed. Words
    in any text (comments, strings); 'predictor' as an identifier (UniPC's predictor–corrector is its own)."""
    root = Path(fewstep.__file__).parent / "solvers"
    words = re.compile(r"\bamed\b|bottleneck|\bcontrol", re.IGNORECASE)
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        found += [f"{path.name}: {m.group(0)}" for m in words.finditer(text)]
        names = {tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                 if tok.type == tokenize.NAME}
        found += [f"{path.name}: {n}" for n in sorted(names) if "predictor" in n.lower()]
    assert len(list(root.rglob("*.py"))) >= 6
    assert not found, found


def test_every_module_imports_first():
    """Each module imports in an interpreter where no other fewstep module was imported before it; a module of an
    optional extra whose dependency is missing may only refuse with the error naming that extra."""
    names = sorted(n for n in module_imports() if not n.endswith("__main__"))
    code = ("import importlib, sys, torch\n"
            "bad = []\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m.split('.')[0] == 'fewstep']: del sys.modules[m]\n"
            "    try: importlib.import_module(name)\n"
            "    except ImportError as e:\n"
            "        if \"pip install 'fewstep[\" not in str(e): bad.append(f'{name}: {type(e).__name__}: {e}')\n"
            "    except Exception as e: bad.append(f'{name}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(bad)); sys.exit(bool(bad))\n")
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(names) > 40
