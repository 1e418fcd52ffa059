"""Memory-bounded fitting of cards and AMED predictors (micro-batches, activation checkpointing, a frozen network),
teacher pairs in resumable shards, the cost plan printed before a run (and --dry-run), and cards / predictors that
record what they were fitted at and sample at another size with a warning."""

import dataclasses
import json
import math

import pytest
import torch

from fewstep.amed.checkpoint import CheckpointError, SamplingSettings
from fewstep.amed.train import TrainConfig, train
from fewstep.cli import main
from fewstep.learned import Card, CardError
from fewstep.learned.pairs import _legacy_path, teacher_pairs
from fewstep.learned.train import LearnConfig, learn, learn_plan
from fewstep.memory import MemoryPlan, networks
from fewstep.models import load_model
from fewstep.models.registry import ModelInfo
from fewstep.seeds import CARD_TRAINING
from fewstep.shards import ShardStore
from fewstep.training import Trainer


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / a.norm())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------------------- the same card or predictor

def test_card_on_digits_does_not_depend_on_micro_batches_or_checkpointing(cache):
    """The shipped U-Net: micro-batch = batch without checkpointing vs micro-batches of 2 with it; checkpointing
    alone is bit-exact, micro-batches change the network's float32 batching (≈ 1e-7 per call) and nothing else."""
    digits = load_model("digits")
    flags = [p.requires_grad for net in networks(digits) for p in net.parameters()]
    cfg = LearnConfig(base="dpmpp", nfe=3, afs=True, pairs=12, val_pairs=4, iters=2, batch=6, teacher_steps=8)
    plain = learn(digits, cfg, progress=False, memory=MemoryPlan(6, False))
    recomputed = learn(digits, cfg, progress=False, memory=MemoryPlan(0, True))
    bounded = learn(digits, cfg, progress=False, memory=MemoryPlan(2, True))
    for key in ("sigmas", "offsets", "coeffs"):
        assert getattr(recomputed, key) == getattr(plain, key), key
        assert relative(getattr(plain, key), getattr(bounded, key)) <= 1e-6, key
    assert bounded.training["val_rmse"] == pytest.approx(plain.training["val_rmse"], rel=1e-6)
    assert plain.model["dtype"] == "float32" and plain.model["shape"] == [1, 16, 16]
    # the network was frozen for the fit and left as it was
    assert [p.requires_grad for net in networks(digits) for p in net.parameters()] == flags
    assert all(p.grad is None for net in networks(digits) for p in net.parameters())


def test_amed_on_digits_does_not_depend_on_micro_batches_or_checkpointing(cache, tmp_path):
    """AMED-Solver on the U-Net (bottleneck features read through the forward hook while its calls are
    recomputed): predictor, Adam's first moment (which a wrong micro-batch weight would scale) and the loss agree
    to round-off after 2 iterations. (Adam normalises each entry by its own RMS, so the float32 noise of the
    features, ~1e-7, reaches the weights as ~1e-3 of the step: at lr 1e-3 that is ~1e-7 of the weights.)"""
    digits = load_model("digits")
    cfg = TrainConfig(num_steps=3, batch=6, kimg=0.012, pool=6, lr=1e-3)
    plain, _, stats = train(digits, cfg, out=tmp_path / "plain", progress=False)
    bounded, settings, bounded_stats = train(digits, cfg, out=tmp_path / "bounded", progress=False,
                                             memory=MemoryPlan(2, True))
    flat = lambda m: torch.cat([v.reshape(-1) for v in m.state_dict().values()])  # noqa: E731
    assert relative(flat(plain), flat(bounded)) <= 1e-6
    states = [torch.load(tmp_path / name / "train_state.pt", weights_only=False) for name in ("plain", "bounded")]
    for a, b in zip(states[0]["optimizer"]["state"].values(), states[1]["optimizer"]["state"].values(), strict=True):
        assert relative(a["exp_avg"], b["exp_avg"]) <= 1e-5
    assert bounded_stats["loss_last"] == pytest.approx(stats["loss_last"], rel=1e-6)
    assert settings.model_dtype == "float32"
    assert settings.training["micro_batch"] == 2 and settings.training["checkpoint"]


class Counting:
    """A denoiser that records the batch size of every call."""

    def __init__(self, denoiser):
        self.denoiser, self.rows = denoiser, []

    def __call__(self, x, sigma):
        self.rows.append(x.shape[0])
        return self.denoiser(x, sigma)


def test_the_plan_counts_every_model_call_and_micro_batches_bound_them(cache):
    """The model calls (rows through the network) of `learn` are the plan's, recomputations included, and no
    call sees more than the micro-batch."""
    gmm = load_model("gmm")
    counting = Counting(gmm.denoiser)
    model = dataclasses.replace(gmm, name="gmm-counted", denoiser=counting)
    cfg = LearnConfig(base="dpmpp", nfe=3, afs=True, pairs=8, val_pairs=4, iters=3, batch=4, teacher_steps=12)
    memory = MemoryPlan(2, True)
    plan = learn_plan(model, cfg, memory)
    learn(model, cfg, progress=False, memory=memory)
    assert sum(counting.rows) == sum(c.forward + c.recompute for c in plan.lines)
    assert max(counting.rows) == 2
    assert learn_plan(model, cfg, memory).lines[0].forward == 0  # the pairs are cached now
    assert "recomputed" in plan.text() and "2 samples × 1 model call" in plan.text()


