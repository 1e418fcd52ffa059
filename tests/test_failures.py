"""Failure handling: denoiser errors and NaN/Inf name the step and σ and write nothing for that
batch; Ctrl-C (SIGINT) and SIGTERM during `sample` / `train` leave no partial files, exit with 130 / 143 and
both resume; bfloat16 models run with float32 solver maths; results do not depend on the batch size.

The interrupt tests are deterministic: the user model blocks (sleeps) at a known call once a marker file says
so, and the test sends the signal only after that marker exists. No timing assertions. The child process is
started with SIGINT ignored (as every background job of a non-interactive shell is), so the tests pass however
pytest itself was launched and prove that fewstep sets its own signal handling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.errors import DenoiserError
from fewstep.io import atomic_write
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.sampling import SampleJob, run_sample_job
from fewstep.schedules import get_schedule

REPO = Path(__file__).resolve().parents[1]

# A user model: the gmm denoiser, counting its calls. FAIL_AT=k makes call k (1-based) misbehave as MODE says;
# BLOCK_AT=k makes call k write MARKER and sleep (so that a test can interrupt the process at a known point).
MODEL = textwrap.dedent('''
    import os, time
    import torch
    from fewstep.models import load_model

    FAIL_AT, MODE, BLOCK_AT, MARKER = {fail_at}, {mode!r}, {block_at}, {marker!r}
    calls = 0

    def denoiser(x, sigma):
        global calls
        calls += 1
        if calls == BLOCK_AT and os.environ.get("FEWSTEP_TEST_BLOCK"):
            open(MARKER, "w").close()
            for _ in range(1200):  # at most 60 s; the test interrupts long before
                time.sleep(0.05)
        out = load_model("gmm").denoiser(x, sigma)
        if calls == FAIL_AT:
            if MODE == "raise":
                raise RuntimeError("boom from the model")
            out = out.clone()
            out[0, 0, 0, 0] = float("nan") if MODE == "nan" else float("inf")
        return out

    def factory():
        return {{"denoiser": denoiser, "shape": (1, 8, 8), "name": "counting-gmm"}}
''')


def user_model(tmp_path: Path, fail_at: int = 0, mode: str = "raise", block_at: int = 0) -> tuple[str, Path]:
    path = tmp_path / f"model_{mode}_{fail_at}_{block_at}.py"
    marker = tmp_path / "blocked.marker"
    path.write_text(MODEL.format(fail_at=fail_at, mode=mode, block_at=block_at, marker=str(marker)))
    return f"{path}:factory", marker


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic_write (.NAME.*.tmp) left in a folder."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


# --- denoiser failures -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,message", [("raise", "raised RuntimeError"), ("nan", "non-finite"),
                                          ("inf", "non-finite")])
def test_failing_denoiser_names_step_and_sigma_and_writes_nothing_for_that_batch(tmp_path, mode, message):
    # euler with 6 grid points: 5 calls per batch at steps 0…4; call 7 is step 1 of the second batch (seeds 4-7)
    spec, _ = user_model(tmp_path, fail_at=7, mode=mode)
    out = tmp_path / "out"
    job = SampleJob(model=spec, out=str(out), solver="euler", num_steps=6, schedule="polynomial", rho=7.0,
                    seeds="0-11", batch=4, npz=str(tmp_path / "all.npz"), grid=str(tmp_path / "grid.png"),
                    progress=False)
    with pytest.raises(DenoiserError) as err:
        run_sample_job(job)
    sigma = float(get_schedule("polynomial", 6, 0.002, 80.0, rho=7.0)[1])
    assert message in str(err.value)
    assert f"at step 1 (sigma={sigma:.6g})" in str(err.value)
    assert sorted(pngs(out)) == [f"{s:06d}.png" for s in range(4)]  # the first batch only
    assert not (tmp_path / "all.npz").exists() and not (tmp_path / "grid.png").exists()
    assert leftovers(tmp_path) == []


def test_failing_denoiser_cli_exit_code_and_message(tmp_path, capsys):
    spec, _ = user_model(tmp_path, fail_at=3, mode="nan")
    rc = main(["sample", "--model", spec, "--solver", "euler", "--num-steps", "6", "--seeds", "0-3",
               "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    text = " ".join(capsys.readouterr().err.split())
    assert "non-finite" in text and "at step 2 (sigma=" in text
    assert pngs(tmp_path / "out") == {}  # no sample (only the folder's manifest.json)



def test_atomic_write_removes_temp_file_on_keyboard_interrupt(tmp_path):
    target = tmp_path / "x.png"

    def half_then_interrupt(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_interrupt)
    assert list(tmp_path.iterdir()) == []


# --- Ctrl-C and SIGTERM ------------------------------------------------------------------------------------

SIGNALS = [pytest.param(signal.SIGINT, 130, id="ctrl-c"), pytest.param(signal.SIGTERM, 143, id="sigterm")]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a non-interactive shell starts a job


def _interrupt_when_blocked(cmd: list[str], marker: Path, env_extra: dict[str, str],
                            sig: int = signal.SIGINT) -> int:
    env = {**os.environ, "FEWSTEP_TEST_BLOCK": "1", "FEWSTEP_THREADS": "1", **env_extra}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_ignore_sigint)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"process ended before blocking:\n{proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the model never blocked")
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_interrupt_during_sample_leaves_complete_files_and_resumes(tmp_path, sig, code):
    # 3 calls per batch of 2 seeds; call 10 is the first of the 4th batch: 6 PNGs exist when SIGINT arrives
    spec, marker = user_model(tmp_path, block_at=10)
    out = tmp_path / "out"
    args = ["sample", "--model", spec, "--solver", "euler", "--num-steps", "4", "--seeds", "0-11", "--batch", "2",
            "--out", str(out), "--no-progress"]
    rc = _interrupt_when_blocked([sys.executable, "-m", "fewstep", *args], marker, {}, sig)
    assert rc == code
    done = pngs(out)
    assert sorted(done) == [f"{s:06d}.png" for s in range(6)]
    for name in done:
        Image.open(out / name).load()  # complete, readable files
    assert leftovers(tmp_path) == []

    assert main(args) == 0  # resume in-process (no blocking without FEWSTEP_TEST_BLOCK): only the rest
    assert len(pngs(out)) == 12
    fresh = tmp_path / "fresh"
    assert main([*args[:-2], str(fresh), "--no-progress"]) == 0
    assert pngs(out) == pngs(fresh)


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_interrupt_during_train_checkpoints_and_resumes(tmp_path, sig, code):
    from fewstep.amed.train import TrainConfig, train

    # calls per iteration with batch 4: measured below with a counting run, so the block point is exact
    spec, _ = user_model(tmp_path, block_at=10**9)
    cfg = TrainConfig(batch=4, kimg=0.024, afs=True)  # 6 iterations
    model = load_model(spec)
    ev_calls = []
    orig = model.denoiser
    model.denoiser = lambda x, s: (ev_calls.append(1), orig(x, s))[1]
    reference, _, _ = train(model, cfg, out=None, progress=False)
    per_iteration = len(ev_calls) // cfg.iterations
    model.denoiser = orig

    (tmp_path / "m").mkdir()
    spec, marker = user_model(tmp_path / "m", block_at=3 * per_iteration + 2)  # inside iteration 4
    out = tmp_path / "ckpt"
    args = ["train", "--model", spec, "--batch", "4", "--kimg", "0.024", "--afs", "--out", str(out), "--no-progress"]
    rc = _interrupt_when_blocked([sys.executable, "-m", "fewstep", *args], marker, {}, sig)
    assert rc == code
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["iteration"] == 3  # saved on the interrupt (the periodic checkpoint is every 50 iterations)

    assert not (out / "predictor.pt").exists() and leftovers(tmp_path) == []

    assert main(args) == 0  # resumes from iteration 3
    resumed = torch.load(out / "train_state.pt", weights_only=False)
    assert resumed["iteration"] == cfg.iterations and resumed["history"][:3] == state["history"]
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed["predictor"][k], v, rtol=1e-6, atol=1e-7)


# --- bfloat16 models, batch-size independence ----------------------------------------------------------------

class TinyNet(torch.nn.Module):
    """An EDM-preconditioned 2-layer conv net whose weights may be bfloat16; it computes in its own dtype."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 1, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1

    def forward(self, x, sigma):
        dtype = self.a.weight.dtype
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
        h = torch.cat([c_in * x, torch.log(s).expand_as(x) / 4], 1).to(dtype)
        f = self.b(torch.tanh(self.a(h)))
        return c_skip * x + c_out * f  # f (bfloat16) promotes to the solver's float32


