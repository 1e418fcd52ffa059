"""Every user mistake is one line on stderr naming the argument and the problem, exit
code 2, no traceback and no file written; user text is never read as rich markup; global options work after the
subcommand; the CLI's parsers survive random input (hypothesis)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fewstep.cli import build_parser, main
from fewstep.cli.common import model_arg
from fewstep.errors import FewstepError
from fewstep.methods import SolverSpec, parse_options
from fewstep.noise import parse_seeds
from fewstep.validate import float_in, int_list, positive_int, threads_int


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) in-process: (exit code, stdout, stderr); argparse's SystemExit counts as an exit code."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(rc: int, err: str, needles: tuple[str, ...]) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def play(tmp_path: Path) -> Path:
    """A folder of things a careless user points the CLI at."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    (tmp_path / "imgs_bad").mkdir()
    (tmp_path / "imgs_bad" / "x.png").write_text("not an image")
    (tmp_path / "imgs_trunc").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "imgs_trunc" / "x.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    (tmp_path / "full.png").unlink()
    (tmp_path / "notnpz.npz").write_text("hello")
    np.savez(tmp_path / "nan_stats.npz", mu=np.array([np.nan, 0.0]), sigma=np.eye(2))
    np.savez(tmp_path / "npd_stats.npz", mu=np.zeros(2), sigma=np.array([[1.0, 0.0], [0.0, -1.0]]))
    (tmp_path / "nan_schedule.json").write_text("[NaN, 80, 1, 0.5, 0.002]")
    (tmp_path / "flat.py").write_text("def factory():\n    return {'denoiser': lambda x, s: x * 0, 'shape': (64,)}\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('broken at import')\n")
    (tmp_path / "syntax.py").write_text("def factory(:\n")
    return tmp_path


SAMPLE = ["sample", "--model", "gmm", "--solver", "euler", "--seeds", "0-1", "--no-progress", "--out", "{t}/o"]
TRAIN = ["train", "--model", "gmm", "--out", "{t}/ckpt", "--no-progress"]
BENCH = ["bench", "--model", "gmm", "--n", "2", "--nfe", "3", "--solvers", "euler", "--no-progress"]
FID = ["fid", "calc", "--ref", "digits", "--no-progress"]