# ----------------------------------------------------------------------------------------------------- teacher pairs

def test_shards_resume_after_a_kill_are_shared_and_merged(cache):
    store = ShardStore("pairs", {"what": "test"}, (2,))
    calls = []

    def compute(seeds, fail_at=0):
        calls.append(list(seeds))
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return torch.tensor(seeds, dtype=torch.float64)[:, None].repeat(1, 2)

    with pytest.raises(KeyboardInterrupt):  # killed in the third chunk: the first two are on disk
        store.fill(range(100, 110), lambda s: compute(s, fail_at=3), chunk=3)
    assert store.present() == set(range(100, 106))
    calls.clear()
    store.fill(range(100, 110), compute, chunk=3)
    assert calls == [[106, 107, 108], [109]]
    assert sorted(p.name for p in store.folder.glob("*.safetensors")) == ["100-10.safetensors"]
    assert torch.equal(store.view(range(100, 110)).take([9, 0])[:, 0], torch.tensor([109.0, 100.0]))
    calls.clear()
    store.fill(range(100, 112), compute, chunk=3)  # a larger request computes only the new seeds
    assert calls == [[110, 111]]
    assert json.loads((store.folder / "key.json").read_text()) == {"what": "test"}


def test_a_killed_learn_keeps_its_teacher_shards(cache):
    gmm = load_model("gmm")
    cfg = LearnConfig(base="dpmpp", nfe=3, afs=True, pairs=6, val_pairs=2, iters=1, batch=6, teacher_steps=12)
    asked = []

    def bind(seeds, fail_at=0):
        asked.append(list(seeds))
        if len(asked) == fail_at:
            raise KeyboardInterrupt
        return gmm.denoiser

    with pytest.raises(KeyboardInterrupt):
        learn(gmm, cfg, progress=False, bind=lambda s: bind(s, fail_at=2), memory=MemoryPlan(2, False))
    first = CARD_TRAINING.first()
    asked.clear()
    learn(gmm, cfg, progress=False, bind=bind, memory=MemoryPlan(2, False))
    assert asked[:2] == [[first + 2, first + 3], [first + 4, first + 5]]  # the first chunk was not solved again


def test_pairs_cached_by_earlier_versions_are_read(cache):
    gmm = load_model("gmm")
    cfg = LearnConfig(teacher_steps=12, frame="edm")
    seeds = list(CARD_TRAINING.seeds(5))
    old = torch.randn(5, *gmm.shape, dtype=torch.float64)
    path = _legacy_path(gmm, seeds, cfg)
    path.parent.mkdir(parents=True)
    from safetensors.torch import save_file
    save_file({"x": old}, str(path))

    def refuse(seeds):
        raise AssertionError("the teacher ran")

    assert torch.equal(teacher_pairs(gmm, seeds, cfg, refuse), old)
    assert torch.equal(teacher_pairs(gmm, seeds[1:3], cfg, refuse), old[1:3])  # moved into the shard store


# ------------------------------------------------------------------------------------------- plans, ETA, bad input

def test_dry_run_prints_the_plan_and_writes_nothing(cache, tmp_path, capsys):
    common = ["--model", "gmm", "--no-progress", "--dry-run", "--micro-batch", "4", "--activation-checkpointing"]
    out = tmp_path / "card"
    assert main(["learn", "--nfe", "3", "--afs", "--pairs", "16", "--val-pairs", "8", "--iters", "10", "--batch",
                 "8", "--teacher-steps", "20", "--out", str(out), *common]) == 0
    text = capsys.readouterr().out
    assert "plan: learn dpmpp NFE 3 on gmm (micro-batch 4, activation checkpointing)" in text
    assert "912 forward" in text  # 24 pairs × 38 calls (Heun on 20 points: 19 intervals × 2)
    assert "240 forward + 240 backward + 240 recomputed" in text  # 10 iterations × 8 × 3 calls
    assert main(["train", "--num-steps", "3", "--batch", "8", "--kimg", "0.032", "--pool", "16", *common]) == 0
    assert "teacher pool" in capsys.readouterr().out
    assert main(["tune", "--nfe", "3", "--pairs", "16", "--iters", "5", "--out", str(tmp_path / "tune"),
                 *common]) == 0
    assert "NFE 3 training (at most)" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "tune").exists() and not cache.exists()


def test_the_trainer_logs_an_eta_once_the_first_iterations_are_timed():
    w = torch.nn.Linear(2, 1)
    lines = []
    trainer = Trainer(w, torch.optim.SGD(w.parameters(), lr=0.1), 6, 2, seed=0, items=4, progress=False,
                      log=lines.append)

    def step(it, mine):
        w(torch.ones(len(mine), 2)).sum().backward()
        from fewstep.training import Step
        return Step(0.0)

    trainer.run(step)
    assert len(lines) == 1 and "per iteration over the first 3" in lines[0] and "for the 3 left" in lines[0]


