"""Conditions and guidance (docs/maths.md, "Conditions and guidance"; fewstep.conditioning): per-sample conditions, CFG and
classifier guidance, recorded and checked specs, CLI errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fewstep
from fewstep.cli import main
from fewstep.conditioning import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    ConditionSpec,
    bind,
    check_conditions,
    conditioned_model,
    conditions_for_seeds,
    parse_classes,
    resolve,
)
from fewstep.errors import ConditionError
from fewstep.models import load_model
from fewstep.models.registry import ModelInfo
from fewstep.models.unet import DEFAULT_CONFIG, DigitsUNet, load_unet
from fewstep.noise import seeded_noise
from fewstep.schedules import get_schedule

TINY = {**DEFAULT_CONFIG, "channels": [8, 16], "emb_dim": 16, "num_freqs": 4, "groups": 4, "num_classes": 10}


def tiny_cond_model() -> ModelInfo:
    torch.manual_seed(0)
    net = DigitsUNet(TINY)
    with torch.no_grad():  # random weights everywhere (zero-initialised layers too), so that classes matter
        for p in net.parameters():
            p.normal_(0, 0.3)
    net.eval().requires_grad_(False)
    return ModelInfo("tiny-cond", net, net.shape, bottleneck=net.bottleneck, num_classes=10, cond_denoiser=net)


def factory() -> ModelInfo:
    """`--model tests/test_conditioning.py:factory` in the CLI tests."""
    return tiny_cond_model()


def test_unconditional_model_is_bit_exact():
    model = load_model("gmm")
    assert bind(model, None, 1.0) is model.denoiser
    assert conditioned_model(model, ConditionSpec(), [0, 1, 2]) is model
    _, spec = resolve(model)
    assert not spec.conditional and conditions_for_seeds(spec, [0, 1]) is None
    sched = get_schedule("polynomial", 6, 0.002, 80.0)
    noise = seeded_noise([0, 1, 2], model.shape)
    a = fewstep.sample(model.denoiser, noise, "deis", sched)
    b = fewstep.sample(conditioned_model(model, spec, [0, 1, 2]).denoiser, noise, "deis", sched)
    assert torch.equal(a, b)
    # the U-Net gained an optional class embedding; the shipped unconditional net has none and ignores nothing
    net = load_unet()
    assert net.num_classes == 0 and not hasattr(net, "class_embed")
    with pytest.raises(fewstep.FewstepError):
        net(torch.zeros(2, 1, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long))


def test_unconditional_model_refuses_conditions():
    model = load_model("gmm")
    with pytest.raises(ConditionError, match="unconditional"):
        resolve(model, classes="3")
    with pytest.raises(ConditionError, match="unconditional"):
        resolve(model, guidance=2.0)
    with pytest.raises(ConditionError, match="conditional"):
        conditioned_model(tiny_cond_model(), ConditionSpec(), [0])


def test_conditions_per_seed_independent_of_batching():
    spec = ConditionSpec("classes", tuple(range(10)), "uniform", 2.0)
    seeds = list(range(40))
    all_ = conditions_for_seeds(spec, seeds)
    parts = torch.cat([conditions_for_seeds(spec, seeds[i:i + 7]) for i in range(0, 40, 7)])
    assert torch.equal(all_, parts) and len(set(all_.tolist())) > 5
    cyc = ConditionSpec("classes", (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), "cycle")
    assert conditions_for_seeds(cyc, [13, 0, 29]).tolist() == [3, 0, 9]


def test_mixed_batch_equals_one_class_at_a_time():
    model = tiny_cond_model()
    spec = ConditionSpec("classes", (1, 4, 7), "cycle", 2.0)
    seeds = [0, 1, 2, 3, 4]
    sched = get_schedule("polynomial", 5, 0.002, 80.0)
    mixed = fewstep.sample(conditioned_model(model, spec, seeds).denoiser, seeded_noise(seeds, model.shape),
                           "deis", sched)
    for i, s in enumerate(seeds):
        one = ConditionSpec("classes", ((1, 4, 7)[s % 3],), "cycle", 2.0)
        alone = fewstep.sample(conditioned_model(model, one, [s]).denoiser, seeded_noise([s], model.shape),
                               "deis", sched)
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # the classes do change the samples


def test_cfg_equals_formula_with_one_call():
    calls = []

    def d3(x, sigma, c):
        calls.append(x.shape[0])
        return x * (c.to(x.dtype) + 1)[:, None] / (1 + sigma[:, None] ** 2)

    x, s = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    c, null = torch.tensor([0, 2, 5]), torch.tensor([9])
    out = ClassifierFreeGuidance(d3, c, 3.0, null)(x, s)
    du, dc = d3(x, s, null.expand(3)), d3(x, s, c)
    calls.clear()
    torch.testing.assert_close(ClassifierFreeGuidance(d3, c, 3.0, null)(x, s), du + 3.0 * (dc - du))
    assert calls == [6]  # one doubled batch: one NFE
    calls.clear()
    torch.testing.assert_close(ClassifierFreeGuidance(d3, c, 1.0, null)(x, s), dc)
    assert calls == [3]
    assert torch.equal(out, du + 3.0 * (dc - du))


def test_classifier_guidance_equals_formula():
    torch.manual_seed(0)
    w_mat = torch.randn(5, 4)  # logits = W x / (1 + σ): ∇ log p(c|x) = (W_c − Σ_k p_k W_k) / (1 + σ)

    def clf(x, sigma):
        return x @ w_mat.T / (1 + sigma[:, None])

    den = lambda x, s: 0.5 * x
    x, s, c = torch.randn(3, 4), torch.tensor([0.3, 1.0, 4.0]), torch.tensor([0, 3, 4])
    out = ClassifierGuidance(den, clf, c, 2.0)(x, s)
    p = clf(x, s).softmax(-1)
    grad = (w_mat[c] - p @ w_mat) / (1 + s[:, None])
    torch.testing.assert_close(out, 0.5 * x + 2.0 * s[:, None] ** 2 * grad)


def test_spec_json_roundtrip_and_checks():
    spec = ConditionSpec("classes", (0, 1, 2), "uniform", 2.0)
    assert ConditionSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert ConditionSpec.from_json(None) == ConditionSpec()
    check_conditions(spec.to_json(), spec)
    with pytest.warns(UserWarning, match="guidance 2"):
        check_conditions(spec.to_json(), ConditionSpec("classes", (0, 1, 2), "uniform", 4.0))
    with pytest.raises(ConditionError, match="unconditional"):
        check_conditions(None, spec)
    with pytest.raises(ConditionError, match="unconditional"):
        check_conditions(spec.to_json(), ConditionSpec())


def test_parse_classes():
    assert parse_classes("3", 10) == [3]
    assert parse_classes("0-2,7", 10) == [0, 1, 2, 7]
    for bad in ("0-12", "a", "", "5-2", "-1"):
        with pytest.raises(ConditionError, match="--classes"):
            parse_classes(bad, 10)


def test_amed_checkpoint_records_and_checks_conditions(tmp_path):
    from fewstep.amed.checkpoint import load_checkpoint
    from fewstep.amed.train import TrainConfig, train

    model = tiny_cond_model()
    spec = ConditionSpec("classes", tuple(range(10)), "uniform", 2.0)
    cfg = TrainConfig(student="ipndm", teacher="ipndm", num_steps=3, M=1, batch=4, kimg=0.008, pool=4)
    train(model, cfg, out=tmp_path, progress=False, conditions=spec)
    raw = json.loads((tmp_path / "amed.json").read_text())
    assert raw["conditions"] == spec.to_json() and raw["guidance"] == 2.0
    _, settings = load_checkpoint(tmp_path, model)
    with pytest.warns(UserWarning, match="guidance 2"):
        check_conditions(settings.conditions, ConditionSpec("classes", tuple(range(10)), "uniform", 4.0))
    with pytest.raises(ConditionError):
        check_conditions(settings.conditions, ConditionSpec())


def test_cli_conditions(tmp_path, capsys):
    model_arg = f"{__file__}:factory"
    rc = main(["sample", "--model", model_arg, "--classes", "0-12", "--nfe", "3", "--solver", "ipndm",
               "--seeds", "0-1", "--out", str(tmp_path / "a"), "--no-progress"])
    assert rc == 2 and "out of range 0-9" in capsys.readouterr().err + capsys.readouterr().out
    rc = main(["sample", "--model", "gmm", "--class", "3", "--nfe", "3", "--seeds", "0", "--out", str(tmp_path / "b"),
               "--no-progress"])
    assert rc == 2
    rc = main(["sample", "--model", model_arg, "--prompts", str(tmp_path / "missing.txt"), "--nfe", "3",
               "--seeds", "0", "--out", str(tmp_path / "c"), "--no-progress"])
    assert rc == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["sample", "--model", model_arg, "--classes", "2,5", "--guidance", "2", "--nfe", "3",
                   "--solver", "ipndm", "--seeds", "0-3", "--out", str(tmp_path / "d"), "--no-progress"])
    assert rc == 0 and len(list((tmp_path / "d").glob("*.png"))) == 4


def test_diffusers_per_sample_prompts_equal_builtin_guidance():
    pytest.importorskip("diffusers")
    from test_integrations import pipe as pipe_fixture

    from fewstep.integrations.diffusers import DiffusersDenoiser, pipeline_model

    pipe = pipe_fixture.__wrapped__(_TmpFactory())
    prompts = ["a cat", "a dog", "an owl"]
    model = pipeline_model(pipe).with_prompts(prompts)
    assert model.num_classes == 3
    idx = torch.tensor([2, 0, 1, 0])
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.full((4,), 3.0, dtype=torch.float64)
    with torch.no_grad():
        ours = bind(model, idx, 4.0)(x, s)
        cond, uncond = pipe.encode_prompt([prompts[i] for i in idx], "cpu", 1, True, negative_prompt=[""] * 4)
        ref = DiffusersDenoiser(pipe.unet, pipe.scheduler, encoder_hidden_states=cond,
                                negative_encoder_hidden_states=uncond, guidance_scale=4.0)(x, s)
        one = bind(model, idx[:1], 4.0)(x[:1], s[:1])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:1], one, atol=1e-5, rtol=1e-4)


class _TmpFactory:
    """Stands in for pytest's tmp_path_factory when building the pipeline fixture directly."""

    def mktemp(self, name: str):
        import tempfile
        from pathlib import Path

        return Path(tempfile.mkdtemp(prefix=name))