CASES = {
    # values that would otherwise run and produce silent nonsense
    "nfe 0 with afs": (SAMPLE + ["--nfe", "0", "--afs"], ["--nfe", ">= 1"]),
    "nfe -1": (SAMPLE + ["--nfe=-1"], ["--nfe"]),
    "reversed seed range": (SAMPLE + ["--num-steps", "3", "--seeds", "0,5-2"], ["--seeds", "backwards"]),
    "duplicate seeds": (SAMPLE + ["--num-steps", "3", "--seeds", "3,1-4"], ["--seeds", "seed 3 is given twice"]),
    "nfe and num-steps": (SAMPLE + ["--nfe", "3", "--num-steps", "4"], ["--nfe or --num-steps, not both"]),
    "bench nfe 0": (BENCH[:-5] + ["--nfe", "0"], ["--nfe"]),
    "bench n 0": (["bench", "--n", "0"], ["--n", ">= 1"]),
    # mistakes that used to end in a traceback
    "huge seed range": (SAMPLE + ["--num-steps", "3", "--seeds", "0-999999999999"], ["--seeds", "at most"]),
    "huge seed": (SAMPLE + ["--num-steps", "3", "--seeds", "99999999999999999999"], ["--seeds", "larger than"]),
    "opt afs": (SAMPLE + ["--num-steps", "3", "--opt", "afs=true"], ["--opt afs", "--afs"]),
    "opt nan": (SAMPLE + ["--solver", "dpm2", "--num-steps", "3", "--opt", "r=nan"], ["option r", "finite"]),
    "unknown solver": (SAMPLE + ["--solver", "bogus", "--num-steps", "3"], ["unknown solver 'bogus'"]),
    "out is a file": (SAMPLE[:-1] + ["{t}/afile", "--num-steps", "3"], ["--out", "not a folder"]),
    "grid is a folder": (SAMPLE + ["--num-steps", "3", "--grid", "{t}/adir"], ["--grid", "is a folder"]),
    "npz is a folder": (SAMPLE + ["--num-steps", "3", "--npz", "{t}/adir"], ["--npz", "is a folder"]),
    "1-D model": (SAMPLE[:2] + ["{t}/flat.py:factory"] + SAMPLE[3:] + ["--num-steps", "3"], ["shape (64,)"]),
    "module raises": (SAMPLE[:2] + ["{t}/raises.py:factory"] + SAMPLE[3:] + ["--num-steps", "3"],
                      ["--model", "RuntimeError: broken at import"]),
    "syntax error": (SAMPLE[:2] + ["{t}/syntax.py:factory"] + SAMPLE[3:] + ["--num-steps", "3"],
                     ["--model", "syntax error", "line 1"]),
    "scale-dir nan": (TRAIN + ["--scale-dir", "nan"], ["--scale-dir", "finite"]),
    "lr -1": (TRAIN + ["--lr", "-1"], ["--lr"]),
    "scale-time 5": (TRAIN + ["--scale-time", "5"], ["--scale-time", "[0, 1)"]),
    "kimg inf": (TRAIN + ["--kimg", "inf"], ["--kimg", "finite"]),
    "bad rho in spec": (BENCH[:-2] + ["ipndm@polynomial:abc", "--no-progress"], ["ipndm@polynomial:abc", "ρ"]),
    "bench json is a folder": (BENCH + ["--json", "{t}/adir"], ["--json", "is a folder"]),
    "threads 100000": (["--threads", "100000", "solvers"], ["--threads", "1…1024"]),
    "threads after subcommand": (["solvers", "--threads", "abc"], ["--threads", "expected an integer"]),
    "fid non-image png": (FID + ["--images", "{t}/imgs_bad"], ["x.png", "not a readable image"]),
    "fid truncated png": (FID + ["--images", "{t}/imgs_trunc"], ["x.png", "not a readable image"]),
    "fid npz not an npz": (FID + ["--images", "{t}/notnpz.npz"], ["notnpz.npz", "not a readable .npz"]),
    "fid bogus device": (FID + ["--images", "{t}/imgs_bad", "--device", "bogus"], ["--device 'bogus'", "not a device"]),
    "fid NaN statistics": (FID[:2] + ["--ref", "{t}/nan_stats.npz", "--images", "digits-held"], ["NaN"]),
    "fid non-PSD statistics": (FID[:2] + ["--ref", "{t}/npd_stats.npz", "--images", "digits-held"],
                               ["positive semi-definite"]),
    # a message holding user text that looks like markup keeps it
    "NaN schedule file": (SAMPLE + ["--schedule", "gits:{t}/nan_schedule.json", "--num-steps", "5"],
                          ["non-finite values: [nan, 80.0, 1.0, 0.5, 0.002]"]),
    "demo n 0": (["demo", "--n", "0"], ["--n"]),
    # training the shipped networks: numbers and outputs checked before any training
    "train-model iters -5": (["train-model", "--iters=-5", "--out", "{t}/m"], ["--iters", ">= 1"]),
    "train-model channels": (["train-model", "--channels", "a,b", "--out", "{t}/m"], ["--channels", "integer"]),
    "train-model ema 1": (["train-model", "--ema", "1", "--out", "{t}/m"], ["--ema", "[0, 1)"]),
    "train-model out is a file": (["train-model", "--iters", "1", "--out", "{t}/afile"], ["--out", "not a folder"]),
    "classifier epochs 0": (["train-classifier", "--epochs", "0", "--out", "{t}/c.safetensors"], ["--epochs"]),
    "classifier out is a folder": (["train-classifier", "--epochs", "1", "--out", "{t}/adir"], ["--out", "folder"]),
    "noisy classifier threads 0": (["train-noisy-classifier", "--threads", "0", "--out", "{t}/n.safetensors"],
                                   ["--threads", "1…1024"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_clear_line(case, play, capsys):
    argv, needles = CASES[case]
    before = files(play)
    rc, out, err = run_cli([a.format(t=play) for a in argv], capsys)
    assert_user_error(rc, err, tuple(needles))
    assert files(play) == before  # nothing written, nothing removed


def test_environment_mistakes(play, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_THREADS", "abc")
    rc, _, err = run_cli(["solvers", "--json"], capsys)
    assert_user_error(rc, err, ("$FEWSTEP_THREADS", "'abc'"))
    monkeypatch.setenv("FEWSTEP_THREADS", "1")
    monkeypatch.setenv("FEWSTEP_CACHE", str(play / "afile" / "cache"))  # under a file: cannot be created
    rc, _, err = run_cli(BENCH, capsys)
    assert_user_error(rc, err, ("afile", "$FEWSTEP_CACHE"))
    if not torch.cuda.is_available():
        rc, _, err = run_cli(FID + ["--images", str(play / "imgs_bad"), "--device", "cuda"], capsys)
        assert_user_error(rc, err, ("--device cuda", "no CUDA GPU"))


def test_markup_in_user_text_is_printed_verbatim(tmp_path, capsys):
    for name in ("[/]", "[exp1]", "[red]x"):
        out_dir = tmp_path / "o" / name
        rc, out, err = run_cli(SAMPLE[:-1] + [str(out_dir), "--num-steps", "3"], capsys)
        assert rc == 0, err
        assert f"to {out_dir}" in " ".join(out.split()) and len(list(out_dir.glob("*.png"))) == 2


def test_errors_go_to_stderr_not_stdout(tmp_path, capsys):
    rc, out, err = run_cli(["sample", "--solver", "bogus", "--num-steps", "3", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and out == "" and err.startswith("error:")


def test_global_options_after_the_subcommand(capsys):
    rc, out, _ = run_cli(["solvers", "--json", "--threads", "1"], capsys)
    assert rc == 0 and json.loads(out)
    rc, out, _ = run_cli(["--threads", "1", "solvers", "--json"], capsys)
    assert rc == 0 and json.loads(out)
    assert build_parser().parse_args(["fid", "calc", "--images", "x", "--ref", "y", "--threads", "2"]).threads == 2


def test_help_lists_commands_in_the_order_a_user_needs_them(capsys):
    """`fewstep --help`: demo, sample, bench, learn, tune, train first, in that order, then every other command
    (in the usage line and in the listing)."""
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0
    first = ["demo", "sample", "bench", "learn", "tune", "train"]
    usage = out[out.index("{") + 1 : out.index("}")].split(",")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and not line.startswith("     ")]
    for names in (usage, listed):
        assert names[: len(first)] == first, names
        assert len(names) > len(first) and len(set(names)) == len(names), names
    assert listed == usage


def test_library_inputs(tmp_path):
    """The library side of silent nonsense: bad noise is refused up front; numpy integers count; empty batches work."""
    import fewstep
    from fewstep.models import load_model

    gmm = load_model("gmm")
    good = torch.randn(2, *gmm.shape)
    for noise, needle in [(good.long(), "floating-point"), (good.bool(), "floating-point"),
                          (good.to(torch.complex64), "floating-point"), (good * float("nan"), "NaN")]:
        with pytest.raises(FewstepError, match=needle):
            fewstep.sample(gmm.denoiser, noise, "euler", num_steps=4)
    assert fewstep.sample(gmm.denoiser, good, "euler", num_steps=np.int64(4)).shape == good.shape
    for name in ("gmm", "digits-opt"):
        model = load_model(name)
        assert model.denoiser(torch.zeros(0, *model.shape), torch.zeros(0)).shape == (0, *model.shape)
        assert fewstep.sample(model.denoiser, torch.zeros(0, *model.shape), "ipndm", num_steps=4).shape[0] == 0


def test_npz_layout_is_b_h_w_c(tmp_path):
    from fewstep.sampling import SampleJob, run_sample_job

    run_sample_job(SampleJob(model="gmm", out=str(tmp_path / "o"), solver="euler", num_steps=3, seeds="0-2",
                             npz=str(tmp_path / "all.npz"), progress=False))
    images = np.load(tmp_path / "all.npz")["images"]
    assert images.ndim == 4 and images.shape[0] == 3 and images.shape[-1] == 1 and images.dtype == np.uint8


# --- plots ---------------------------------------------------------------------------------------------------

def test_error_plot_colours_styles_markers_and_legend_outside():
    import matplotlib.pyplot as plt

    from fewstep.evaluation.bench import DEFAULT_SOLVERS
    from fewstep.evaluation.plots import error_vs_nfe_figure

    records = [{"solver": s + (" +AFS" if afs else ""), "afs": afs, "nfe": n, "rmse": 1.0 / n}
               for s in DEFAULT_SOLVERS for afs in (False, True) for n in (3, 5)]
    records += [{"solver": s, "afs": True, "nfe": 5, "rmse": 0.1, "predictor": "p"}
                for s in ("AMED-Solver", "AMED-Plugin[ipndm]", "AMED-Plugin[deis]")]
    fig = error_vs_nfe_figure(records, "t")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert len(lines) == 2 * len(DEFAULT_SOLVERS) + 3
    colour = {label.removesuffix(" +AFS"): line.get_color() for label, line in lines.items()}
    assert len(set(map(str, colour.values()))) == len(colour)  # one colour per solver, none shared
    for s in DEFAULT_SOLVERS:
        assert lines[s].get_color() == lines[s + " +AFS"].get_color()
        assert lines[s].get_linestyle() == "-" and lines[s + " +AFS"].get_linestyle() == "--"
    learned = [lines[s + " +AFS"].get_marker() for s in ("AMED-Solver", "AMED-Plugin[ipndm]", "AMED-Plugin[deis]")]

    assert len(set(learned)) == 3 and "o" not in learned and lines["euler"].get_marker() == "o"
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert legend.x0 >= fig.axes[0].get_window_extent().x1  # outside the plot, to its right
    plt.close(fig)


def test_side_by_side_title_does_not_overlap_the_first_row():
    import matplotlib.pyplot as plt

    from fewstep.demo import side_by_side_figure

    for rows in (3, 25):
        pictures = {f"row{i}": torch.zeros(8, 1, 8, 8) for i in range(rows)}
        fig = side_by_side_figure(pictures, {})
        fig.canvas.draw()
        title = fig._suptitle.get_window_extent()
        assert title.y0 > fig.axes[0].get_window_extent().y1
        assert title.y1 <= fig.bbox.y1 + 1
        plt.close(fig)


# --- hypothesis: the parsers never raise anything but their own errors ------------------------------------------

TEXT = st.one_of(st.text(max_size=40), st.from_regex(r"[0-9,\-@:=.a-z ]{0,20}", fullmatch=True),
                 st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True).map(str))


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_parsers_never_traceback(text):
    parsers = [parse_seeds, int_list, positive_int, threads_int, float_in(0, 1, high_open=True), SolverSpec.parse,
               lambda t: parse_options(t.split(",")), model_arg]
    for parse in parsers:
        try:
            parse(text)
        except (FewstepError, argparse.ArgumentTypeError):
            pass


OPTIONS = [("sample", "--seeds"), ("sample", "--nfe"), ("sample", "--rho"), ("sample", "--batch"),
           ("train", "--kimg"), ("train", "--lr"), ("train", "--scale-dir"), ("train", "--M"),
           ("bench", "--nfe"), ("bench", "--n"), ("bench", "--first-seed"), ("demo", "--amed-nfe"),
           ("fid", "--threads"), ("analyze", "--num-steps"), ("solvers", "--threads")]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(OPTIONS), TEXT)
def test_command_line_parsing_never_tracebacks(option, text):
    command, flag = option
    extra = {"sample": ["--out", "o"], "train": ["--out", "o"], "analyze": ["--out", "o"]}.get(command, [])
    try:
        build_parser().parse_args([command, *extra, f"{flag}={text}"])
    except SystemExit as e:
        assert e.code == 2
