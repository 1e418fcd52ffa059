"""Learned global solvers: zero corrections are the base solver, NFE is counted, cards round-trip and are
validated, training lowers the validation error, and a card works wherever a solver goes."""

import json
import math

import pytest
import torch

import fewstep
from fewstep.cli import main
from fewstep.learned import BASES, Card, CardError, LearnedSolver, load_card, load_solver, save_card
from fewstep.learned.train import CardParameters, LearnConfig, init_grid, learn, rollout
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.schedules import get_schedule
from fewstep.solvers import Evaluator, integrate

GMM = load_model("gmm")


def _card(base: str = "dpmpp", afs: bool = True, n: int = 5, **extra) -> Card:
    grid = get_schedule("logsnr", n + 1, GMM.sigma_min, GMM.sigma_max).tolist()
    ident = {"name": "gmm", "shape": list(GMM.shape), "fingerprint": GMM.fingerprint}
    return Card(base=base, base_options={}, afs=afs, sigmas=grid, offsets=[0.0] * n, model=ident, **extra)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("afs", [False, True])
def test_zero_corrections_are_the_base_solver_bit_exact(base, afs):
    n = 5
    zeros = [[0.0] * 3 for _ in range(n)]
    card = _card(base, afs, n, weights=zeros, coeffs=zeros, params=["steps", "offsets", "weights", "coeffs"])
    noise = seeded_noise(range(6), GMM.shape)
    got = fewstep.sample(GMM.denoiser, noise, card.solver())
    want = fewstep.sample(GMM.denoiser, noise, base, torch.tensor(card.sigmas, dtype=torch.float64), afs=afs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("base", BASES)
def test_trainable_zero_corrections_match_the_base_in_the_graph(base):
    """With every term in the autograd graph (training), zero corrections still give the base's result."""
    cfg = LearnConfig(base=base, nfe=4, afs=True, params=("offsets", "weights", "coeffs"))
    params = CardParameters(init_grid(GMM, cfg), cfg.params, 3, cfg.afs)
    noise = seeded_noise(range(4), GMM.shape)
    x = rollout(params, cfg, GMM.denoiser, noise, torch.float64)
    want = fewstep.sample(GMM.denoiser, noise, base, params.grid().detach(), afs=True)
    assert torch.allclose(x.detach(), want, rtol=0, atol=1e-12)
    x.sum().backward()
    assert params.coeffs.grad is not None and params.coeffs.grad.abs().sum() > 0


def test_corrections_change_the_update_by_the_formula():
    """One Euler interval with Δw and Δβ: x1 = x0 + h(1 + Δw)d0 + (1 − σ1/σ0)·Δβ·D0."""
    grid = torch.tensor([2.0, 1.0], dtype=torch.float64)
    solver = LearnedSolver("euler", {}, grid, False, torch.zeros(1, dtype=torch.float64),
                           torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.2]], dtype=torch.float64))
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    den = lambda x, s: 0.25 * x
    got = fewstep.sample(den, x0 / 2.0, solver)
    d0 = (x0 - den(x0, None)) / 2.0
    want = x0 + (-1.0) * 1.3 * d0 + 0.5 * (-0.2) * den(x0, None)
    assert torch.allclose(got, want, rtol=0, atol=1e-15)


def test_offsets_move_the_model_time_only():
    calls = []

    def den(x, s):
        calls.append(float(s[0]))
        return torch.zeros_like(x)

    grid = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    xi = torch.tensor([0.0, 0.1], dtype=torch.float64)
    fewstep.sample(den, torch.ones(1, 3, dtype=torch.float64), LearnedSolver("euler", {}, grid, True, xi))
    assert calls == pytest.approx([2.0 * torch.exp(torch.tensor(0.1)).item()])


@pytest.mark.parametrize("base,afs,n", [("dpmpp", True, 5), ("ipndm", False, 4), ("unipc", True, 3)])
def test_nfe_is_counted_exactly(base, afs, n):
    card = _card(base, afs, n)
    ev = Evaluator(GMM.denoiser)
    solver = card.solver()
    integrate(solver, ev, seeded_noise(range(2), GMM.shape) * 80.0, solver.grid, afs=afs)
    assert ev.calls == card.nfe == n - int(afs)