@pytest.mark.parametrize("args,needles", [
    (["--micro-batch", "0"], ["--micro-batch", ">= 1"]),
    (["--micro-batch", "9"], ["--micro-batch 9 is larger than the batch (8)"]),
])
def test_bad_micro_batch_is_one_line(cache, tmp_path, capsys, args, needles):
    for command in (["learn", "--pairs", "8", "--iters", "1", "--out", str(tmp_path / "c")],
                    ["train", "--kimg", "0.008", "--out", str(tmp_path / "a")]):
        try:
            rc = main([*command, "--model", "gmm", "--batch", "8", *args])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert all(n in err for n in needles), err
    assert not (tmp_path / "c").exists() and not (tmp_path / "a").exists()


def test_an_unwritable_cache_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "afile" / "cache"))
    rc = main(["learn", "--model", "gmm", "--pairs", "8", "--iters", "1", "--batch", "4", "--teacher-steps", "10",
               "--out", str(tmp_path / "card"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "$FEWSTEP_CACHE" in err
    assert not (tmp_path / "card").exists()


# ------------------------------------------------------------------------------------ fit on a GPU, sample anywhere

def pipeline_model(height: int, folder_fingerprint: str = "F") -> ModelInfo:
    return ModelInfo(f"diffusers:/p?height={height}&width={height}", lambda x, s: x, (4, height // 8, height // 8),
                     fingerprint=f"fp{height}", record={"folder_fingerprint": folder_fingerprint})


def fitted_card(**extra) -> Card:
    model = {"name": "diffusers:/p?height=64&width=64&dtype=fp16", "shape": [4, 8, 8], "fingerprint": "fp64",
             "weights": "F", "dtype": "float16", "device": "cuda:0", "frame": "edm"}
    return Card(base="dpmpp", base_options={}, afs=True, sigmas=[80.0, 1.0, 0.002], offsets=[0.0, 0.0], model=model,
                **extra)


def test_a_card_samples_at_another_size_with_a_warning():
    with pytest.warns(UserWarning, match=r"at 4×8×8 \(float16\); sampling 4×12×12"):
        fitted_card().check_model(pipeline_model(96))
    fitted_card().check_model(pipeline_model(64))  # same size, other dtype and device: silent
    with pytest.raises(CardError, match="other weights"):
        fitted_card().check_model(pipeline_model(64, folder_fingerprint="G"))
    with pytest.raises(CardError, match="learned for model"):  # a learned AFS shift is of one size
        fitted_card(afs_shift=[0.0] * 256).check_model(pipeline_model(96))
    with pytest.raises(CardError, match="learned for model"):
        fitted_card().check_model(dataclasses.replace(pipeline_model(64), name="diffusers:/other?height=64"))


def test_a_predictor_samples_at_another_size_with_a_warning():
    settings = SamplingSettings(model="diffusers:/p?height=64&width=64", model_shape=[4, 8, 8], num_steps=3,
                                student="amed", student_options={}, schedule="polynomial", rho=7.0, sigma_min=0.002,
                                sigma_max=80.0, afs=False, scale_dir=0.01, scale_time=0.0, teacher="heun", M=1,
                                model_fingerprint="fp64", model_weights="F", model_dtype="float16")
    with pytest.warns(UserWarning, match="sampling 4×16×16"):
        settings.check_model(pipeline_model(128))
    with pytest.raises(CheckpointError, match="other weights"):
        settings.check_model(pipeline_model(64, folder_fingerprint="G"))
    assert math.isfinite(settings.nfe)


def test_a_pipeline_card_with_micro_batches_is_the_same_card_and_beats_its_base(cache, tmp_path, capsys):
    """A tiny Stable Diffusion folder (`diffusers:DIR`, prompts, guidance) through the command line: the card fitted
    with micro-batches and activation checkpointing is the card fitted without them up to round-off, and it beats
    its base solver on the pipeline's own teacher pairs (validation)."""
    pytest.importorskip("diffusers")
    import warnings

    from test_diffusers_dir import PROMPTS, build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = build("sd", tmp_path)
        pipe.save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["learn", "--model", f"diffusers:{tmp_path / 'sd'}", "--prompts", str(tmp_path / "prompts.txt"),
              "--guidance", "2", "--nfe", "3", "--afs", "--pairs", "8", "--val-pairs", "4", "--iters", "4",
              "--batch", "4", "--teacher-steps", "12", "--no-progress"]
    cards = {}
    for name, extra in (("plain", []), ("bounded", ["--micro-batch", "2", "--activation-checkpointing"])):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        cards[name] = json.loads((tmp_path / name / "card.json").read_text())
    for key in ("sigmas", "offsets", "coeffs"):
        assert relative(cards["plain"][key], cards["bounded"][key]) <= 1e-6, key
    t = cards["plain"]["training"]
    assert t["val_rmse"] < t["val_rmse_initial"]
    assert cards["bounded"]["model"]["dtype"] == "float32" and cards["bounded"]["model"]["weights"]