def test_bfloat16_model_float32_solver_maths():
    net32 = TinyNet()
    net16 = TinyNet().to(torch.bfloat16)
    seen = []
    noise = seeded_noise(range(8), (1, 8, 8), torch.float32)

    def d16(x, s):
        seen.append((x.dtype, s.dtype))
        return net16(x, s)

    for solver in ("euler", "dpmpp", "ipndm", "unipc"):
        seen.clear()
        x16 = fewstep.sample(d16, noise, solver, num_steps=8)
        x32 = fewstep.sample(net32, noise, solver, num_steps=8)
        assert x16.dtype == torch.float32 and torch.isfinite(x16).all()
        assert set(seen) == {(torch.float32, torch.float32)}  # the solver hands the model float32 state and σ
        torch.testing.assert_close(x16, x32, rtol=0, atol=0.05)  # bf16 has ~3 significant digits

    # a bfloat16 denoiser output (e.g. autocast) is promoted to float32 too
    gmm = load_model("gmm").denoiser
    x = fewstep.sample(lambda x, s: gmm(x, s).to(torch.bfloat16), noise, "ipndm", num_steps=10)
    ref = fewstep.sample(gmm, noise, "ipndm", num_steps=10)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, ref, rtol=0, atol=0.05)


@pytest.mark.parametrize("model,solver", [("gmm", "ipndm"), ("gmm", "dpmpp"), ("digits", "euler")])
def test_results_independent_of_batch_size(tmp_path, model, solver):
    seeds = "0-9" if model == "gmm" else "0-4"
    runs = {}
    for batch in (3, 64):
        out = tmp_path / f"b{batch}"
        run_sample_job(SampleJob(model=model, out=str(out), solver=solver, nfe=5 if model == "gmm" else 3,
                                 seeds=seeds, batch=batch, npz=str(out / "all.npz"), progress=False))
        runs[batch] = out
    assert pngs(runs[3]) == pngs(runs[64])
    a, b = np.load(runs[3] / "all.npz"), np.load(runs[64] / "all.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["seeds"], b["seeds"])


@pytest.mark.parametrize("sig,code", SIGNALS)
def test_interrupt_during_learn_checkpoints_and_resumes(tmp_path, sig, code, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))  # no teacher pairs cached by another test
    # calls: 9 + 9 for the teacher pairs (a network's DEIS teacher on 10 points), 2 for the first validation,
    # then 2 per iteration
    spec, marker = user_model(tmp_path, block_at=9 + 9 + 2 + 2 * 3 + 1)  # inside iteration 4
    out = tmp_path / "card"
    args = ["learn", "--model", spec, "--base", "dpmpp", "--nfe", "2", "--afs", "--iters", "8", "--pairs", "4",
            "--val-pairs", "2", "--batch", "4", "--teacher-steps", "10", "--out", str(out), "--no-progress"]
    rc = _interrupt_when_blocked([sys.executable, "-m", "fewstep", *args], marker, {}, sig)
    assert rc == code
    state = torch.load(out / "learn_state.pt", weights_only=False)
    assert state["iteration"] == 3 and not (out / "card.json").exists() and leftovers(tmp_path) == []
    assert main(args) == 0  # resumes from iteration 3 and writes the card
    assert torch.load(out / "learn_state.pt", weights_only=False)["iteration"] == 8
    assert (out / "card.json").exists()
