"""fewstep's ComfyUI node pack (fewstep.comfyui).

The first tests need no ComfyUI: the pack imports without it, inputs are validated with one-line errors and the
Sigmas node builds fewstep's schedules from a model_sampling's range (stand-in classes named as ComfyUI's). The
rest drive the nodes through ComfyUI's real `KSAMPLER.sample` and `model_sampling` classes around the exact
Gaussian mixture (fewstep.comfyui.analytic) and run only where `comfy` is importable (set it up with
../shared/tools/setup-comfyui.sh, then `PYTHONPATH=$OUT/src:src $OUT/venv/bin/python -m pytest
tests/test_comfyui.py`); CI has no ComfyUI and skips them.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fewstep
from fewstep.comfyui import NODE_CLASS_MAPPINGS
from fewstep.comfyui import bridge
from fewstep.comfyui.__main__ import install
from fewstep.comfyui.bridge import NodeError
from fewstep.flow import shift_time
from fewstep.integrations.kdiffusion import run_solver
from fewstep.learned import Card, save_card
from fewstep.models import GaussianMixture
from fewstep.models.flow import FlowGaussianMixture
from fewstep.models.registry import gmm_parameters

ROOT = Path(__file__).resolve().parents[1]
SAMPLER, SIGMAS, CARD, AMED = (NODE_CLASS_MAPPINGS[k] for k in ("FewstepSampler", "FewstepSigmas", "FewstepCard",
                                                                 "FewstepAMED"))
GMM, GMM_FLOW = GaussianMixture(*gmm_parameters()), FlowGaussianMixture(*gmm_parameters())
SD_RANGE = (0.0291675, 14.614642)  # SD 1.x's discrete σ table


def comfy_available() -> bool:
    try:
        return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy.samplers") is not None
    except (ImportError, ValueError):
        return False


needs_comfy = pytest.mark.skipif(not comfy_available(), reason="ComfyUI's `comfy` package is not importable (set "
                                 "it up with ../shared/tools/setup-comfyui.sh; CI has no ComfyUI)")


# ---------------------------------------------------------------- stand-ins for ComfyUI's model_sampling classes

class EPS:
    pass


class CONST:
    pass


class FakeDiscrete(EPS):
    sigmas = torch.exp(torch.linspace(torch.tensor(SD_RANGE[0]).log(), torch.tensor(SD_RANGE[1]).log(), 1000))
    sigma_min, sigma_max = torch.tensor(SD_RANGE[0]), torch.tensor(SD_RANGE[1])


class FakeFlow(CONST):
    shift = 3.0
    sigmas = shift_time(torch.arange(1, 1001, dtype=torch.float64) / 1000, 3.0).float()
    sigma_min, sigma_max = sigmas[0], sigmas[-1]


def fake_model(sampling: object) -> SimpleNamespace:
    return SimpleNamespace(get_model_object=lambda name: sampling)


def write_card(folder: Path, frame: str = "flow", n: int = 5, shape: tuple = (1, 8, 8)) -> Path:
    """A card with no learned corrections: its base solver on its grid, bit for bit."""
    grid = (fewstep.get_schedule("flow:shift=3", n, 1e-3, 1.0) if frame == "flow"
            else fewstep.get_schedule("polynomial", n, *SD_RANGE))
    card = Card("ipndm", {}, False, grid.tolist(), [0.0] * (n - 1),
                model={"name": "gmm-flow" if frame == "flow" else "gmm-sd", "shape": list(shape), "frame": frame})
    save_card(folder, card)
    return folder


def test_the_pack_never_imports_comfy_at_import_time():
    """Every `import comfy…` in fewstep sits inside a function (the pack loads without ComfyUI; fewstep never
    needs it), and the entry point in pyproject.toml names the pack."""
    for path in (ROOT / "src" / "fewstep").rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] == "comfy"], path
    tomllib = pytest.importorskip("tomllib")
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["comfyui.custom_nodes"]
    assert entry == {"fewstep": "fewstep.comfyui"}


def test_bad_inputs_fail_with_one_line():
    checks = [
        (SAMPLER.VALIDATE_INPUTS("ipndm", 5, False, ""), "Fewstep Sampler: ipndm: option max_order=5 out of range"),
        (SAMPLER.VALIDATE_INPUTS("euler", 2, False, ""), "Fewstep Sampler: euler: unknown option(s) ['max_order']"),
        (SAMPLER.VALIDATE_INPUTS("dpm2", 0, False, "r=2"), "Fewstep Sampler: dpm2: option r=2 out of range"),
        (SAMPLER.VALIDATE_INPUTS("unipc", 0, False, "variant=bh3"), "Fewstep Sampler: unipc: option variant="),
        (SAMPLER.VALIDATE_INPUTS("deis", 0, False, "threshold_ratio=2"), "Fewstep Sampler: option threshold_ratio"),
        (CARD.VALIDATE_INPUTS("/no/such/card"), "Fewstep Card: card folder '/no/such/card' does not exist"),
        (AMED.VALIDATE_INPUTS(""), "Fewstep AMED: give the AMED checkpoint folder"),
        (SIGMAS.VALIDATE_INPUTS("flow", 0.0, "shift=x"), "Fewstep Sigmas: flow schedule option shift='x'"),
        (SIGMAS.VALIDATE_INPUTS("logsnr", 3.0, ""), "Fewstep Sigmas: schedule 'logsnr' takes no rho"),
        (SIGMAS.VALIDATE_INPUTS("gits", 0.0, "/no/file.json"), "Fewstep Sigmas: the gits schedule needs its file"),
    ]
    for got, start in checks:
        assert isinstance(got, str) and got.startswith(start) and "\n" not in got, got
    assert SAMPLER.VALIDATE_INPUTS("deis", 3, True, "deis_mode=rhoab, thresholding=true") is True
    assert SIGMAS.VALIDATE_INPUTS("flow", 0.0, "spacing=karras") is True
    with pytest.raises(NodeError, match=r"^Fewstep Sampler: ipndm: option max_order=5 out of range \[1, 4\]$"):
        SAMPLER().get_sampler("ipndm", 5, False)
    with pytest.raises(NodeError, match=r"^Fewstep Sigmas: schedule 'flow' is for flow \(CONST\) models; this is "
                                         r"a EPS model"):
        SIGMAS().get_sigmas(fake_model(FakeDiscrete()), "flow", 5, 1.0)
    with pytest.raises(NodeError, match=r"^Fewstep Card: card folder '/no/such/card' does not exist$"):
        CARD().load(fake_model(FakeFlow()), "/no/such/card")


def test_a_card_for_another_model_family_or_range_is_refused(tmp_path):
    flow_card = write_card(tmp_path / "flow", "flow")
    with pytest.raises(NodeError) as e:
        CARD().load(fake_model(FakeDiscrete()), str(flow_card))
    assert str(e.value) == ("Fewstep Card: this card was learned on a flow-matching model ('gmm-flow'); the "
                            "connected model is a EPS model (σ ∈ [0.02917, 14.61])")
    edm_card = write_card(tmp_path / "edm", "edm")
    with pytest.raises(NodeError, match=r"^Fewstep Card: this card was learned on a diffusion \(EDM-frame\) model"):
        CARD().load(fake_model(FakeFlow()), str(edm_card))

    class Wide(FakeDiscrete):
        sigma_max = torch.tensor(10.0)

    with pytest.raises(NodeError, match=r"^Fewstep Card: its grid spans σ ∈ \[0.02917, 14.61\], outside the range"):
        CARD().load(fake_model(Wide()), str(edm_card))
    (tmp_path / "bad").mkdir()
    assert CARD.VALIDATE_INPUTS(str(tmp_path / "bad")).startswith("Fewstep Card: ")


def test_comfyuis_own_exceptions_pass_through_and_fewsteps_become_one_line():
    """An exception ComfyUI raises inside the model (its interrupt, out of memory) reaches ComfyUI as itself, not
    wrapped in fewstep's DenoiserError; a fewstep error in the run becomes the node's one-line error."""

    class InterruptProcessingException(Exception):
        pass

    class Model:
        inner_model = SimpleNamespace(model_sampling=FakeDiscrete())

        def __call__(self, x, sigma, **extra):
            raise InterruptProcessingException()

    sample = bridge.sampler_function("Fewstep Sampler", "euler", {"afs": False})
    sigmas = torch.tensor([14.6, 1.0, 0.0])
    with pytest.raises(InterruptProcessingException):
        sample(Model(), torch.zeros(2, 1, 8, 8), sigmas)
    Model.__call__ = lambda self, x, sigma, **extra: x[:1]  # a wrong shape: fewstep's DenoiserError
    with pytest.raises(NodeError, match=r"^Fewstep Sampler: denoiser returned shape \(1, 1, 8, 8\)"):
        sample(Model(), torch.zeros(2, 1, 8, 8), sigmas)
    with pytest.raises(NodeError, match=r"^Fewstep Sampler: .*must be strictly decreasing"):
        sample(Model(), torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 14.6, 0.0]))


def test_sigmas_from_the_models_own_range():
    flow, eps = fake_model(FakeFlow()), fake_model(FakeDiscrete())
    t_min = float(FakeFlow.sigmas[0])
    got = SIGMAS().get_sigmas(flow, "flow", 6, 1.0)[0]  # the model's own shift 3
    grid = fewstep.get_schedule("flow:shift=3", 6, t_min, 1.0)
    assert got.dtype == torch.float32 and torch.equal(got, torch.cat([grid, grid.new_zeros(1)]).float())
    assert float(got[0]) == 1.0 and abs(float(got[-2]) - t_min) < 1e-7
    assert torch.equal(SIGMAS().get_sigmas(flow, "flow", 6, 1.0, 0.0, "shift=1")[0][:-1],
                       fewstep.get_schedule("flow:shift=1", 6, t_min, 1.0).float())
    oss = SIGMAS().get_sigmas(flow, "oss", 10, 1.0)[0]
    assert torch.equal(oss[:-1], torch.tensor([0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512,
                                               0.2808]))
    poly = SIGMAS().get_sigmas(eps, "polynomial", 8, 1.0, 5.0)[0]
    assert torch.equal(poly[:-1], fewstep.get_schedule("polynomial", 8, *map(float, SD_RANGE), rho=5.0).float())
    half = SIGMAS().get_sigmas(eps, "logsnr", 4, 0.5)[0]  # denoise 0.5: the last 4 steps of 8, as BasicScheduler
    full = SIGMAS().get_sigmas(eps, "logsnr", 8, 1.0)[0]
    assert torch.equal(half, full[-5:]) and len(SIGMAS().get_sigmas(eps, "logsnr", 4, 0.0)[0]) == 0
    assert torch.equal(SIGMAS().get_sigmas(eps, "polynomial", 1, 1.0)[0], torch.tensor([SD_RANGE[1], 0.0]))
    disc = SIGMAS().get_sigmas(eps, "discrete", 5, 1.0)[0]
    assert abs(float(disc[0]) / SD_RANGE[1] - 1) < 1e-6 and abs(float(disc[-2]) / SD_RANGE[0] - 1) < 1e-6


def test_the_custom_node_file_loads_the_pack(tmp_path):
    path = install(tmp_path)
    spec = importlib.util.spec_from_file_location("fewstep_nodes", path)  # as ComfyUI loads custom_nodes/*.py
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert sorted(module.NODE_DISPLAY_NAME_MAPPINGS.values()) == ["Fewstep AMED", "Fewstep Card", "Fewstep Sampler",
                                                                  "Fewstep Sigmas"]


# ------------------------------------------------------------------------------ inside ComfyUI's own sampling code

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def models() -> dict[str, object]:
    from fewstep.comfyui.analytic import comfy_model

    return {"EPS": comfy_model(GMM, "EPS"), "V_PREDICTION": comfy_model(GMM, "V_PREDICTION"),
            "EDM": comfy_model(GMM, "EDM", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5),
            "FLOW": comfy_model(GMM_FLOW, "FLOW", shift=3.0), "FLUX": comfy_model(GMM_FLOW, "FLUX", shift=1.15)}


NOISE = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@needs_comfy
@pytest.mark.parametrize("kind", ["EPS", "FLOW"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "beta"])
def test_fewstep_euler_equals_comfyuis_euler(kind, scheduler):
    import comfy.samplers
    from fewstep.comfyui.analytic import ksample

    model = models()[kind]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 8)
    ours = ksample(SAMPLER().get_sampler("euler", 0, False)[0], model, sigmas, NOISE)
    theirs = ksample(comfy.samplers.ksampler("euler"), model, sigmas, NOISE)
    assert rel(ours, theirs) <= 1e-6


@needs_comfy
@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential"])
def test_fewstep_dpmpp_2m_equals_comfyuis_on_an_eps_model(scheduler):
    import comfy.samplers
    from fewstep.comfyui.analytic import ksample

    model = models()["EPS"]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 8)
    ours = ksample(SAMPLER().get_sampler("dpmpp", 2, False)[0], model, sigmas, NOISE)  # DPM-Solver++(2M)
    theirs = ksample(comfy.samplers.ksampler("dpmpp_2m"), model, sigmas, NOISE)
    assert rel(ours, theirs) <= 1e-6


@needs_comfy
@pytest.mark.parametrize("kind", ["EPS", "FLOW"])
def test_fewstep_gradient_estimation_and_kl_optimal_equal_comfyuis(kind):
    """ComfyUI's best pair on flow models (benchmarks/comfyui_bench.py): fewstep's gradient_estimation on the
    Fewstep Sigmas' kl_optimal is ComfyUI's sample_gradient_estimation on its kl_optimal scheduler."""
    import comfy.samplers
    from fewstep.comfyui.analytic import ksample

    model = models()[kind]
    theirs_sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "kl_optimal", 8)
    ours_sigmas = SIGMAS().get_sigmas(model, "kl_optimal", 8, 1.0)[0]
    assert rel(ours_sigmas, theirs_sigmas.float()) <= 1e-6
    theirs = ksample(comfy.samplers.ksampler("gradient_estimation"), model, theirs_sigmas, NOISE)
    ours = ksample(SAMPLER().get_sampler("gradient_estimation", 0, False)[0], model, theirs_sigmas, NOISE)
    assert rel(ours, theirs) <= 1e-6


@needs_comfy
@pytest.mark.parametrize("kind", ["EPS", "FLOW"])
def test_denoise_inpainting_mask_and_preview_callback_as_comfyui(kind):
    """img2img (sigmas cut by denoise = 0.6, not starting at σ_max / t = 1), a denoise mask and the preview
    callback: fewstep's Euler gives ComfyUI's Euler result and the same callbacks; every solver keeps the
    unmasked latent exactly and reports every step."""
    import comfy.samplers
    from fewstep.comfyui.analytic import ksample

    model = models()[kind]
    latent = GMM.sample(16, torch.Generator().manual_seed(1)).float()
    mask = torch.zeros_like(latent)
    mask[..., :4] = 1.0  # repaint the left half
    sigmas = SIGMAS().get_sigmas(model, "flow" if kind == "FLOW" else "polynomial", 6, 0.6)[0]
    assert float(sigmas[0]) < float(model.get_model_object("model_sampling").sigma_max) * 0.99
    seen: dict[str, list] = {"ours": [], "theirs": []}

    def record(key):
        return lambda step, x0, x, total: seen[key].append((step, x0.clone(), total))

    ours = ksample(SAMPLER().get_sampler("euler", 0, False)[0], model, sigmas, NOISE, latent, mask, record("ours"))
    theirs = ksample(comfy.samplers.ksampler("euler"), model, sigmas, NOISE, latent, mask, record("theirs"))
    assert rel(ours, theirs) <= 1e-6
    assert [s for s, _, _ in seen["ours"]] == [s for s, _, _ in seen["theirs"]] == list(range(6))
    assert all(rel(a[1], b[1]) <= 1e-6 and a[2] == b[2] == 6 for a, b in zip(seen["ours"], seen["theirs"]))
    for solver, afs in [("unipc", False), ("ipndm", True), ("heun", False), ("dpmpp", True)]:
        steps = []
        out = ksample(SAMPLER().get_sampler(solver, 0, afs)[0], model, sigmas, NOISE, latent, mask,
                      lambda step, x0, x, total: steps.append(step))
        assert torch.equal(out[mask == 0], latent[mask == 0]) and steps == list(range(6)), solver
        assert torch.isfinite(out).all()


@needs_comfy
@pytest.mark.parametrize("kind", ["EPS", "V_PREDICTION", "EDM", "FLOW", "FLUX"])
def test_every_model_family_runs_in_its_frame(kind):
    """Through KSAMPLER and the family's model_sampling conversions, fewstep's DPM-Solver++(3M) + AFS on its
    Sigmas equals the same run on the bare denoiser (EDM frame for EPS / V / EDM, flow frame for CONST)."""
    from fewstep.comfyui.analytic import ksample

    model = models()[kind]
    flow = kind in ("FLOW", "FLUX")
    sigmas = SIGMAS().get_sigmas(model, "flow" if flow else "logsnr", 7, 1.0)[0]
    ours = ksample(SAMPLER().get_sampler("dpmpp", 3, True)[0], model, sigmas, NOISE)
    ms = model.get_model_object("model_sampling")
    x = ms.noise_scaling(sigmas[0], NOISE.clone(), torch.zeros_like(NOISE), max_denoise=True)
    direct = run_solver("dpmpp", GMM_FLOW if flow else GMM, x, sigmas, disable=True, flow=flow, afs=True,
                        max_order=3)
    assert rel(ours, direct) <= 1e-5


@needs_comfy
def test_card_node_runs_the_card_and_checks_the_latent(tmp_path):
    from fewstep.comfyui.analytic import ksample

    model = models()["FLOW"]
    folder = write_card(tmp_path / "card", "flow", n=6)
    sampler, sigmas = CARD().load(model, str(folder))
    grid = fewstep.get_schedule("flow:shift=3", 6, 1e-3, 1.0)
    assert torch.equal(sigmas, torch.cat([grid, grid.new_zeros(1)]).float())
    out = ksample(sampler, model, sigmas, NOISE)
    assert rel(out, fewstep.sample(GMM_FLOW, NOISE.double(), "ipndm", grid)) <= 1e-5
    with pytest.raises(NodeError, match=r"^Fewstep Card: made for latents of shape \(1, 8, 8\), got \(1, 4, 4\)$"):
        ksample(sampler, model, sigmas, NOISE[..., :4, :4])
    with pytest.raises(NodeError, match=r"^Fewstep Card: made for a flow-matching \(CONST\) model, but the sampled "
                                        r"model is a EPS model"):
        ksample(sampler, models()["EPS"], sigmas, NOISE)
    with pytest.raises(NodeError, match=r"^Fewstep Card: this card runs on its own 6-point grid"):
        ksample(sampler, model, sigmas[2:], NOISE)


@needs_comfy
def test_amed_node_runs_the_checkpoint(tmp_path):
    from fewstep.amed.checkpoint import SamplingSettings, save_checkpoint
    from fewstep.amed.predictor import AMEDPredictor
    from fewstep.comfyui.analytic import ksample

    torch.manual_seed(0)
    predictor = AMEDPredictor(scale_dir=0.05, scale_time=0.1)
    settings = SamplingSettings("gmm-sd", [1, 8, 8], 4, "ipndm", {"max_order": 3}, "polynomial", 7.0, *SD_RANGE,
                                afs=True, scale_dir=0.05, scale_time=0.1, teacher="heun", M=1)
    save_checkpoint(tmp_path / "amed", predictor, settings)
    model = models()["EPS"]
    sampler, sigmas = AMED().load(model, str(tmp_path / "amed"))
    out = ksample(sampler, model, sigmas, NOISE)
    x = NOISE * (1 + sigmas[0] ** 2) ** 0.5  # ComfyUI's EPS noise scaling at σ_max
    direct = run_solver(settings.solver(predictor.eval()), GMM, x, sigmas, disable=True, afs=True)
    assert rel(out, direct) <= 1e-5
    with pytest.raises(NodeError, match=r"^Fewstep AMED: this predictor was trained on a diffusion \(EDM-frame\) "
                                        r"model \('gmm-sd'\); the connected model is"):
        AMED().load(models()["FLOW"], str(tmp_path / "amed"))
    with pytest.raises(NodeError, match=r"^Fewstep AMED: the model has no module 'diffusion_model.middle_block'"):
        AMED().load(model, str(tmp_path / "amed"), "diffusion_model.middle_block")


@needs_comfy
def test_comfyuis_entry_point_loader_finds_the_nodes():
    """The pip-installable ComfyUI loads `comfyui.custom_nodes` entry points with this function."""
    package = pytest.importorskip("comfy.nodes.package", reason="this ComfyUI has no entry-point node loader")
    import fewstep.comfyui

    exported = package._import_and_enumerate_nodes_in_module(fewstep.comfyui)
    assert set(exported.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    from importlib.metadata import entry_points

    found = [e for e in entry_points().select(group="comfyui.custom_nodes") if e.name == "fewstep"]
    if found:  # the installed metadata has the entry point (installed after it was added)
        assert found[0].load() is fewstep.comfyui
