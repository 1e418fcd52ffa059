"""torchrun: `torchrun --nproc_per_node=2 -m fewstep sample|train` on CPU (gloo) gives the files of a
single-process run — bit for bit for sampling, within float tolerance for training (the gradient sum over ranks
is reassociated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.amed.predictor import AMEDPredictor
from fewstep.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> None:
    env = {**os.environ, "FEWSTEP_THREADS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fewstep", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_torchrun_sample_matches_single_process(tmp_path):
    args = ["sample", "--model", "gmm", "--solver", "ipndm", "--nfe", "5", "--seeds", "0-7", "--batch", "3",
            "--no-progress"]
    torchrun([*args, "--out", "multi", "--npz", "multi.npz", "--grid", "multi.png"], tmp_path)
    assert main([*args, "--out", str(tmp_path / "single"), "--npz", str(tmp_path / "single.npz"),
                 "--grid", str(tmp_path / "single.png")]) == 0
    multi, single = files(tmp_path / "multi"), files(tmp_path / "single")
    assert sorted(single) == [f"{s:06d}.png" for s in range(8)] + ["manifest.json"]
    assert multi == single  # every PNG, bit for bit, and the same manifest
    assert (tmp_path / "multi.png").read_bytes() == (tmp_path / "single.png").read_bytes()
    a, b = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["seeds"], b["seeds"])
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("extra", [[], ["--pool", "12"]], ids=["fresh-noise", "pool"])
def test_torchrun_train_matches_single_process(tmp_path, extra):
    # 4 iterations of batch 8 (pool 12: batches of 8 indices into 12 teacher runs, odd shares across ranks)
    args = ["train", "--model", "gmm", "--batch", "8", "--kimg", "0.032", "--afs", "--no-progress", *extra]
    torchrun([*args, "--out", "multi"], tmp_path)
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    multi = torch.load(tmp_path / "multi" / "train_state.pt", weights_only=False)
    single = torch.load(tmp_path / "single" / "train_state.pt", weights_only=False)
    assert multi["iteration"] == single["iteration"] == 4
    np.testing.assert_allclose(multi["history"], single["history"], rtol=1e-6)
    # Two ranks sum each float32 gradient in another order than one process: every gradient entry moves by a few
    # ulps of its largest term (ε = 6e-8), not of itself, and Adam divides each entry by its own RMS, so an entry
    # whose terms nearly cancel can take a step that differs by O(1) relative (one weight of 8 192 differs by
    # 1.5e-4 relative on AVX-512). Compared over a whole tensor, the two runs' updates agree to ~1e-5 of the
    # distance training moved the predictor (measured ≤ 9e-6 on the default, AVX2 and AVX-512 kernels); a
    # sharding bug (a rank's share dropped, doubled or on the wrong seeds) changes the update at O(1).
    torch.manual_seed(0)  # the initial predictor, as `train` builds it for --seed 0
    initial = AMEDPredictor(scale_dir=0.01).state_dict()
    for key, value in single["predictor"].items():
        moved = (value - initial[key]).norm()
        assert (multi["predictor"][key] - value).norm() <= 1e-4 * moved, key
    # Adam's step is invariant to a common scale of all gradients, so a sum over the ranks where a mean is due
    # (2× here) would not show in the weights: it shows in the first moment, a running mean of the gradients,
    # which the reordered float32 sums change by ~1e-7 of its norm (measured ≤ 8e-7).
    for m, s in zip(multi["optimizer"]["state"].values(), single["optimizer"]["state"].values(), strict=True):
        assert (m["exp_avg"] - s["exp_avg"]).norm() <= 1e-5 * s["exp_avg"].norm()
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())


def test_torchrun_learn_matches_single_process(tmp_path, monkeypatch):
    """Teacher pairs sharded across 2 ranks and gathered, gradients summed: the same card as one process."""
    args = ["learn", "--model", "gmm", "--base", "dpmpp", "--nfe", "3", "--afs", "--iters", "6", "--pairs", "10",
            "--val-pairs", "6", "--batch", "5", "--teacher-steps", "40", "--no-progress"]
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache-multi"))  # the ranks compute their own shards
    torchrun([*args, "--out", "multi"], tmp_path)
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache-single"))
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    multi = json.loads((tmp_path / "multi" / "card.json").read_text())
    single = json.loads((tmp_path / "single" / "card.json").read_text())
    for key in ("sigmas", "offsets", "coeffs"):
        np.testing.assert_allclose(np.array(multi[key]), np.array(single[key]), rtol=1e-6, atol=1e-9)
    assert multi["training"]["val_rmse"] == pytest.approx(single["training"]["val_rmse"], rel=1e-6)
