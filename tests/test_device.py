"""`--device`: noise drawn on the CPU per seed and moved once, the model moved once, clear errors."""

from __future__ import annotations

import pytest
import torch

from fewstep.cli import main
from fewstep.device import resolve_device, to_device
from fewstep.errors import FewstepError
from fewstep.models import load_model
from fewstep.noise import seeded_noise


def test_noise_is_drawn_on_the_cpu_and_moved_once():
    cpu = seeded_noise([3, 7], (1, 8, 8))
    moved = seeded_noise([3, 7], (1, 8, 8), torch.float32, device="cpu")
    assert moved.device.type == "cpu" and torch.equal(moved, cpu.float())


def test_cpu_device_keeps_the_model_and_records_it():
    model = load_model("gmm")
    placed = to_device(model, "cpu")
    assert placed.device == "cpu" and placed.denoiser is model.denoiser
    assert to_device(model, None).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FewstepError, match="no CUDA GPU"):
        resolve_device("cuda")
    for argv in (["sample", "--model", "gmm", "--nfe", "3", "--seeds", "0", "--out", str(tmp_path / "s")],
                 ["bench", "--model", "gmm", "--nfe", "3", "--n", "2", "--solvers", "euler"],
                 ["train", "--model", "gmm", "--kimg", "0.01", "--out", str(tmp_path / "t")],
                 ["demo", "--model", "gmm", "--out", str(tmp_path / "d")]):
        assert main([*argv, "--device", "cuda", "--no-progress"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_unknown_device_is_a_clear_error():
    with pytest.raises(FewstepError, match="not a device"):
        resolve_device("gpu0")


def test_sample_runs_on_the_cpu_device(tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--model", "gmm", "--nfe", "3", "--seeds", "0-1", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert len(list(out.glob("*.png"))) == 2


def test_edm_denoiser_does_not_copy_inputs_already_on_its_device():
    from fewstep.integrations.edm import EDMDenoiser

    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, sigma, labels):
            seen.append((x, sigma))
            return x * 0

    x, sigma = torch.randn(2, 1, 4, 4), torch.full((2,), 3.0)
    den = EDMDenoiser(Net()).to("cpu")
    out = den(x, sigma)
    assert seen[0][0] is x and seen[0][1] is sigma and out.dtype == x.dtype
