"""Trajectory geometry (docs/maths.md §9): PCA of sampling trajectories, batching, the report and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.evaluation.analysis import (
    Geometry,
    analyze,
    auto_batch,
    directions_along,
    trajectory_geometry,
    write_report,
)
from fewstep.models import EmpiricalDenoiser, GaussianMixture, ModelInfo

ROOT = Path(__file__).resolve().parent.parent


def tiny_gmm() -> ModelInfo:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * 0.5
    return ModelInfo("tiny-gmm", GaussianMixture(means, torch.tensor([0.1, 0.2, 0.3])), (1, 4, 4), exact=True)


def reference_geometry(x: np.ndarray, k_max: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Relative reconstruction errors [N, K] and cumulative explained variance [K] by a plain numpy SVD."""
    mean = x.mean(0)
    u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    errs, ev = [], []
    for k in range(1, k_max + 1):
        rec = mean + (u[:, :k] * s[:k]) @ vt[:k]
        errs.append(np.linalg.norm(x - rec, axis=1) / np.linalg.norm(x, axis=1))
        ev.append((s[:k] ** 2).sum() / (s**2).sum())
    return np.stack(errs, 1), np.array(ev)


def test_geometry_matches_a_plain_svd():
    g = torch.Generator().manual_seed(1)
    traj = torch.randn(5, 12, 30, generator=g, dtype=torch.float64).cumsum(1)  # random walks: all directions
    before = traj.clone()
    geo = trajectory_geometry(traj)
    assert torch.equal(traj, before)  # the input is not modified
    for b in range(5):
        err, ev = reference_geometry(traj[b].numpy())
        np.testing.assert_allclose(geo.rel_error[b], err, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(geo.explained[b], ev, rtol=1e-10)
    assert geo.angle is None and geo.proj3.shape == (5, 12, 3)


def test_straight_line_has_one_component():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 1, 200, generator=g, dtype=torch.float64)
    s = torch.linspace(80, 0.002, 41, dtype=torch.float64)[:, None]
    traj = (a + s * b)[None]  # [1, 41, 200]: x_i = a + σ_i b
    geo = trajectory_geometry(traj, d=b.expand(40, 200)[None])
    assert geo.explained[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert geo.rel_error[0, :, 0].max() < 1e-12
    assert geo.line_dev_rel.max() < 1e-12
    assert geo.angle.max() < 1e-4  # d = b is parallel to x_i − x_end = (σ_i − σ_end) b


def test_planar_curve_needs_exactly_two_components():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(100, 2, generator=g, dtype=torch.float64))
    theta = torch.linspace(0, 2.5, 30, dtype=torch.float64)[:, None]
    traj = (3 + torch.cos(theta) * q[:, 0] + 0.5 * torch.sin(theta) * q[:, 1])[None]
    geo = trajectory_geometry(traj)
    assert geo.explained[0, 0] < 0.99
    assert geo.explained[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert geo.rel_error[0, :, 1].max() < 1e-12
    assert geo.line_dev_rel.max() > 0.05  # a curve is not a line


def test_delta_data_gives_straight_trajectories_through_the_sampler():
    """With a single data point D(x, σ) = y exactly, every probability-flow trajectory is a straight line to y."""
    y = torch.full((1, 1, 4, 4), 0.3, dtype=torch.float64)
    model = ModelInfo("delta", EmpiricalDenoiser(y), (1, 4, 4), exact=True)
    res = analyze(model, "heun", 11, n=4)
    assert res.geometry.explained[:, 0].min() == pytest.approx(1.0, abs=1e-10)
    assert res.geometry.angle.max() < 1e-3
    assert res.geometry.line_dev_rel.max() < 1e-8


def test_batching_gives_the_same_result_as_one_batch():
    model = tiny_gmm()
    whole = analyze(model, "heun", 9, n=7, batch=7)
    parts = analyze(model, "heun", 9, n=7, batch=3)
    for f in ("rel_error", "explained", "line_dev", "line_dev_rel", "angle", "proj3"):
        np.testing.assert_allclose(getattr(parts.geometry, f), getattr(whole.geometry, f), rtol=1e-10, atol=1e-12)
    assert parts.settings["batch"] == 3 and whole.settings["batch"] == 7


def test_directions_reuse_the_solvers_own_evaluations():
    model = tiny_gmm()
    calls = {"n": 0}

    def counting(x, sigma):
        calls["n"] += 1
        return model.denoiser(x, sigma)

    counted = ModelInfo("counted", counting, model.shape, exact=True)
    analyze(counted, "heun", 9, n=2)
    assert calls["n"] == 2 * 8  # Heun's own 2(N−1) calls; every trajectory point's D was recorded, none added
    # and the recorded values equal a fresh evaluation
    from fewstep.noise import seeded_noise
    from fewstep.schedules import get_schedule
    from fewstep.solvers import sample_with_directions

    sched = get_schedule("polynomial", 9)
    traj, reused = sample_with_directions(model.denoiser, seeded_noise([0, 1], model.shape), "heun", sched)
    fresh = directions_along(model.denoiser, traj[:-1], sched[:-1])
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


def test_multistep_solver_with_corrector_still_gets_directions():
    res = analyze(tiny_gmm(), "unipc", 7, n=3)  # UniPC's corrected states are not evaluated: D is recomputed
    assert res.geometry.angle.shape == (3, 6) and np.isfinite(res.geometry.angle).all()


def test_auto_batch_bounds_memory():
    assert auto_batch(1000, 41, 64) == 1000
    b = auto_batch(1000, 41, 32 * 32 * 3)
    assert 1 <= b < 1000 and b * 41 * 3072 * 8 <= 256 * 2**20


def test_geometry_concat_and_input_checks():
    g = torch.Generator().manual_seed(4)
    a = trajectory_geometry(torch.randn(2, 5, 8, generator=g))
    b = trajectory_geometry(torch.randn(3, 5, 8, generator=g))
    assert Geometry.concat([a, b]).rel_error.shape == (5, 5, 4)
    with pytest.raises(Exception, match="at least 2"):
        trajectory_geometry(torch.zeros(1, 1, 3))


def test_report_files(tmp_path):
    res = analyze(tiny_gmm(), "heun", 9, n=6)
    files = write_report(res, tmp_path)
    names = {f.name for f in files}
    assert {"summary.json", "per_trajectory.npz", "reconstruction_error.png", "explained_variance.png",
            "trajectories_3d.png", "line_geometry.png"} <= names
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 6 and summary["num_steps"] == 9 and summary["nfe"] == 16
    assert len(summary["relative_reconstruction_error"]["2"]["per_step_mean"]) == 9
    assert 0 < summary["explained_variance"]["2"]["mean"] <= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes left nothing behind


def test_cli_analyze_subprocess(tmp_path):
    prefix = ["-m", "fewstep"]
    out = tmp_path / "an"
    p = subprocess.run([sys.executable, *prefix, "analyze", "--model", "gmm", "--solver", "heun", "--num-steps", "9",
                        "--n", "5", "--batch", "2", "--out", str(out), "--no-progress", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads(p.stdout)
    assert summary["model"] == "gmm" and summary["n"] == 5 and summary["batch"] == 2
    assert json.loads((out / "summary.json").read_text())["explained_variance"] == summary["explained_variance"]
    assert (out / "trajectories_3d.png").stat().st_size > 1000


def test_cli_analyze_bad_input_exits_2(tmp_path, capsys):
    from fewstep.cli import main

    assert main(["analyze", "--model", "gmm", "--n", "0", "--out", str(tmp_path)]) == 2
    assert "--n must be" in capsys.readouterr().err