def test_classifier_guidance_bound_on_a_model(tmp_path):
    from fewstep.models.noisy_classifier import NoisyDigitClassifier

    model = tiny_cond_model()
    model.noisy_classifier = NoisyDigitClassifier().eval().requires_grad_(False)
    x, s, c = torch.randn(3, 1, 16, 16), torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1, 2, 3])
    plain, guided_ = bind(model, c, 2.0)(x, s), bind(model, c, 2.0, classifier_scale=3.0)(x, s)
    assert guided_.shape == plain.shape and (guided_ - plain).abs().max() > 0
    with pytest.raises(ConditionError, match="classifier"):
        bind(tiny_cond_model(), c, 2.0, classifier_scale=1.0)


def test_check_artifacts_reads_recorded_conditions(tmp_path):
    from fewstep.conditioning import check_artifacts

    spec = ConditionSpec("classes", (0, 1), "uniform", 2.0)
    (tmp_path / "card.json").write_text(json.dumps({"conditions": spec.to_json()}))
    check_artifacts([tmp_path], spec)
    with pytest.raises(ConditionError):
        check_artifacts([tmp_path], ConditionSpec())


def test_edm_class_per_sample():
    from fewstep.integrations.edm import EDMDenoiser

    class FakeNet(torch.nn.Module):
        label_dim = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, sigma, labels):
            self.seen = labels
            return x

    net = FakeNet()
    EDMDenoiser(net)(torch.zeros(3, 1, 2, 2), torch.ones(3), torch.tensor([0, 3, 4]))
    assert net.seen.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]  # 4 = ∅: the zero label


def test_digits_cond_samples_are_their_class():
    from fewstep.models import load_classifier

    model = load_model("digits-cond")
    assert model.num_classes == 10 and model.noisy_classifier is not None
    spec = ConditionSpec("classes", tuple(range(10)), "cycle", 2.0)
    seeds = list(range(10))
    sched = get_schedule("polynomial", 6, 0.002, 80.0)
    x = fewstep.sample(conditioned_model(model, spec, seeds).denoiser, seeded_noise(seeds, model.shape),
                       "deis", sched)
    pred, _ = load_classifier().predict(x.float())
    assert int((pred == torch.arange(10)).sum()) >= 9
