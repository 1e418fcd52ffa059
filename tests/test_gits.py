"""GITS (the exact DP, cost matrix, schedule files, CLI), Align-Your-Steps tables and the schedule bench."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fewstep
from fewstep import ScheduleError
from fewstep.ays import AYS_TABLES
from fewstep.evaluation.bench import SolverSpec, expand_schedules, run_bench
from fewstep.gits import GitsSearch, cost_sums, dp_path, path_cost, refine_schedule
from fewstep.models import load_model
from fewstep.schedules import load_schedule, read_schedule_file, save_schedule
from fewstep.solvers import SOLVERS

GMM = load_model("gmm")
SD_RANGE = (0.0291671582, 14.6146412293)


@pytest.fixture(scope="module")
def search() -> GitsSearch:
    return GitsSearch.run(GMM, grid=21, warmup=24, batch=8, progress=False)


@pytest.fixture()
def schedule_file(tmp_path, search):
    sigmas, path = search.schedule(6)
    return save_schedule(tmp_path / "gits.json", sigmas, search.metadata(6, 1.0, False, path, "ipndm", 5))


# --- the dynamic programme ------------------------------------------------------------------------------------


def brute_force(cost: torch.Tensor, k: int, gamma: float) -> float:
    n = cost.shape[0]
    return min(path_cost(cost, [0, *inner, n - 1], gamma) for inner in itertools.combinations(range(1, n - 1), k - 1))


@pytest.mark.parametrize("gamma", [0.8, 1.0, 1.15, 1.5])
@pytest.mark.parametrize("seed", range(4))
def test_dp_matches_brute_force(gamma, seed):
    n = 9
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for k in range(1, n):
        path, value = dp_path(cost, k, gamma)
        assert len(path) == k + 1 and path[0] == 0 and path[-1] == n - 1
        assert all(a < b for a, b in zip(path[:-1], path[1:]))
        assert value == pytest.approx(path_cost(cost, path, gamma), rel=1e-12)
        assert value == pytest.approx(brute_force(cost, k, gamma), rel=1e-12)


def test_dp_discount_weights_later_intervals():
    # two 2-interval paths through a 4-point grid: the discount decides which one is cheaper
    inf = math.inf
    cost = torch.tensor([[inf, 1.0, 2.0, inf], [inf, inf, inf, 2.0], [inf, inf, inf, 1.0], [inf] * 4])
    assert dp_path(cost, 2, 1.0)[0] in ([0, 1, 3], [0, 2, 3])  # a tie without discount
    assert dp_path(cost, 2, 1.5)[0] == [0, 2, 3]  # 2 + 1.5·1 < 1 + 1.5·2
    assert dp_path(cost, 2, 0.5)[0] == [0, 1, 3]  # 1 + 0.5·2 < 2 + 0.5·1


def test_dp_rejects_bad_input():
    cost = torch.rand(5, 5)
    with pytest.raises(fewstep.FewstepError, match="intervals"):
        dp_path(cost, 5)
    with pytest.raises(fewstep.FewstepError, match="gamma"):
        dp_path(cost, 2, gamma=0.0)


# --- the cost matrix ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "l1", "dev"])
def test_cost_matrix_matches_loop(metric):
    g = torch.Generator().manual_seed(0)
    n, b = 6, 5
    grid = fewstep.get_schedule("polynomial", n)
    traj = torch.randn(n, b, 1, 2, 3, generator=g, dtype=torch.float64)
    dirs = torch.randn(n - 1, b, 1, 2, 3, generator=g, dtype=torch.float64)
    fast = cost_sums(grid, traj, dirs, metric, budget=50)  # tiny budget: exercises the sample chunks
    x, d = traj.reshape(n, b, -1), dirs.reshape(n - 1, b, -1)

    def dev(y, s):
        u = (x[-1, s] - x[0, s]) / (x[-1, s] - x[0, s]).norm()
        r = y - x[-1, s]
        return (r - (r @ u) * u).norm()

    for i in range(n):
        for j in range(n):
            if i >= j:
                assert fast[i, j] == math.inf
                continue
            total = 0.0
            for s in range(b):
                pred = x[i, s] + (grid[j] - grid[i]) * d[i, s]
                if metric == "l2":
                    total += float((pred - x[j, s]).pow(2).mean().sqrt())
                elif metric == "l1":
                    total += float((pred - x[j, s]).abs().mean())
                else:
                    total += float((dev(pred, s) - dev(x[j, s], s)).abs()) / math.sqrt(6)
            assert float(fast[i, j]) == pytest.approx(total, rel=1e-10)


def test_search_directions_and_afs_row(search):
    assert search.cost.shape == (21, 21) and torch.isfinite(search.cost.triu(1)[search.cost.triu(1) != 0]).all()
    assert (search.cost_afs[1:] == search.cost[1:]).all()  # only the first jump sees AFS's direction
    # the captured teacher directions equal a recomputation (x − D)/σ
    from fewstep.gits import _teacher_run

    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    traj, dirs = _teacher_run(GMM, noise, search.grid, "ipndm", {})
    i = 7
    expect = (traj[i] - GMM.denoiser(traj[i], search.grid[i : i + 1].expand(3))) / float(search.grid[i])
    assert torch.allclose(dirs[i], expect, rtol=1e-12, atol=1e-12)
    calls = []
    counting = SimpleNamespace(denoiser=lambda x, s: calls.append(len(x)) or GMM.denoiser(x, s))
    _teacher_run(counting, noise, search.grid, "ipndm", {})
    assert len(calls) == len(search.grid) - 1  # directions captured from the teacher's own calls, no extra pass
    traj_h, dirs_h = _teacher_run(GMM, noise, search.grid, "heun", {})  # recomputed path
    expect = (traj_h[i] - GMM.denoiser(traj_h[i], search.grid[i : i + 1].expand(3))) / float(search.grid[i])
    assert torch.allclose(dirs_h[i], expect, rtol=1e-10, atol=1e-12)


def test_schedule_endpoints_and_afs_modes(search):
    for steps in (2, 4, 7):
        for afs, mode in [(False, "cost"), (True, "cost"), (True, "insert")]:
            sigmas, path = search.schedule(steps, afs=afs, afs_mode=mode)
            assert len(sigmas) == steps and len(path) == steps
            assert float(sigmas[0]) == GMM.sigma_max and float(sigmas[-1]) == GMM.sigma_min
            fewstep.check_schedule(sigmas)
    with pytest.raises(ScheduleError, match="finer"):
        search.schedule(22)


# --- schedule files -------------------------------------------------------------------------------------------


def test_schedule_file_round_trip(schedule_file, search):
    data = json.loads(schedule_file.read_text())
    for key in ("sigmas", "model", "nfe", "num_steps", "teacher", "grid", "warmup", "gamma", "metric", "seconds"):
        assert key in data, key
    assert data["model"] == "gmm" and data["num_steps"] == 6 and data["nfe"] == 5
    expect = search.schedule(6)[0]
    assert torch.equal(fewstep.get_schedule("gits", 6, path=schedule_file), expect)
    assert torch.equal(fewstep.get_schedule(f"gits:{schedule_file}", 6, GMM.sigma_min, GMM.sigma_max), expect)
    assert torch.equal(load_schedule(schedule_file, model=GMM), expect)
    assert torch.equal(read_schedule_file(schedule_file)[0], expect)


def write(tmp_path, content) -> str:
    p = tmp_path / "bad.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


@pytest.mark.parametrize("content, match", [
    ({"sigmas": [80.0, 10.0, 10.0, 0.002]}, "strictly decreasing"),
    ({"sigmas": [80.0, 1.0, 5.0, 0.002]}, "strictly decreasing"),
    ({"sigmas": [80.0, 1.0, -0.5]}, "positive"),
    ({"sigmas": [80.0, "x", 0.002]}, "list of numbers"),
    ({"schedule": [80.0, 0.002]}, "no \"sigmas\""),
    ('{"sigmas": [80.0, 1.0, 0.0', "not valid JSON"),
])
def test_bad_schedule_files(tmp_path, content, match):
    with pytest.raises(ScheduleError, match=match):
        fewstep.get_schedule("gits", path=write(tmp_path, content))


def test_schedule_file_wrong_length_and_range(tmp_path, schedule_file):
    with pytest.raises(ScheduleError, match=r"has 6 points, NFE 5 for ipndm, but num_steps=7"):
        fewstep.get_schedule(f"gits:{schedule_file}", 7)
    with pytest.raises(ScheduleError, match=r"spans σ ∈ \[0.002, 80\] \(made for model 'gmm'\), but the model's σ "):
        fewstep.get_schedule(f"gits:{schedule_file}", 6, *SD_RANGE)
    with pytest.raises(ScheduleError, match="not found"):
        fewstep.get_schedule("gits", 6, path=tmp_path / "missing.json")
    with pytest.raises(ScheduleError, match="needs its file"):
        fewstep.get_schedule("gits", 6)
    with pytest.raises(ScheduleError, match="takes no rho"):
        fewstep.get_schedule(f"gits:{schedule_file}", 6, rho=7.0)


def test_refine_schedule_reproduces_fine_polynomial():
    coarse = fewstep.get_schedule("polynomial", 5)
    assert torch.allclose(refine_schedule(coarse, 2), fewstep.get_schedule("polynomial", 13), rtol=1e-12)
    assert torch.equal(refine_schedule(coarse, 0), coarse)


# --- every solver on a GITS schedule, the bench, the CLI --------------------------------------------------------


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_runs_on_a_gits_schedule(solver, schedule_file):
    sigmas = fewstep.get_schedule(f"gits:{schedule_file}", 6, GMM.sigma_min, GMM.sigma_max)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for afs in (False, True):
        x = fewstep.sample(GMM.denoiser, noise, solver, sigmas, afs=afs)
        assert x.shape == noise.shape and torch.isfinite(x).all()
        assert x.abs().max() < 5  # lands near the data, which lie in about [−1, 1]


def test_bench_schedule_grid(tmp_path, monkeypatch, schedule_file, search):
    from fewstep import gits, reference
    from fewstep.evaluation import bench

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "reference_solution",  # a cheap reference: this test checks the plumbing only
                        lambda model, seeds, progress=False: reference.reference_solution(model, seeds, num_steps=40))
    monkeypatch.setitem(gits._SEARCHES, "gmm", search)  # the small search instead of a default warm-up
    spec = SolverSpec.parse(f"ipndm@gits:{schedule_file}")
    assert spec.schedule == f"gits:{schedule_file}" and spec.rho is None
    specs = expand_schedules([SolverSpec.parse("ipndm"), SolverSpec.parse("euler")],
                             ["polynomial", "logsnr", "time_uniform:2", "gits"])
    assert [(s.solver, s.schedule, s.rho) for s in specs[:4]] == [
        ("ipndm", "polynomial", 7.0), ("euler", "polynomial", 7.0), ("ipndm", "logsnr", None),
        ("euler", "logsnr", None)]
    with pytest.raises(fewstep.SolverError, match="unknown bench schedule"):
        expand_schedules(specs, ["nope"])
    records = run_bench(GMM, [*specs, spec], nfes=[5], n_samples=16, progress=False)
    cells = {(r["solver"], r["schedule"]) for r in records}
    assert len(cells) == 9 and all(math.isfinite(r["rmse"]) for r in records)


def test_cli_writes_a_usable_schedule(tmp_path, capsys):
    from fewstep.cli import gits as gits_cli

    parser = argparse.ArgumentParser()
    gits_cli.add_commands(parser.add_subparsers())
    out = tmp_path / "s.json"
    args = parser.parse_args(["gits", "--model", "gmm", "--nfe", "5", "--afs", "--grid", "21", "--warmup", "16",
                              "--gamma", "1.15", "--metric", "dev", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["num_steps"] == 7 and data["nfe"] == 5 and data["afs"] and data["metric"] == "dev"
    assert data["gamma"] == 1.15 and data["warmup"] == 16 and data["grid"]["points"] == 21
    assert len(fewstep.get_schedule(f"gits:{out}", 7, GMM.sigma_min, GMM.sigma_max)) == 7


# --- Align Your Steps -----------------------------------------------------------------------------------------


def comfy_loglinear(t_steps, num_steps):  # the reference implementation (numpy interp over reversed log σ)
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(np.asarray(t_steps)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num_steps), xs, ys))[::-1]


@pytest.mark.parametrize("table", ["sd15", "sdxl"])
@pytest.mark.parametrize("n", [2, 3, 5, 8, 11, 16, 50])
def test_ays_interpolation(table, n):
    t = fewstep.get_schedule("ays", n, *SD_RANGE, table=table)
    ref = AYS_TABLES[table]
    assert len(t) == n and float(t[0]) == ref[0] and float(t[-1]) == ref[-1]
    assert (t[1:] < t[:-1]).all()
    assert np.allclose(t.numpy(), comfy_loglinear(ref, n), rtol=1e-12)
    if n == 11:
        assert t.tolist() == list(ref)


def test_ays_table_choice_and_errors():
    sdxl_model = SimpleNamespace(ays_table="sdxl", sigma_min=SD_RANGE[0], sigma_max=SD_RANGE[1])
    assert torch.equal(fewstep.get_schedule("ays", 11, *SD_RANGE, model=sdxl_model),
                       torch.tensor(AYS_TABLES["sdxl"], dtype=torch.float64))
    assert torch.equal(fewstep.get_schedule("ays:SD1", 7, *SD_RANGE), fewstep.get_schedule("ays", 7, *SD_RANGE,
                                                                                            table="sd15"))
    with pytest.raises(ScheduleError, match="needs a table"):
        fewstep.get_schedule("ays", 10, *SD_RANGE)
    with pytest.raises(ScheduleError, match="unknown Align-Your-Steps table"):
        fewstep.get_schedule("ays:sd3", 10, *SD_RANGE)
    with pytest.raises(ScheduleError, match=r"spans σ ∈ \[0.0291672, 14.6146\] but the model's σ range is"):
        fewstep.get_schedule("ays:sd15", 10, GMM.sigma_min, GMM.sigma_max)