def test_card_round_trip_is_bit_exact(tmp_path):
    cfg = LearnConfig(base="deis", nfe=3, afs=True, params=("steps", "offsets", "weights"), iters=6, pairs=16,
                      val_pairs=8, batch=8, teacher_steps=60)
    card = learn(GMM, cfg, out=tmp_path / "c", progress=False)
    again = load_card(tmp_path / "c", GMM)
    assert again == card
    noise = seeded_noise(range(5), GMM.shape)
    assert torch.equal(fewstep.sample(GMM.denoiser, noise, card.solver()),
                       fewstep.sample(GMM.denoiser, noise, fewstep.load_solver(tmp_path / "c")))


def test_training_lowers_validation_error_by_a_real_margin():
    cfg = LearnConfig(base="dpmpp", nfe=4, afs=True, iters=60, pairs=64, val_pairs=32, batch=32, lr=0.03,
                      teacher_steps=200)
    card = learn(GMM, cfg, progress=False)
    t = card.training
    assert t["val_rmse"] < 0.5 * t["val_rmse_initial"]
    assert card.nfe == 4 and len(card.sigmas) == 6


def _write(tmp_path, edit):
    card = _card(params=["steps"])
    save_card(tmp_path, card)
    raw = json.loads((tmp_path / "card.json").read_text())
    edit(raw)
    (tmp_path / "card.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize("edit,field", [
    (lambda r: r.update(sigmas=[80.0, 90.0, 1.0, 0.5, 0.1, 0.002]), "sigmas"),
    (lambda r: r.update(sigmas="abc"), "sigmas"),
    (lambda r: r.update(offsets=[0.0, 0.0]), "offsets"),
    (lambda r: r.update(afs="no"), "afs"),
    (lambda r: r.update(format=99), "format"),
    (lambda r: r.update(base="heun"), "base"),
    (lambda r: r.update(weights=[[0.0]] * 3), "weights"),
    (lambda r: r.update(coeffs=[[0.0], [0.0, 1.0], [0.0], [0.0], [0.0]]), "coeffs"),
    (lambda r: r.update(base_options={"max_order": 9}), "max_order"),
    (lambda r: r.pop("sigmas"), "sigmas"),
])
def test_hand_edited_cards_give_an_error_naming_the_field(tmp_path, edit, field):
    path = _write(tmp_path, edit)
    with pytest.raises(CardError, match=field):
        load_card(path)


def test_nan_in_card_is_refused(tmp_path):
    path = _write(tmp_path, lambda r: None)
    text = (path / "card.json").read_text().replace("0.002", "NaN", 1)
    (path / "card.json").write_text(text)
    with pytest.raises(CardError, match="NaN|number"):
        load_card(path)


def test_card_for_another_model_is_refused(tmp_path):
    save_card(tmp_path, _card())
    with pytest.raises(CardError, match="gmm"):
        load_solver(tmp_path, load_model("digits-opt"))


def test_card_refuses_another_afs_or_grid():
    solver = _card(afs=True).solver()
    noise = seeded_noise(range(2), GMM.shape)
    with pytest.raises(fewstep.SolverError, match="afs"):
        fewstep.sample(GMM.denoiser, noise, solver, afs=False)
    with pytest.raises(fewstep.SolverError, match="num_steps"):
        fewstep.sample(GMM.denoiser, noise, solver, num_steps=4)


