"""User models: `--model package.module:factory` and `path/file.py:factory` in every form a factory may return, the
CLI accepting them, and the EDM checkpoint factory. Needs no optional dependency (the diffusers and k-diffusion
integrations are in test_integrations.py)."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest
import torch

import fewstep
from fewstep.amed.predictor import AMEDPredictor
from fewstep.errors import ModelError
from fewstep.models import ModelInfo, load_model


FACTORY_MODULE = """
import torch
from fewstep.models import ModelInfo

class Shrink(torch.nn.Module):
    shape = (1, 4, 4)
    sigma_min, sigma_max = 0.01, 20.0
    def __init__(self):
        super().__init__()
        self.mid = torch.nn.Identity()
    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return self.mid(x / (1 + s**2))  # exact D for data N(0, I)

def as_info():
    return ModelInfo("shrink", Shrink(), (1, 4, 4), 0.01, 20.0)

def as_dict():
    net = Shrink()
    return {"denoiser": net, "shape": [1, 4, 4], "sigma_min": 0.01, "sigma_max": 20.0, "bottleneck": net.mid}

def as_callable():
    return Shrink()

def wrong_type():
    return 42

def bad_dict():
    return {"denoiser": Shrink()}

def raises():
    raise RuntimeError("no weights here")

NOT_A_FACTORY = 3
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch, request):
    name = f"user_models_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_model_factory(factory_module, tmp_path):
    for attr in ("as_info", "as_dict", "as_callable"):
        info = load_model(f"{factory_module}:{attr}")
        assert isinstance(info, ModelInfo) and info.shape == (1, 4, 4) and (info.sigma_min, info.sigma_max) == (
            0.01, 20.0)
    assert load_model(f"{factory_module}:as_dict").bottleneck is not None
    out = fewstep.sample(load_model(f"{factory_module}:as_callable").denoiser, torch.randn(2, 1, 4, 4), "dpmpp",
                         num_steps=4)
    assert out.shape == (2, 1, 4, 4)
    file_spec = f"{tmp_path / (factory_module + '.py')}:as_info"
    assert load_model(file_spec).name == "shrink"
    for spec, match in [(f"{factory_module}_missing:f", "cannot import"), (f"{factory_module}:nope", "no attribute"),
                        (f"{factory_module}:wrong_type", "expected a ModelInfo"), (f"{factory_module}:bad_dict",
                                                                                    "'denoiser' and 'shape'"),
                        (f"{factory_module}:raises", "no weights here"), (f"{factory_module}:NOT_A_FACTORY",
                                                                          "not a factory"),
                        ("nonexistent/file.py:f", "not found")]:
        with pytest.raises(ModelError, match=match):
            load_model(spec)


def test_cli_accepts_model_factory(factory_module, tmp_path, capsys):
    from fewstep.cli import build_parser, main

    args = build_parser().parse_args(["sample", "--model", f"{factory_module}:as_dict", "--out", "x"])
    assert args.model == f"{factory_module}:as_dict"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--model", "no-such-model", "--out", "x"])
    assert "package.module:factory" in capsys.readouterr().err
    assert main(["sample", "--model", f"{factory_module}:as_dict", "--nfe", "3", "--seeds", "0-1", "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    assert main(["sample", "--model", f"{factory_module}:nope", "--nfe", "3", "--out", str(tmp_path / "o2")]) == 2


EDM_NET = """
import torch

class TinyEDM(torch.nn.Module):  # an EDMPrecond look-alike: forward(x, sigma, class_labels) -> D
    img_resolution, img_channels, label_dim, sigma_min, sigma_max = 4, 1, 0, 0, float("inf")
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.enc = torch.nn.ModuleDict({"4x4_conv": torch.nn.Conv2d(1, 2, 1),
                                              "4x4_block0": torch.nn.Conv2d(2, 2, 1)})
    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        h = self.model.enc["4x4_block0"](self.model.enc["4x4_conv"](x / (1 + s**2).sqrt()))
        return x / (1 + s**2) + 0.01 * h.mean(1, keepdim=True)
"""


def test_edm_factory(tmp_path, monkeypatch):
    from fewstep.integrations import edm

    monkeypatch.setitem(sys.modules, "dnnlib", None)  # the EDM repository is not importable
    with pytest.raises(ModelError, match="dnnlib"):
        edm.load_edm(tmp_path / "x.pkl")
    for pkg in ("dnnlib", "torch_utils"):  # stand-ins for the EDM repository's packages
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        monkeypatch.delitem(sys.modules, pkg, raising=False)
    (tmp_path / "tiny_edm_net.py").write_text(textwrap.dedent(EDM_NET))
    monkeypatch.syspath_prepend(str(tmp_path))
    from tiny_edm_net import TinyEDM

    with open(tmp_path / "network-snapshot.pkl", "wb") as f:
        pickle.dump({"ema": TinyEDM()}, f)
    monkeypatch.setenv("FEWSTEP_EDM_PKL", str(tmp_path / "network-snapshot.pkl"))
    monkeypatch.setenv("FEWSTEP_EDM_DEVICE", "cpu")
    info = load_model("fewstep.integrations.edm:from_env")
    assert info.shape == (1, 4, 4) and (info.sigma_min, info.sigma_max) == (0.002, 80.0)
    assert info.bottleneck is info.denoiser.net.model.enc["4x4_block0"]
    torch.manual_seed(0)
    pred = AMEDPredictor()
    out = fewstep.sample(info.denoiser, torch.randn(2, 1, 4, 4), "ipndm", num_steps=4, predictor=pred,
                         bottleneck=info.bottleneck)
    assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()
    sys.modules.pop("tiny_edm_net", None)
