"""One method resolver: a spec string → solver, grid, AFS, NFE, the same for sample, bench, the demo and the
integrations."""

from __future__ import annotations

import json

import pytest
import torch

import fewstep
from fewstep.amed.solver import AMEDPlugin
from fewstep.amed.train import TrainConfig, train
from fewstep.cli import main
from fewstep.learned import Card, LearnedSolver, save_card
from fewstep.methods import SolverSpec, UnreachableNFE, resolve_method
from fewstep.models import load_model
from fewstep.noise import seeded_noise

GMM = load_model("gmm")


def _card(folder) -> None:
    grid = fewstep.get_schedule("logsnr", 5, GMM.sigma_min, GMM.sigma_max).tolist()
    ident = {"name": "gmm", "shape": list(GMM.shape), "fingerprint": GMM.fingerprint}
    save_card(folder, Card(base="dpmpp", base_options={}, afs=True, sigmas=grid, offsets=[0.0] * 4, model=ident,
                           params=["steps"]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("amed") / "p"
    cfg = TrainConfig(student="ipndm", student_options={"max_order": 3}, teacher="heun", M=1, num_steps=4,
                      afs=True, schedule="polynomial", rho=7.0, batch=8, kimg=0.016)
    train(GMM, cfg, out=out, progress=False)
    return out


def test_spec_grammar():
    spec = SolverSpec.parse("dpmpp:max_order=2@logsnr+afs")
    assert (spec.solver, spec.options, spec.schedule, spec.rho, spec.afs) == ("dpmpp", {"max_order": 2}, "logsnr",
                                                                             None, True)
    assert SolverSpec.parse("deis@time_uniform:2") == SolverSpec("deis", {}, "time_uniform", 2.0)
    assert SolverSpec.parse("ipndm").afs is None and SolverSpec.parse("ipndm").schedule == "polynomial"
    assert SolverSpec.parse("learned:runs/card") == SolverSpec("learned", path="runs/card")
    assert SolverSpec.parse("amed:runs/p") == SolverSpec("amed", path="runs/p")
    assert SolverSpec.parse("amed:r=0.3").options == {"r": 0.3}  # AMED-Solver with an option, not a folder
    for bad in ("learned:", "amed: ", "nope", "ipndm:max_order=9", "ipndm@polynomial:-1"):
        with pytest.raises(fewstep.SolverError):
            SolverSpec.parse(bad)


def test_classic_method_is_what_sample_runs():
    method = resolve_method("ipndm:max_order=3@polynomial:5+afs", GMM, nfe=4)
    assert method.afs and method.nfe == 4 and method.num_steps == 6 and method.label == "ipndm(max_order=3)"
    assert method.schedule == {"name": "polynomial", "rho": 5.0} and method.schedule_label == "polynomial(rho=5)"
    assert torch.equal(method.grid, fewstep.get_schedule("polynomial", 6, GMM.sigma_min, GMM.sigma_max, rho=5.0))
    assert method.manifest_solver() == ("ipndm", {"max_order": 3})
    assert resolve_method("heun", GMM, nfe=5, afs=True).num_steps == 4  # the caller's AFS without '+afs'
    with pytest.raises(UnreachableNFE, match="try --afs"):
        resolve_method("heun", GMM, nfe=5)


def test_artifacts_bring_their_grid_afs_and_nfe(tmp_path, checkpoint):
    _card(tmp_path / "card")
    card = resolve_method(f"learned:{tmp_path / 'card'}", GMM)
    assert isinstance(card.solver, LearnedSolver) and card.afs and card.nfe == 3 and card.schedule_label == "learned"
    assert card.manifest_solver() == ("learned", {}) and "fingerprint" in card.record["card"]
    with pytest.raises(fewstep.FewstepError, match="NFE 3"):
        resolve_method(f"learned:{tmp_path / 'card'}", GMM, nfe=5)
    amed = resolve_method(f"amed:{checkpoint}", GMM)
    assert isinstance(amed.solver, AMEDPlugin) and amed.afs and amed.nfe == 5 and amed.num_steps == 4
    assert amed.manifest_solver() == ("ipndm", {"max_order": 3}) and amed.label == "AMED-Plugin[ipndm(max_order=3)]"
    assert amed.record["predictor_path"] == str(checkpoint.resolve())


def test_sample_spec_and_flags_write_the_same_manifest(tmp_path):
    common = ["sample", "--model", "gmm", "--seeds", "0-1", "--nfe", "4", "--no-progress"]
    flags = ["--solver", "ipndm", "--opt", "max_order=3", "--schedule", "polynomial", "--rho", "5", "--afs"]
    assert main([*common, *flags, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--solver", "ipndm:max_order=3@polynomial:5+afs", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a == b and a["afs"] and a["schedule"] == {"name": "polynomial", "rho": 5.0}
    assert (tmp_path / "a" / "000001.png").read_bytes() == (tmp_path / "b" / "000001.png").read_bytes()
    # a schedule or options given twice: refused before any work
    assert main([*common, "--solver", "ipndm@logsnr", "--schedule", "polynomial", "--out", str(tmp_path / "c")]) == 2
    assert main([*common, "--solver", "ipndm:max_order=2", "--opt", "max_order=3", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_sample_checkpoint_by_flag_or_spec(tmp_path, checkpoint):
    common = ["sample", "--model", "gmm", "--seeds", "0-1", "--no-progress"]
    assert main([*common, "--predictor", str(checkpoint), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--solver", f"amed:{checkpoint}", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a == b and a["solver"] == "ipndm" and "fingerprint" in a["predictor"]


def test_bench_takes_every_kind_of_spec(tmp_path, checkpoint):
    from fewstep.evaluation.bench import run_bench

    _card(tmp_path / "card")
    texts = ("heun", "heun+afs", f"learned:{tmp_path / 'card'}", f"amed:{checkpoint}")
    rows = run_bench(GMM, [SolverSpec.parse(s) for s in texts], [3, 4], n_samples=8, progress=False)
    got = [(r["solver"], r["nfe"], r["afs"]) for r in rows]  # heun: 2 calls per interval, 3 only with AFS
    assert got == [("heun", 4, False), ("heun", 3, True),
                   ("learned[dpmpp:steps]", 3, True), ("AMED-Plugin[ipndm(max_order=3)]", 5, True)]
    assert rows[2]["learned"] and rows[2]["card"] == str(tmp_path / "card") and rows[3]["predictor"] == str(checkpoint)


def test_kdiffusion_takes_a_spec():
    from fewstep.integrations.kdiffusion import run_solver

    sigmas = fewstep.get_schedule("polynomial", 5, GMM.sigma_min, GMM.sigma_max).float()
    x = seeded_noise(range(2), GMM.shape) * float(sigmas[0])
    model = lambda x, s: GMM.denoiser(x, s)  # noqa: E731
    want = run_solver("ipndm", model, x, sigmas, afs=True, max_order=3, disable=True)
    assert torch.equal(run_solver("ipndm:max_order=3+afs", model, x, sigmas, disable=True), want)
    with pytest.raises(fewstep.SolverError, match="sigmas"):
        run_solver("ipndm@logsnr", model, x, sigmas)


def test_scheduler_takes_a_spec():
    pytest.importorskip("diffusers")
    from fewstep.integrations.diffusers import FewstepScheduler

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    a = FewstepScheduler(**config, solver="dpmpp:max_order=2")
    b = FewstepScheduler(**config, solver="dpmpp", solver_options={"max_order": 2})
    a.set_timesteps(6)
    b.set_timesteps(6)
    assert a._algo.describe() == b._algo.describe() == "dpmpp(max_order=2)"
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.grid, b.grid)
    with pytest.raises(fewstep.SolverError, match="schedule="):
        FewstepScheduler(**config, solver="dpmpp@logsnr")
