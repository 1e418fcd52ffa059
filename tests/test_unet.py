"""The built-in `digits` U-Net, its training command and the shipped digit classifier."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.amed.features import BottleneckHook
from fewstep.errors import ModelError
from fewstep.models import load_classifier, load_model
from fewstep.models.unet import DEFAULT_CONFIG, DigitsUNet, edm_coefficients, load_unet, save_unet

TINY = {**DEFAULT_CONFIG, "channels": [8, 16], "emb_dim": 16, "num_freqs": 4, "groups": 4}


def tiny_net(seed: int = 0) -> DigitsUNet:
    torch.manual_seed(seed)
    net = DigitsUNet.from_config(TINY)
    for p in net.parameters():  # the zero-initialised output layers would hide errors: randomise everything
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_shape_and_dtype(dtype: torch.dtype) -> None:
    net = tiny_net()
    x = torch.randn(3, 1, 16, 16, dtype=dtype)
    out = net(x, torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64))
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert torch.allclose(net(x, 2.0), net(x, torch.full((3,), 2.0)).to(dtype))  # scalar σ broadcasts
    with pytest.raises(ModelError):
        net(x, torch.ones(2))


def test_default_architecture_shapes() -> None:
    net = DigitsUNet.from_config(DEFAULT_CONFIG)
    assert net.shape == (1, 16, 16)
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([0.1, 10.0]))
    assert out.shape == (2, 1, 16, 16)


def test_edm_coefficients_match_formula() -> None:
    for s in (0.002, 0.5, 3.0, 80.0):
        c_skip, c_out, c_in, c_noise = (float(c) for c in edm_coefficients(torch.tensor(s, dtype=torch.float64)))
        assert c_skip == pytest.approx(0.25 / (s * s + 0.25), rel=1e-12)
        assert c_out == pytest.approx(s * 0.5 / math.sqrt(s * s + 0.25), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(s * s + 0.25), rel=1e-12)
        assert c_noise == pytest.approx(math.log(s) / 4, rel=1e-12)
    c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor(0.5))
    assert float(c_skip) == pytest.approx(0.5) and float(c_in) == pytest.approx(math.sqrt(2))


def test_preconditioning_wraps_the_raw_network() -> None:
    """D = c_skip·x + c_out·F(c_in·x, c_noise), checked with a stand-in F whose output is known."""
    net = tiny_net()
    seen = {}

    def fake_raw(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return 2 * x_in + c_noise[:, None, None, None]

    net.raw = fake_raw  # type: ignore[method-assign]
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    sig = [0.3, 7.0]
    out = net(x, torch.tensor(sig))
    for i, s in enumerate(sig):
        c_skip, c_out, c_in = 0.25 / (s * s + 0.25), 0.5 * s / math.sqrt(s * s + 0.25), 1 / math.sqrt(s * s + 0.25)
        expect = c_skip * x[i] + c_out * (2 * c_in * x[i] + math.log(s) / 4)
        assert torch.allclose(out[i], expect, atol=1e-5)
        assert torch.allclose(seen["x_in"][i].double(), c_in * x[i], atol=1e-6)
        assert float(seen["c_noise"][i]) == pytest.approx(math.log(s) / 4, rel=1e-6)


def test_bottleneck_hook_captures_the_bottleneck_output() -> None:
    net = tiny_net()
    captured = []
    handle = net.bottleneck.register_forward_hook(lambda m, i, o: captured.append(o))
    hook = BottleneckHook(net.bottleneck)
    assert hook.latest is None
    x = torch.randn(5, 1, 16, 16)
    net(x, torch.full((5,), 1.5))
    assert hook.latest is not None and hook.latest.shape == (5, 16, 4, 4)
    assert torch.equal(hook.latest, captured[0])
    feats = hook.features(x, x)
    assert feats.shape == (5, 64) and torch.isfinite(feats).all()
    hook.remove()
    handle.remove()


def test_save_load_roundtrip(tmp_path) -> None:
    net = tiny_net()
    path = save_unet(tmp_path / "w.safetensors", net)
    loaded = load_unet(path)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded(x, torch.tensor([0.2, 3.0])), net(x, torch.tensor([0.2, 3.0])))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    xr = x.clone().requires_grad_(True)  # inputs stay differentiable (AMED backpropagates through D's input)
    loaded(xr, torch.tensor([0.2, 3.0])).sum().backward()
    assert xr.grad is not None


def test_loader_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_unet(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ModelError, match="corrupt"):
        load_unet(bad)
    good = save_unet(tmp_path / "good.safetensors", tiny_net())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="corrupt"):
        load_unet(truncated)
    # tensors of the wrong shapes for the architecture in the metadata
    wrong = save_unet(tmp_path / "wrong.safetensors", DigitsUNet({**TINY, "channels": [8, 24]}))
    from safetensors import safe_open

    with safe_open(str(wrong), framework="pt") as f:
        meta = f.metadata()
    meta["config"] = meta["config"].replace("24", "16")
    save_file(load_file(str(wrong)), str(wrong), metadata=meta)
    with pytest.raises(ModelError, match="do not match"):
        load_unet(wrong)
    with pytest.raises(ModelError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(ModelError, match="corrupt"):
        load_classifier(bad)


def _ckpt_states(path) -> dict:
    ck = torch.load(path / "checkpoint.pt", weights_only=False)
    return {"model": ck["model"], "ema": ck["ema"], "opt": ck["optimizer"]["state"], "it": ck["iteration"],
            "gen": ck["generator"]}


def _assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_tiny_training_resumes_identically(tmp_path) -> None:
    from fewstep.cli.train_models import add_commands
    from fewstep.models.train_unet import UNetTrainConfig, train_unet

    cfg = UNetTrainConfig(iters=3, batch=8, warmup=2, ckpt_every=1, arch=dict(TINY))
    info = train_unet(tmp_path / "a", cfg, progress=False)
    assert info["finished"] and info["iterations"] == 3 and math.isfinite(info["losses"][-1][1])
    part = train_unet(tmp_path / "b", cfg, progress=False, stop_after=2)  # "interrupted" after 2 iterations
    assert not part["finished"] and not (tmp_path / "b" / "digits_unet.safetensors").exists()
    train_unet(tmp_path / "b", cfg, progress=False)  # resumes at iteration 2
    _assert_same(_ckpt_states(tmp_path / "a"), _ckpt_states(tmp_path / "b"))
    wa = load_file(str(tmp_path / "a" / "digits_unet.safetensors"))
    wb = load_file(str(tmp_path / "b" / "digits_unet.safetensors"))
    _assert_same(wa, wb)
    load_unet(tmp_path / "a" / "digits_unet.safetensors")  # the export loads

    # the CLI command: extending a finished run by resuming with a larger --iters continues where it stopped
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-model", "--out", str(tmp_path / "c"), "--iters", "2", "--batch", "8",
                              "--warmup", "2", "--channels", "8,16", "--ckpt-every", "1", "--no-progress"])
    args.func(args)
    args.iters = 3
    args.func(args)
    c = _ckpt_states(tmp_path / "c")
    assert c["it"] == 3 and (tmp_path / "c" / "digits_unet.safetensors").exists()


def test_classifier_training_commands_write_loadable_weights(tmp_path, capsys) -> None:
    """`fewstep train-classifier` / `train-noisy-classifier` (a token run): weights that load, a .json card."""
    import json

    from fewstep.cli import main
    from fewstep.models.noisy_classifier import load_noisy_classifier

    assert main(["train-classifier", "--epochs", "1", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert main(["train-noisy-classifier", "--iters", "2", "--out", str(tmp_path / "n.safetensors")]) == 0
    load_classifier(tmp_path / "c.safetensors")
    load_noisy_classifier(tmp_path / "n.safetensors")
    assert json.loads((tmp_path / "n.json").read_text())["iterations"] == 2
    assert json.loads((tmp_path / "c.json").read_text())["training"]["epochs"] == 1
    assert '"iterations": 2' in capsys.readouterr().out


def test_shipped_classifier_accuracy() -> None:
    from fewstep.models.digits import digits_split

    clf = load_classifier()
    data = digits_split(clf.resolution)
    for split in ("held", "train"):  # held: its own training split; train: the diffusion split it never saw
        labels, _ = clf.predict(data[f"{split}_x"])
        assert float((labels == data[f"{split}_y"]).float().mean()) >= 0.9, split
    assert clf.penultimate(data["held_x"][:4]).shape == (4, 128)
    assert clf.predict(data["held_x"][:4, :, ::2, ::2])[0].shape == (4,)  # other sizes are resized


def test_builtin_digits_model() -> None:
    info = load_model("digits")
    net = info.denoiser
    assert info.shape == (1, 16, 16) and info.sigma_min == 0.002 and info.sigma_max == 80.0
    assert isinstance(net, DigitsUNet) and info.bottleneck is net.bottleneck
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    out = net(x, torch.tensor([80.0, 0.002], dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
