"""Checkpoints and output folders: they record what made them and refuse other settings;
`train` resumes only its own run and never silently replaces a finished predictor; hand-edited or damaged
checkpoint files are clear errors."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from fewstep.cli import main
from fewstep.manifest import MANIFEST, ManifestError, claim_folder

SAMPLE = ["sample", "--model", "gmm", "--seeds", "0-3", "--no-progress"]
TRAIN = ["train", "--model", "gmm", "--batch", "4", "--kimg", "0.008", "--afs", "--no-progress"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# --- sample folders --------------------------------------------------------------------------------------------

def test_sample_folder_refuses_other_settings_and_resumes_the_same(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli(SAMPLE + ["--solver", "ipndm", "--nfe", "5", "--out", out], capsys)[0] == 0
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert manifest["solver"] == "ipndm" and manifest["nfe"] == 5 and manifest["options"] == {"max_order": 4}
    assert manifest["model"]["name"] == "gmm" and manifest["afs"] is False and len(manifest["sigmas"]) == 6
    before = pngs(tmp_path / "o")

    for other in (["--solver", "euler", "--nfe", "3"], ["--solver", "ipndm", "--nfe", "5", "--afs"],
                  ["--solver", "ipndm", "--nfe", "5", "--opt", "max_order=2"],
                  ["--solver", "ipndm", "--nfe", "5", "--schedule", "logsnr"]):
        rc, err = run_cli(SAMPLE[:-2] + ["0-7", "--no-progress"] + other + ["--out", out], capsys)
        one_line_error(rc, err, "--out", "other settings", "--overwrite")
        assert pngs(tmp_path / "o") == before  # refused before sampling: nothing added

    rc, err = run_cli(SAMPLE[:-2] + ["0-7", "--no-progress", "--solver", "ipndm", "--nfe", "5", "--out", out], capsys)
    assert rc == 0 and len(pngs(tmp_path / "o")) == 8  # the same settings resume
    assert {k: v for k, v in pngs(tmp_path / "o").items() if k in before} == before

    rc, _ = run_cli(SAMPLE + ["--solver", "euler", "--nfe", "3", "--out", out, "--overwrite"], capsys)
    assert rc == 0 and len(pngs(tmp_path / "o")) == 4  # the old samples were removed
    assert json.loads((tmp_path / "o" / MANIFEST).read_text())["solver"] == "euler"


def test_folder_with_samples_but_no_manifest_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(SAMPLE + ["--solver", "euler", "--nfe", "3", "--out", str(out)], capsys)[0] == 0
    (out / MANIFEST).unlink()
    rc, err = run_cli(SAMPLE + ["--solver", "euler", "--nfe", "3", "--out", str(out)], capsys)
    one_line_error(rc, err, "no manifest.json")


def test_concurrent_claims_of_one_folder_exactly_one_wins(tmp_path):
    results: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            claim_folder(tmp_path / "o", {"format": 1, "solver": f"s{i % 2}"})
            results.append(f"s{i % 2}")
        except ManifestError:
            results.append("refused")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = json.loads((tmp_path / "o" / MANIFEST).read_text())["solver"]
    assert results.count(winner) == 4 and results.count("refused") == 4
    assert not list((tmp_path / "o").glob("*.tmp"))


# --- training checkpoints ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished predictor on gmm (2 iterations)."""
    out = tmp_path_factory.mktemp("ckpt") / "D"
    assert main(TRAIN + ["--out", str(out)]) == 0
    return out


def test_train_refuses_to_resume_for_another_model_or_setting(trained, tmp_path, capsys):
    ckpt = tmp_path / "D"
    shutil.copytree(trained, ckpt)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    rc, err = run_cli(["train", "--model", "digits-opt", *TRAIN[3:], "--out", str(ckpt)], capsys)
    one_line_error(rc, err, "another training run", "model.name")
    rc, err = run_cli(TRAIN + ["--lr", "0.01", "--out", str(ckpt)], capsys)
    one_line_error(rc, err, "another training run", "config.lr")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert run_cli(TRAIN + ["--out", str(ckpt)], capsys)[0] == 0  # the same run resumes (nothing left to do)


def test_train_never_silently_replaces_a_finished_predictor(trained, tmp_path, capsys):
    ckpt = tmp_path / "D"
    shutil.copytree(trained, ckpt)
    (ckpt / "train_state.pt").unlink()
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    rc, err = run_cli(TRAIN + ["--out", str(ckpt)], capsys)
    one_line_error(rc, err, "already holds a trained predictor")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_corrupt_train_state_is_a_clear_error(trained, tmp_path, capsys):
    ckpt = tmp_path / "D"
    shutil.copytree(trained, ckpt)
    (ckpt / "train_state.pt").write_bytes(b"\x80garbage")
    rc, err = run_cli(TRAIN + ["--out", str(ckpt)], capsys)
    one_line_error(rc, err, "train_state.pt", "corrupt")


def test_sample_with_a_predictor_records_its_fingerprint(trained, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(SAMPLE + ["--predictor", str(trained), "--out", str(out)], capsys)[0] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["predictor"]["fingerprint"]) == 12 and manifest["predictor_path"] == str(trained.resolve())
    other = tmp_path / "D2"
    shutil.copytree(trained, other)
    settings = json.loads((other / "amed.json").read_text())
    settings["training"]["note"] = "changed"
    (other / "amed.json").write_text(json.dumps(settings))
    rc, err = run_cli(SAMPLE + ["--predictor", str(other), "--out", str(out)], capsys)
    one_line_error(rc, err, "predictor")


# --- hand-edited amed.json -------------------------------------------------------------------------------------------

BAD_SETTINGS = {
    "student_options a string": (lambda s: s.update(student_options="abc"), "student_options"),
    "student_options null": (lambda s: s.update(student_options=None), "student_options"),
    "negative hidden": (lambda s: s["predictor"].update(hidden=-1), "predictor.hidden"),
    "sigmas a string": (lambda s: s.update(sigmas="abc"), "sigmas"),
    "format 99": (lambda s: s.update(format=99), "format 99"),
    "afs a string": (lambda s: s.update(afs="no"), "afs must be true or false"),
    "NaN scale": (lambda s: s.update(scale_dir=float("nan")), "scale_dir"),
    "unknown student option": (lambda s: s.update(student_options={"bogus": 1}), "unknown option"),
    "not an object": (lambda s: s.clear(), "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_hand_edited_settings_are_clear_errors(case, trained, tmp_path, capsys):
    mutate, needle = BAD_SETTINGS[case]
    ckpt = tmp_path / "D"
    shutil.copytree(trained, ckpt)
    settings = json.loads((ckpt / "amed.json").read_text())
    mutate(settings)
    (ckpt / "amed.json").write_text(json.dumps(settings) if settings else "[1, 2]")
    rc, err = run_cli(SAMPLE + ["--predictor", str(ckpt), "--out", str(tmp_path / "o")], capsys)
    one_line_error(rc, err, "amed.json", needle)
    assert not (tmp_path / "o").exists()
