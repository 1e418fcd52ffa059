"""Learned cards and AMED predictors on flow models: zero corrections are the base, the final step to 0 is
counted, the frame is recorded and a card or predictor is refused on the other kind of model."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep.amed.checkpoint import CheckpointError, load_checkpoint
from fewstep.amed.train import TrainConfig, train
from fewstep.learned import LearnedSolver
from fewstep.learned.card import CardError, load_card
from fewstep.learned.train import CardParameters, LearnConfig, learn
from fewstep.models import load_model

GRID = fewstep.get_schedule("flow:shift=3", 6, 1e-3, 1.0)


@pytest.mark.parametrize("base", ["euler", "ipndm", "deis", "dpmpp", "unipc"])
@pytest.mark.parametrize("afs", [False, True])
def test_zero_card_is_its_base_from_t1(base, afs):
    model = load_model("gmm-flow")
    noise = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    n = len(GRID) - 1
    zeros = torch.zeros(n, 3, dtype=torch.float64)
    card = LearnedSolver(base, {}, GRID, afs, torch.zeros(n, dtype=torch.float64), zeros, zeros)
    plain = fewstep.sample(model.denoiser, noise, base, GRID, afs=afs)
    assert torch.equal(fewstep.sample(model.denoiser, noise, card), plain)


def test_a_flow_card_learns_its_last_point_from_t_min():
    """The run ends with D(x, t_N): a flow card learns t_N = t_min·(t_{N−1}/t_min)^e (docs/maths.md, "Learned
    global solvers"), e = 0 at the start (the initial grid), with a gradient there; EDM cards keep σ_min."""
    params = CardParameters(GRID, ("steps",), 3, afs=False, free_end=True)
    torch.testing.assert_close(params.grid(), GRID, rtol=1e-12, atol=0)  # interior: through log and softmax
    assert params.grid()[-1] == GRID[-1] and params.grid()[0] == 1.0
    (params.grid()[-1] * 1.0).backward()
    assert params.end.grad is not None and params.end.grad > 0
    with torch.no_grad():
        params.end.fill_(0.5)
    last = params.grid()[-1]
    torch.testing.assert_close(last, GRID[-1] * (GRID[-2] / GRID[-1]) ** 0.5, rtol=1e-12, atol=0)
    with torch.no_grad():
        params.end.fill_(3.0)  # clamped below t_{N−1}: the grid stays strictly decreasing
    assert params.grid()[-1] < params.grid()[-2]
    assert CardParameters(GRID, ("steps",), 3, afs=False).end is None


@pytest.fixture(scope="module")
def flow_card(tmp_path_factory):
    out = tmp_path_factory.mktemp("card")
    cfg = LearnConfig(base="unipc", nfe=4, afs=True, params=("steps", "offsets", "coeffs", "mean"), pairs=64,
                      val_pairs=32, iters=6, batch=32, teacher_steps=200)
    learn(load_model("gmm-flow"), cfg, out, progress=False)
    return out


def test_flow_card_counts_the_final_step_and_records_its_frame(flow_card):
    assert load_card(flow_card).sigmas[-1] > 1e-3  # its last point moved up from t_min
    model = load_model("gmm-flow")
    card = load_card(flow_card, model)
    assert card.frame.name == "flow" and card.model["frame"] == "flow"
    assert card.num_steps == 5 and card.nfe == 4  # 4 intervals, AFS saves one, the step to 0 adds one
    assert card.sigmas[0] == 1.0
    calls = []

    def counted(x, t):
        calls.append(float(t[0]))
        return model.denoiser(x, t)

    counted.frame = model.frame
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    fewstep.sample(counted, noise, card.solver())
    assert len(calls) == card.nfe


def test_flow_card_is_refused_on_an_edm_model(flow_card):
    with pytest.raises(CardError, match="flow-matching model"):
        load_card(flow_card, load_model("gmm"))


def test_amed_on_a_flow_model(tmp_path):
    model = load_model("gmm-flow")
    cfg = TrainConfig(student="ipndm", num_steps=4, afs=True, schedule="polynomial", rho=7.0, teacher="heun", M=1,
                      kimg=0.064, batch=32)
    train(model, cfg, out=tmp_path, progress=False)
    predictor, settings = load_checkpoint(tmp_path, model)
    assert settings.frame == "flow" and settings.nfe == 2 * 3 - 1 + 1  # AMED-Plugin: 2 per interval, AFS, final
    x = fewstep.sample(model.denoiser, torch.randn(4, 1, 8, 8, dtype=torch.float64),
                       settings.solver(predictor, model.bottleneck), settings.schedule_tensor(), afs=True)
    assert torch.isfinite(x).all()
    with pytest.raises(CheckpointError, match="flow model"):
        load_checkpoint(tmp_path, load_model("gmm"))