def test_learn_cli_bench_and_export(tmp_path, capsys):
    out = tmp_path / "card"
    assert main(["learn", "--model", "gmm", "--base", "ipndm", "--nfe", "3", "--afs", "--params", "steps,offsets",
                 "--iters", "4", "--pairs", "16", "--val-pairs", "8", "--batch", "8", "--teacher-steps", "40",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["learn", "export", str(out), "--sigmas"]) == 0
    sigmas = json.loads(capsys.readouterr().out)
    assert len(sigmas) == 5 and sigmas[0] == 80.0
    report = tmp_path / "bench.json"
    assert main(["bench", "--model", "gmm", "--n", "16", "--nfe", "3", "--solvers", "euler", "--learned", str(out),
                 "--json", str(report), "--no-progress"]) == 0
    rows = json.loads(report.read_text())
    learned = [r for r in rows if r.get("learned")]
    assert len(learned) == 1 and learned[0]["nfe"] == 3


@pytest.mark.parametrize("args,name", [
    (["--nfe", "0"], "--nfe"), (["--lr", "nan"], "--lr"), (["--batch", "0"], "--batch"),
    (["--params", "steps,bogus"], "--params"), (["--init-schedule", "logsnr:abc"], "--init-schedule"),
    (["--base", "heun"], "--base"), (["--params", "steps,mean"], "mean"),
    (["--teacher", "bogus"], "bogus"), (["--base-opt", "max_order=9"], "max_order"),
])
def test_learn_cli_rejects_bad_input(tmp_path, capsys, args, name):
    try:
        code = main(["learn", "--model", "gmm", *args, "--iters", "1", "--pairs", "4", "--val-pairs", "2",
                     "--teacher-steps", "20", "--no-progress", "--out", str(tmp_path / "x")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err
    assert not (tmp_path / "x" / "card.json").exists()


def test_learn_export_needs_a_card(tmp_path, capsys):
    assert main(["learn", "export"]) == 2
    assert main(["learn", "export", str(tmp_path)]) == 2
    assert "card.json" in capsys.readouterr().err


def test_sample_cli_with_a_card_writes_a_manifest_and_resumes(tmp_path):
    card = tmp_path / "card"
    save_card(card, _card(params=["steps"]))
    args = ["sample", "--model", "gmm", "--solver", f"learned:{card}", "--seeds", "0-3", "--no-progress"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["solver"] == "learned" and manifest["nfe"] == 4 and "fingerprint" in manifest["card"]
    assert main([*args, "--out", str(out)]) == 0  # same card: resumes
    assert main([*args, "--nfe", "3", "--out", str(tmp_path / "o2")]) == 2  # the card is NFE 4
    assert main(["sample", "--model", "gmm", "--solver", "learned:", "--out", str(tmp_path / "o3")]) == 2
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_learned_afs_shift_moves_the_first_node_only():
    """With a shift μ the first node is AFS's analytic D_0 + μ, still without a model call."""
    mu = torch.linspace(-1, 1, 64, dtype=torch.float64)
    card = _card(afs=True, n=3, afs_shift=mu.tolist(), params=["mean"])
    solver = card.solver()
    x0 = seeded_noise(range(2), GMM.shape) * 80.0
    plain = fewstep.solvers.base.afs_node(x0, solver.grid[:1])
    node = solver.afs_node(x0, solver.grid[:1])
    assert torch.equal(node.denoised, plain.denoised + mu.reshape(1, 1, 8, 8))
    ev = Evaluator(GMM.denoiser)
    integrate(solver, ev, x0, solver.grid, afs=True)
    assert ev.calls == card.nfe == 2


def test_afs_shift_is_validated(tmp_path):
    with pytest.raises(CardError, match="afs_shift"):
        _write(tmp_path, lambda r: r.update(afs_shift=[0.0] * 10))
        load_card(tmp_path)
    with pytest.raises(CardError, match="afs_shift"):
        _write(tmp_path, lambda r: r.update(afs_shift=[0.0] * 64, afs=False))
        load_card(tmp_path)


def test_card_refuses_a_foreign_grid():
    solver = _card(afs=True).solver()
    other = get_schedule("polynomial", len(solver.grid), GMM.sigma_min, GMM.sigma_max)
    with pytest.raises(fewstep.SolverError, match="own"):
        fewstep.sample(GMM.denoiser, seeded_noise(range(2), GMM.shape), solver, other)


def test_learn_refuses_an_out_that_is_a_file_before_any_work(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["learn", "--model", "gmm", "--out", str(target), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err


def test_tune_keeps_the_best_validated_card_and_reports_the_true_ratio(tmp_path):
    """tune on two families: the `best` card is the one with the lower validation RMSE, and each table row's
    ratio is that card's test RMSE over the best classic solver's (solvers × schedules × AFS) on the same seeds."""
    from fewstep.evaluation.bench import best_per_nfe, run_bench, run_best_classic
    from fewstep.tune import Family, tune

    # no time budget: both families train their 6 iterations however slow the machine
    cfg = LearnConfig(pairs=32, val_pairs=16, iters=6, batch=16, lr=0.05, loss="rmse", teacher_steps=100)
    families = (Family("unipc", ("steps", "offsets")), Family("euler", ("steps",)))
    rows = tune(GMM, [2], tmp_path, budget_s=math.inf, n_test=32, progress=False, log=lambda s: None,
                families=families, base_config=cfg)
    cards = {p.name.split("-")[0]: load_card(p, GMM) for p in (tmp_path / "nfe2").iterdir() if p.name != "best"}
    assert sorted(cards) == ["euler", "unipc"]
    best = min(cards.values(), key=lambda c: c.training["val_rmse"])
    assert load_card(tmp_path / "nfe2" / "best", GMM).sigmas == best.sigmas
    classic = best_per_nfe(run_best_classic(GMM, [2], 32, progress=False))[2]["rmse"]
    learned = run_bench(GMM, [], [2], 32, progress=False, learned=[tmp_path / "nfe2" / "best"])[0]["rmse"]
    (row,) = rows
    assert row["best_classic_rmse"] == classic and row["learned_rmse"] == learned
    assert row["ratio"] == pytest.approx(learned / classic) and row["val_rmse"] == best.training["val_rmse"]
    assert json.loads((tmp_path / "table.json").read_text()) == rows
    assert (tmp_path / "table.md").read_text().count("\n") == 3 and (tmp_path / "error_vs_nfe.png").stat().st_size


def test_tune_starts_each_card_from_its_bases_best_schedule_with_or_without_afs():
    """The initial grid is the best of every best-classic schedule × AFS on / off on the validation pairs (a card
    can only improve on where it starts): recomputed here configuration by configuration."""
    from fewstep.evaluation.bench import best_classic_schedules
    from fewstep.reference import reference_solution
    from fewstep.solvers import num_steps_for_nfe, sample
    from fewstep.tune import best_init_schedule

    seeds = list(range(1000, 1032))
    targets = reference_solution(GMM, seeds)
    noise = seeded_noise(seeds, GMM.shape)
    for base, nfe in (("dpmpp", 3), ("ipndm", 7)):
        text, afs, err = best_init_schedule(GMM, base, nfe, LearnConfig(), lambda s: GMM.denoiser, targets, seeds)
        scores = {}
        for with_afs in (True, False):
            n = num_steps_for_nfe(base, nfe, afs=with_afs)
            for name in best_classic_schedules(GMM):
                sched, _, rho = name.partition(":")
                grid = get_schedule(sched, n, GMM.sigma_min, GMM.sigma_max, rho=float(rho) if rho else None)
                x = sample(GMM.denoiser, noise, base, grid, afs=with_afs)
                scores[(name, with_afs)] = float((x - targets).reshape(len(seeds), -1).pow(2).mean(1).sqrt().mean())
        assert scores[(text, afs)] == pytest.approx(err, rel=1e-9)
        assert err == pytest.approx(min(scores.values()), rel=1e-9)


def test_tune_cli_writes_the_table(tmp_path, capsys):
    """Iterations, not seconds, bound the run: with a budget no machine reaches, every family trains its 2
    iterations and the best card is the lowest validation RMSE among them, on any machine at any load."""
    from fewstep.tune import FAMILIES

    out = tmp_path / "tune"
    assert main(["tune", "--model", "gmm", "--nfe", "2", "--budget", "1e9", "--n", "16", "--pairs", "16", "--iters",
                 "2", "--out", str(out), "--no-progress"]) == 0
    (row,) = json.loads((out / "table.json").read_text())
    cards = [load_card(p, GMM) for p in (out / "nfe2").iterdir() if p.name != "best"]
    assert sorted(c.base for c in cards) == sorted(f.base for f in FAMILIES)
    assert all(c.training["val_curve"][-1][0] == 2 for c in cards)  # validated after its 2nd, last iteration
    best = min(cards, key=lambda c: c.training["val_rmse"])
    assert row["nfe"] == 2 and row["learned"] == best.label and row["val_rmse"] == best.training["val_rmse"]
    assert row["ratio"] == pytest.approx(row["learned_rmse"] / row["best_classic_rmse"]) and row["ratio"] > 0
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--model", "gmm", "--nfe", "0", "--out", str(tmp_path / "t2")])
    assert exit_.value.code == 2 and "--nfe" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()
