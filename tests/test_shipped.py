"""The shipped solver cards and `--solver auto` (fewstep.shipped): every card validates and reproduces its recorded
test errors, `sample` / `bench` / `fewstep.sample` pick the card for the model, NFE and conditions and record the
choice, a card for other weights is refused and `auto` then falls back to the classic rule with a note, and the rule
is the one benchmarks/auto_rule.py derived."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.conditioning import conditioned_model, resolve
from fewstep.errors import FewstepError
from fewstep.learned.card import CardError, load_card
from fewstep.methods import SolverSpec, resolve_method
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.reference import reference_solution
from fewstep.seeds import EVALUATION
from fewstep.shipped import CARD_SETS, CLASSIC_RULE, SHIPPED_DIR, find_card, set_model, shipped_cards

CARDS = shipped_cards()
NFES = range(3, 9)
CHECKED_SEEDS = 8  # test seeds recomputed per card (the reference solve of 64 network seeds is the cost)


def test_every_set_ships_a_validated_card_per_nfe_with_its_table():
    for name in CARD_SETS:
        cards = [c for c in CARDS if c.set == name]
        assert [c.nfe for c in cards] == list(NFES), name
        model, spec = set_model(name)
        for c in cards:
            card = load_card(c.path, model)  # validates, and checks the model identity
            assert card.nfe == c.nfe
            assert card.conditions == (spec.to_json() if spec.conditional else None)
            row = c.row
            assert row is not None and row["nfe"] == c.nfe
            errors = row["test_errors"]
            assert len(errors) == (512 if model.exact else 64)
            assert math.isclose(sum(errors) / len(errors), row["learned_rmse"], rel_tol=1e-9)
            # never worse than the best classic (a card starts from its base's best configuration on validation
            # and keeps it when training does not improve it there: digits-opt at NFE 8) — but for three cards.
            # digits-cond-w2 NFE 8: one test seed that changes mode (error 0.42; the card's mean over the other 63
            # is 0.0116) outweighs the rest. digits-opt NFE 5 and 7: the memorising model's per-seed errors are so
            # heavy-tailed that validation and test rank configurations differently (NFE 7: the card's validation
            # RMSE 0.0164 against 0.0232 for the best classic's own configuration, test 0.0178 against 0.0158)
            if (name, c.nfe) == ("digits-cond-w2", 8):
                assert sorted(errors)[-1] > 0.4 and row["learned_rmse"] < 1.2 * row["best_classic_rmse"]
            elif (name, c.nfe) in (("digits-opt", 5), ("digits-opt", 7)):
                assert row["val_rmse"] < row["learned_rmse"] < 1.15 * row["best_classic_rmse"]
            else:
                assert row["learned_rmse"] <= row["best_classic_rmse"] * (1 + 1e-9), (name, c.nfe)  # = its base


@pytest.mark.parametrize("name", list(CARD_SETS))
def test_shipped_cards_reproduce_their_recorded_test_errors(name):
    """The first test seeds of every card, sampled here against a fresh reference solve, give the per-seed errors
    recorded when it was shipped (network float32 round-off across CPUs and batch sizes: ≤ 1e-4 relative)."""
    model, spec = set_model(name)
    seeds = list(EVALUATION.seeds(CHECKED_SEEDS))
    bound = conditioned_model(model, spec, seeds)
    ref = reference_solution(bound, seeds)
    noise = seeded_noise(seeds, model.shape, model.state_dtype)
    for c in (c for c in CARDS if c.set == name):
        method = resolve_method(SolverSpec("learned", path=str(c.path)), bound, nfe=c.nfe)
        with torch.no_grad():
            x = fewstep.sample(bound.denoiser, noise, method.solver, method.grid, afs=method.afs)
        errors = (x.double() - ref).reshape(len(seeds), -1).pow(2).mean(1).sqrt()
        recorded = torch.tensor(c.row["test_errors"][:CHECKED_SEEDS], dtype=torch.float64)
        torch.testing.assert_close(errors, recorded, rtol=1e-4, atol=0, msg=f"{c.name}")


@pytest.mark.parametrize("name", list(CARD_SETS))
def test_auto_picks_the_shipped_card_of_the_model_nfe_and_conditions(name):
    model, spec = set_model(name)
    for nfe in NFES:
        method = resolve_method("auto", model, nfe=nfe, conditions=spec)
        assert method.record["auto"] == {"choice": "shipped card", "card": f"{name}/nfe{nfe}"}
        assert method.nfe == nfe and method.label == "auto"
        assert "shipped card" in method.note


def test_auto_on_other_conditions_or_nfe_uses_the_classic_rule():
    model = load_model("digits-cond")
    _, w3 = resolve(model, guidance=3.0, draw="uniform")  # no card fitted at guidance 3
    method = resolve_method("auto", model, nfe=5, conditions=w3)
    assert method.record["auto"]["choice"] == "classic rule"
    assert method.record["auto"]["spec"] == CLASSIC_RULE["edm"][5]
    method = resolve_method("auto", load_model("digits"), nfe=10)  # beyond the cards: the nearest rule that fits
    assert method.record["auto"]["choice"] == "classic rule" and method.nfe == 10


def test_a_card_for_other_weights_is_refused_and_auto_falls_back_with_a_note():
    retrained = dataclasses.replace(load_model("digits"), fingerprint="0123456789ab")
    card = next(c for c in CARDS if c.set == "digits" and c.nfe == 5)
    with pytest.raises(CardError, match="other weights"):
        resolve_method(SolverSpec("learned", path=str(card.path)), retrained)
    found, why = find_card(retrained, 5)
    assert found is None and "digits/nfe5 refused" in why and "other weights" in why
    method = resolve_method("auto", retrained, nfe=5)
    assert method.record["auto"]["choice"] == "classic rule" and "other weights" in method.note


def test_sample_cli_uses_the_shipped_card_and_records_it(tmp_path):
    out = tmp_path / "s"
    run = subprocess.run([sys.executable, "-m", "fewstep", "sample", "--model", "digits", "--nfe", "5", "--seeds",
                          "0-3", "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "auto at NFE 5: shipped card digits/nfe5" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["auto"] == {"choice": "shipped card", "card": "digits/nfe5"}
    assert manifest["solver"] == "learned" and manifest["nfe"] == 5


def test_sample_cli_falls_back_on_a_retrained_model(tmp_path):
    (tmp_path / "retrained.py").write_text(
        "import dataclasses\nfrom fewstep.models import load_model\n\n"
        "def factory():\n    return dataclasses.replace(load_model('digits'), fingerprint='0123456789ab')\n")
    run = subprocess.run([sys.executable, "-m", "fewstep", "sample", "--model", f"{tmp_path}/retrained.py:factory",
                          "--nfe", "5", "--seeds", "0", "--out", str(tmp_path / "s"), "--no-progress"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "classic rule" in run.stdout and "other weights" in run.stdout
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["auto"]["choice"] == "classic rule"


def test_auto_refuses_what_it_chooses_itself(tmp_path):
    for extra, word in ((["--afs"], "--afs"), (["--schedule", "logsnr"], "--schedule"), ([], "--nfe"),
                        (["--cards", str(tmp_path / "no such [dir]")], "--cards")):
        argv = ["sample", "--model", "gmm", "--seeds", "0", "--out", str(tmp_path / "s"), *extra]
        if word != "--nfe":
            argv += ["--nfe", "5"]
        run = subprocess.run([sys.executable, "-m", "fewstep", *argv], capture_output=True, text=True)
        assert run.returncode == 2 and word in run.stderr and "Traceback" not in run.stderr
        assert not (tmp_path / "s").exists()


def test_python_sample_defaults_to_auto():
    model = load_model("gmm")
    noise = seeded_noise(list(range(4)), model.shape)
    method = resolve_method("auto", model, nfe=5)
    expected = fewstep.sample(model.denoiser, noise, method.solver, method.grid, afs=method.afs)
    assert torch.equal(fewstep.sample(model, noise, nfe=5), expected)  # a model: its shipped card
    rule = resolve_method(CLASSIC_RULE["edm"][5], model, nfe=5)
    plain = fewstep.sample(model.denoiser, noise, rule.solver, rule.grid, afs=rule.afs)
    assert torch.equal(fewstep.sample(model.denoiser, noise, nfe=5), plain)  # a bare denoiser: the rule
    with pytest.raises(FewstepError, match="nfe="):
        fewstep.sample(model.denoiser, noise)
    with pytest.raises(FewstepError, match="picks the grid"):
        fewstep.sample(model.denoiser, noise, schedule=method.grid, nfe=5)


def test_bench_has_an_auto_row_and_says_what_it_chose():
    run = subprocess.run([sys.executable, "-m", "fewstep", "bench", "--model", "gmm", "--nfe", "3,5", "--n", "16",
                          "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "│ auto " in run.stdout and "auto at NFE 3: shipped card gmm/nfe3" in run.stdout


def test_cards_command_lists_every_shipped_card():
    run = subprocess.run([sys.executable, "-m", "fewstep", "cards", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert len(rows) == len(CARD_SETS) * len(NFES)
    assert all(Path(r["path"]).is_relative_to(SHIPPED_DIR) and r["ratio"] != "?" for r in rows)


def test_classic_rule_is_the_one_the_benchmark_derived():
    derived = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "auto_rule.json").read_text())
    assert {f: {int(k): v["spec"] for k, v in rule.items()} for f, rule in derived["rule"].items()} == CLASSIC_RULE


def test_demo_uses_the_shipped_cards_and_predictors_and_learns_one_card_live(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "fewstep", "demo", "--model", "gmm", "--n", "16", "--out", str(out),
                          "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    records = json.loads((out / "table.json").read_text())
    assert sorted(r["nfe"] for r in records if r["solver"] == "learned card") == list(NFES)
    shipped = [r for r in records if r["solver"].startswith(("AMED", "learned"))]
    assert shipped and not any(r.get("train_seconds") for r in shipped)  # nothing trained but the live card
    live = json.loads((out / "live_card" / "result.json").read_text())
    assert live["model"] == "gmm" and live["test_rmse"] < live["shipped"]["best_classic_rmse"]
    assert "learned live" in run.stdout


def test_auto_prefers_the_users_own_card(tmp_path):
    """`sample --cards DIR`: a card of the user's for this model and NFE (anywhere below DIR) comes first."""
    import shutil

    own = tmp_path / "tune" / "nfe5" / "best"
    own.mkdir(parents=True)
    shutil.copyfile(SHIPPED_DIR / "gmm" / "nfe5" / "card.json", own / "card.json")
    method = resolve_method("auto", load_model("gmm"), nfe=5, card_dirs=[tmp_path])
    assert method.record["auto"] == {"choice": "card", "card": str(own)}
    assert resolve_method("auto", load_model("gmm"), nfe=4, card_dirs=[tmp_path]).record["auto"]["choice"] == \
        "shipped card"  # none of the user's at NFE 4
