"""AMED: predictor, the one plugin mechanism, AMED-Solver, training, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fewstep
from fewstep.amed.checkpoint import CheckpointError, load_checkpoint, sample_checkpoint, save_checkpoint
from fewstep.amed.predictor import AMEDPredictor, Control
from fewstep.amed.solver import AMEDPlugin
from fewstep.amed.train import TrainConfig, train
from fewstep.models import load_model
from fewstep.solvers import Evaluator, get_solver, integrate
from fewstep.solvers.base import midpoint_sigma

GMM = load_model("gmm")
NOISE = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


class fixed_controller:  # noqa: N801  (reads as the call it replaces)
    """A predictor choosing the same (r, c, a) for every interval and sample."""

    feature_dim = 64

    def __init__(self, r: float, c: float = 1.0, a: float = 1.0):
        self.r, self.c, self.a = r, c, a

    def control(self, features, t_cur, t_next):
        one = torch.ones(features.shape[0], dtype=torch.float64)
        return Control(one * self.r, one * self.c, one * self.a)


def run(solver: str, sigmas: torch.Tensor, controller=None, afs: bool = False, **options) -> tuple[torch.Tensor, int]:
    ev = Evaluator(GMM.denoiser)
    algo = get_solver(solver, **options)
    if controller is not None:
        algo = AMEDPlugin(algo, controller)
    x = integrate(algo, ev, NOISE * float(sigmas[0]), sigmas, afs=afs)
    return x, ev.calls


def test_predictor_size_and_ranges():
    p = AMEDPredictor(scale_dir=0.05, scale_time=0.2)
    assert 8_500 <= sum(v.numel() for v in p.parameters()) <= 9_500  # ≈ 9k parameters (docs/maths.md §8)
    with torch.no_grad():
        for w in p.parameters():
            w.normal_(0, 5.0)  # drive the heads towards saturation
    out = p(torch.randn(256, 64) * 10, torch.full((1,), 80.0), torch.full((1,), 5.0))
    assert ((out.r > 0) & (out.r < 1)).all()
    assert ((out.c >= 0.95) & (out.c <= 1.05)).all() and out.c.std() > 0
    assert ((out.a >= 0.8) & (out.a <= 1.2)).all() and out.a.std() > 0
    plain = AMEDPredictor(scale_dir=0.0, scale_time=0.0)
    out = plain(torch.randn(4, 64), torch.full((1,), 1.0), torch.full((1,), 0.5))
    assert plain.head_c is None and plain.head_a is None
    assert (out.c == 1).all() and (out.a == 1).all()


@pytest.mark.parametrize("solver, options", [
    ("euler", {}), ("ipndm", {"max_order": 4}), ("ipndm_v", {"max_order": 3}), ("deis", {"max_order": 3}),
    ("deis", {"deis_mode": "rhoab"}), ("dpmpp", {"max_order": 3}), ("dpmpp", {"predict_x0": False}),
    ("unipc", {"max_order": 3}), ("unipc", {"variant": "bh1", "max_order": 2}),
])
@pytest.mark.parametrize("afs", [False, True])
def test_plugin_with_fixed_r_equals_base_on_interleaved_grid(solver, options, afs):
    sigmas = fewstep.get_schedule("polynomial", 5)
    r = 0.37
    inter = [sigmas[0]]
    for i in range(len(sigmas) - 1):
        inter += [midpoint_sigma(sigmas[i], sigmas[i + 1], r), sigmas[i + 1]]
    base, base_calls = run(solver, torch.stack(inter), afs=afs, **options)
    plug, plug_calls = run(solver, sigmas, fixed_controller(r), afs=afs, **options)
    torch.testing.assert_close(plug, base, rtol=1e-12, atol=1e-12)
    assert plug_calls == base_calls == fewstep.nfe(solver, 5, afs=afs, amed=True, **options)


def test_plugin_scale_changes_only_the_second_update():
    sigmas = fewstep.get_schedule("polynomial", 4)
    x1, _ = run("euler", sigmas, fixed_controller(0.5, c=1.0))
    x2, _ = run("euler", sigmas, fixed_controller(0.5, c=1.02))
    x3, _ = run("euler", sigmas, fixed_controller(0.5, a=1.1))
    assert (x1 - x2).abs().max() > 1e-4 and (x1 - x3).abs().max() > 1e-4


def test_amed_solver_at_half_equals_dpm2():
    sigmas = fewstep.get_schedule("time_uniform", 5)
    amed, calls = run("amed", sigmas, fixed_controller(0.5))
    dpm2, _ = run("dpm2", sigmas, r=0.5)
    torch.testing.assert_close(amed, dpm2, rtol=1e-13, atol=1e-13)
    assert calls == fewstep.nfe("amed", 5) == 8
    plug, _ = run("dpm2", sigmas, fixed_controller(0.3))  # dpm2's plugin sets its ratio r
    torch.testing.assert_close(plug, run("dpm2", sigmas, r=0.3)[0], rtol=1e-13, atol=1e-13)


def test_predictor_adds_no_nfe_and_heun_has_no_plugin():
    p = AMEDPredictor(0.01, 0.2)
    calls = []

    def counting(x, s):
        calls.append(1)
        return GMM.denoiser(x, s)

    for solver in ("amed", "euler", "ipndm", "unipc", "dpm2"):
        calls.clear()
        fewstep.sample(counting, NOISE, solver, fewstep.get_schedule("polynomial", 4), afs=True, predictor=p)
        assert len(calls) == fewstep.nfe(solver, 4, afs=True, amed=True) == 5
    with pytest.raises(fewstep.SolverError, match="heun"):
        fewstep.nfe("heun", 4, amed=True)
    with pytest.raises(fewstep.SolverError, match="heun"):
        fewstep.sample(GMM.denoiser, NOISE, "heun", fewstep.get_schedule("polynomial", 4), predictor=p)


@pytest.mark.parametrize("solver, options", [("ipndm", {"max_order": 3}), ("unipc", {}), ("amed", {})])
def test_plugin_is_a_solver_and_the_old_keywords_still_work(solver, options):
    """`AMEDPlugin(base, predictor)` goes to `sample` like any solver; `predictor=` with the base's name gives the
    same samples bit for bit, with a DeprecationWarning (for one release)."""
    torch.manual_seed(1)
    p = AMEDPredictor(0.1, 0.2)
    sched = fewstep.get_schedule("polynomial", 5)
    plugin = AMEDPlugin(get_solver(solver, **options), p)
    with torch.no_grad():
        x = fewstep.sample(GMM.denoiser, NOISE, plugin, sched, afs=True)
    with pytest.warns(DeprecationWarning, match="AMEDPlugin"):
        old = fewstep.sample(GMM.denoiser, NOISE, solver, sched, afs=True, predictor=p, **options)
    assert torch.equal(x, old)
    assert fewstep.nfe(plugin, 5, afs=True) == 7
    base = get_solver(solver, **options).describe()
    assert plugin.describe() == ("AMED-Solver" if solver == "amed" else f"AMED-Plugin[{base}]")


def test_plugin_refuses_bases_it_cannot_wrap():
    with pytest.raises(fewstep.SolverError, match="heun has no AMED-Plugin"):
        AMEDPlugin(get_solver("heun"), AMEDPredictor())
    from fewstep.learned import LearnedSolver

    card = LearnedSolver("euler", {}, fewstep.get_schedule("polynomial", 4), afs=False)
    with pytest.raises(fewstep.SolverError, match="card:DIR"):
        AMEDPlugin(card, AMEDPredictor())
    with pytest.raises(fewstep.SolverError, match="no predictor"):
        fewstep.sample(GMM.denoiser, NOISE, AMEDPlugin(get_solver("euler")), fewstep.get_schedule("polynomial", 4))


def small_config(**kw) -> TrainConfig:
    base = dict(student="ipndm", student_options={"max_order": 3}, teacher="heun", M=3, num_steps=4, afs=True,
                schedule="polynomial", rho=7.0, scale_dir=0.05, scale_time=0.2, batch=64, kimg=64 * 40 / 1000,
                loss="step+e2e")
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_loss_and_error(tmp_path):
    cfg = small_config()
    predictor, settings, stats = train(GMM, cfg, out=tmp_path / "p", progress=False)
    curve = stats["loss_curve"]
    assert stats["iterations"] == 40
    assert sum(curve[-5:]) / 5 < 0.8 * curve[0], curve  # a real margin, not noise
    # and on evaluation seeds disjoint from training: better than the untrained predictor
    from fewstep.reference import reference_solution, rmse
    from fewstep.noise import seeded_noise

    seeds = list(range(64))
    ref, z = reference_solution(GMM, seeds), seeded_noise(seeds, GMM.shape)
    trained = rmse(sample_checkpoint(GMM, z, predictor, settings), ref)
    fresh = rmse(sample_checkpoint(GMM, z, AMEDPredictor(0.05, 0.2), settings), ref)
    assert trained < 0.8 * fresh, (trained, fresh)


def test_training_resumes_to_the_same_predictor(tmp_path):
    full, _, _ = train(GMM, small_config(kimg=64 * 6 / 1000), out=tmp_path / "a", progress=False)
    train(GMM, small_config(kimg=64 * 3 / 1000), out=tmp_path / "b", progress=False)
    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)
    state["config"]["kimg"] = 64 * 6 / 1000  # continue the same run to 6 iterations
    torch.save(state, tmp_path / "b" / "train_state.pt")
    resumed, _, _ = train(GMM, small_config(kimg=64 * 6 / 1000), out=tmp_path / "b", progress=False)
    for (k, v), (_, w) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-7, msg=k)


def test_checkpoint_round_trip_and_errors(tmp_path):
    predictor, settings, _ = train(GMM, small_config(kimg=0.064), progress=False)
    save_checkpoint(tmp_path / "ck", predictor, settings)
    loaded, s2 = load_checkpoint(tmp_path / "ck", GMM)
    for (k, v), (_, w) in zip(predictor.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(v, w), k
    assert s2 == settings
    again = sample_checkpoint(GMM, NOISE, loaded, s2)
    torch.testing.assert_close(again, sample_checkpoint(GMM, NOISE, predictor, settings), rtol=0, atol=0)
    assert not list((tmp_path / "ck").glob("*.tmp"))
    with pytest.raises(CheckpointError, match="trained for model 'gmm'"):
        load_checkpoint(tmp_path / "ck", load_model("digits-opt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "ck" / "predictor.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "amed.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "amed.json").unlink()
    with pytest.raises(CheckpointError, match="amed.json is missing"):
        load_checkpoint(tmp_path / "ck")


def test_checkpoint_plugin_keeps_its_trained_steps_when_a_final_denoise_follows():
    """A trailing 0 (k-diffusion, ComfyUI's AMED node) adds the final call and nothing else: DPM-Solver++'s
    lower_order_final would otherwise raise the order of the last steps the predictor was trained with (EDM: no
    final denoise)."""
    predictor, settings, _ = train(GMM, small_config(kimg=0.064, student="dpmpp", student_options={}),
                                   progress=False)
    plugin, grid = settings.solver(predictor), settings.schedule_tensor()
    with torch.no_grad():
        trained = fewstep.sample(GMM.denoiser, NOISE, plugin, grid, afs=settings.afs)
        ref = GMM.denoiser(trained, torch.full((len(NOISE),), float(grid[-1]), dtype=trained.dtype))
        ours = fewstep.sample(GMM.denoiser, NOISE, plugin, grid, afs=settings.afs, denoise_to_zero=True)
        free = fewstep.sample(GMM.denoiser, NOISE, AMEDPlugin(get_solver("dpmpp"), predictor), grid,
                              afs=settings.afs, denoise_to_zero=True)
    assert torch.equal(ours, ref)
    assert (free - ref).abs().max() > 1e-6  # without the pin, the ending changes the steps


def test_cli_train_then_bench_and_sample(tmp_path):
    ck = tmp_path / "pred"
    cmd = [sys.executable, "-m", "fewstep"]
    subprocess.run([*cmd, "train", "--model", "gmm", "--student", "amed", "--teacher", "heun", "--num-steps", "3",
                    "--M", "1", "--afs", "--schedule", "time_uniform", "--rho", "1", "--batch", "32", "--kimg",
                    "0.064", "--out", str(ck), "--no-progress"], check=True, capture_output=True)
    settings = json.loads((ck / "amed.json").read_text())
    assert settings["student"] == "amed" and settings["num_steps"] == 3 and settings["afs"] is True
    out = subprocess.run([*cmd, "bench", "--model", "gmm", "--n", "32", "--nfe", "3", "--solvers", "ipndm",
                          "--predictor", str(ck), "--json", str(tmp_path / "b.json"), "--no-progress"],
                         check=True, capture_output=True, text=True)
    records = json.loads((tmp_path / "b.json").read_text())
    assert {r["solver"] for r in records} == {"ipndm", "AMED-Solver"}
    assert all(r["nfe"] == 3 for r in records) and "AMED-Solver" in out.stdout
    bad = subprocess.run([*cmd, "bench", "--model", "digits-opt", "--predictor", str(ck), "--no-progress"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "trained for model 'gmm'" in bad.stderr
    subprocess.run([*cmd, "sample", "--model", "gmm", "--predictor", str(ck), "--seeds", "0-3",
                    "--out", str(tmp_path / "s"), "--no-progress"], check=True, capture_output=True)
    assert len(list((tmp_path / "s").glob("*.png"))) == 4


def test_teacher_pool_cycles_through_every_trajectory_each_epoch():
    from fewstep.training import epoch_batch

    cfg = small_config(pool=96, batch=32)
    order = lambda it: epoch_batch(cfg.pool, cfg.batch, cfg.seed, it)  # the pool's order in `train`
    for epoch in range(2):
        seen = torch.cat([order(epoch * 3 + k) for k in range(3)])
        assert sorted(seen.tolist()) == list(range(96))
    assert not torch.equal(order(0), order(3))  # reshuffled per epoch
    _, _, stats = train(GMM, small_config(pool=128, batch=64, kimg=64 * 30 / 1000), progress=False)
    assert sum(stats["loss_curve"][-5:]) / 5 < 0.8 * stats["loss_curve"][0]


def test_predictor_for_other_weights_is_refused(tmp_path):
    import dataclasses

    predictor, settings, _ = train(GMM, small_config(kimg=0.064), progress=False)
    settings.model_fingerprint = "aaaa"
    other = dataclasses.replace(GMM, fingerprint="bbbb")
    with pytest.raises(CheckpointError, match="other weights"):
        sample_checkpoint(other, NOISE, predictor, settings)


def test_demo_train_command_writes_every_output(tmp_path):
    """`fewstep demo --train`: every predictor and card fitted from scratch (tiny settings)."""
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "fewstep", "demo", "--model", "gmm", "--n", "16", "--kimg", "0.064",
                          "--amed-nfe", "3", "--card-nfe", "3", "--card-iters", "5", "--train", "--out", str(out),
                          "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("table.md", "table.json", "error_vs_nfe.png", "samples_nfe5.png"):
        assert (out / name).stat().st_size > 0, name
    records = json.loads((out / "table.json").read_text())
    solvers = {r["solver"] for r in records}
    assert {"AMED-Solver", "AMED-Plugin[ipndm]", "AMED-Plugin[deis]", "deis +AFS", "unipc", "learned card"} <= solvers
    assert {r["nfe"] for r in records} == set(range(3, 11))
    assert [r["nfe"] for r in records if r["solver"] == "learned card"] == [3]  # fitted here, not shipped
    assert all(r.get("train_seconds") for r in records if r["solver"].startswith(("AMED", "learned")))
    assert "AMED-Plugin" in run.stdout and "learned live" not in run.stdout


def test_amed_solver_has_a_recommended_schedule_like_every_solver():
    from fewstep.evaluation.bench import SolverSpec
    from fewstep.solvers import SOLVERS

    for cls in SOLVERS.values():  # every registered solver declares a schedule that exists
        name, rho = cls.recommended_schedule
        assert len(fewstep.get_schedule(name, 4, rho=rho)) == 4
    spec = SolverSpec.parse("amed")
    assert (spec.schedule, spec.rho) == ("time_uniform", 1.0)
    x = fewstep.sample(GMM.denoiser, NOISE, "amed", num_steps=4)  # no schedule: the recommended one
    assert x.shape == NOISE.shape and torch.isfinite(x).all()
