"""The training harness (fewstep.training.Trainer) that AMED predictors and learned cards share: the data order,
resume (the same numbers as one uninterrupted run), Ctrl-C and SIGTERM saving the finished iterations, non-finite
gradients set to 0, refusal of another run's state, and the best validated state kept."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fewstep.signals import Terminated
from fewstep.training import Step, Trainer, TrainingStateError, epoch_batch

X = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3


def trainer(tmp_path=None, iterations=6, validate=None, identity=None) -> Trainer:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1, dtype=torch.float64)
    return Trainer(module, torch.optim.Adam(module.parameters(), lr=0.05), iterations, 4, seed=7, items=len(X),
                   state_path=None if tmp_path is None else tmp_path / "state.pt",
                   identity=identity or {"config": {"lr": 0.05}}, checkpoint_every=2, validate=validate,
                   progress=False)


def regression(t: Trainer, interrupt_at: int | None = None, interrupt=KeyboardInterrupt):
    def step(it: int, mine: torch.Tensor) -> Step:
        if it == interrupt_at:
            raise interrupt()
        loss = (t.module(X[mine]).squeeze(1) - Y[mine]).pow(2).mean()
        loss.backward()
        return Step(float(loss.detach()))

    return step


def test_every_epoch_is_a_fresh_permutation_of_every_item():
    for epoch in range(3):
        seen = torch.cat([epoch_batch(12, 4, 7, epoch * 3 + k) for k in range(3)])
        assert sorted(seen.tolist()) == list(range(12))
    assert not torch.equal(epoch_batch(12, 4, 7, 0), epoch_batch(12, 4, 7, 3))
    assert torch.equal(epoch_batch(12, 4, 7, 4), epoch_batch(12, 4, 7, 4))  # a function of the iteration alone
    assert torch.equal(trainer().batch_indices(1), epoch_batch(12, 4, 7, 1))


def test_resume_after_an_interrupt_gives_the_uninterrupted_run(tmp_path):
    whole = trainer()
    whole.resume()
    whole.run(regression(whole))

    first = trainer(tmp_path)
    first.resume()
    with pytest.raises(KeyboardInterrupt):
        first.run(regression(first, interrupt_at=3))
    assert torch.load(tmp_path / "state.pt", weights_only=False)["iteration"] == 3  # saved on the interrupt

    again = trainer(tmp_path)
    assert again.resume() and again.start == 3
    again.run(regression(again))
    assert again.history == whole.history  # bit for bit: data order, optimizer state and curve all resumed
    for a, b in zip(again.module.parameters(), whole.module.parameters()):
        assert torch.equal(a, b)


def test_sigterm_saves_like_ctrl_c(tmp_path):
    t = trainer(tmp_path)
    t.resume()
    previous = signal.getsignal(signal.SIGTERM)

    def sigterm() -> BaseException:
        os.kill(os.getpid(), signal.SIGTERM)  # raised as Terminated by the harness's handler
        return AssertionError("SIGTERM was not delivered")

    with pytest.raises(Terminated):
        t.run(regression(t, interrupt_at=3, interrupt=sigterm))
    assert torch.load(tmp_path / "state.pt", weights_only=False)["iteration"] == 3
    assert signal.getsignal(signal.SIGTERM) == previous  # the harness restores the handler it replaced


def test_an_interrupt_inside_the_update_keeps_the_last_checkpoint(tmp_path):
    t = trainer(tmp_path)
    t.resume()

    class Breaks:
        def step(self) -> None:
            if t.history and len(t.history) == 2:  # the 3rd update, after the checkpoint at 2
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        t.run(regression(t), scheduler=Breaks())
    assert torch.load(tmp_path / "state.pt", weights_only=False)["iteration"] == 2


def test_non_finite_gradients_are_set_to_zero():
    t = trainer(iterations=1)
    before = [p.detach().clone() for p in t.module.parameters()]

    def step(it: int, mine: torch.Tensor) -> Step:
        t.module.weight.grad = torch.tensor([[float("nan"), float("inf"), 1.0]], dtype=torch.float64)
        t.module.bias.grad = torch.tensor([-float("inf")], dtype=torch.float64)
        return Step(0.0)

    t.run(step)
    weight, bias = t.module.weight.detach(), t.module.bias.detach()
    assert torch.equal(weight[0, :2], before[0][0, :2]) and torch.equal(bias, before[1])  # zero gradient: no move
    assert weight[0, 2] < before[0][0, 2]  # the finite entry took its step


def test_another_runs_state_is_refused_naming_what_differs(tmp_path):
    t = trainer(tmp_path)
    t.resume()
    t.run(regression(t))
    with pytest.raises(TrainingStateError, match=r"another training run \(different config.lr\)"):
        trainer(tmp_path, identity={"config": {"lr": 0.1}}).resume()
    (tmp_path / "state.pt").write_bytes(b"\x80garbage")
    with pytest.raises(TrainingStateError, match="corrupt"):
        trainer(tmp_path).resume()


def test_the_best_validated_state_is_kept(tmp_path):
    values = iter([5.0, 3.0, 1.0, 2.0, 4.0])  # initial, then the checkpoints at iterations 2, 4, 6, 8
    t = trainer(tmp_path, iterations=8, validate=lambda: next(values))
    snapshots = {}
    t.resume()
    step = regression(t)

    def recording(it: int, mine: torch.Tensor) -> Step:
        snapshots[it] = {k: v.clone() for k, v in t.module.state_dict().items()}  # the state before update `it`
        return step(it, mine)

    t.run(recording)
    assert t.best["val"] == 1.0 and t.best["iteration"] == 4 and t.initial_val == 5.0
    assert t.val_curve == [(2, 3.0), (4, 1.0), (6, 2.0), (8, 4.0)]
    for k, v in t.module.state_dict().items():
        assert torch.equal(v, snapshots[4][k])  # the module holds the state after 4 updates


def test_a_time_limit_stops_after_at_least_one_iteration_and_checkpoints(tmp_path):
    t = trainer(tmp_path, validate=lambda: 1.0)
    t.resume()
    t.run(regression(t), time_limit=-1.0)  # already over: one iteration, then the final checkpoint
    assert len(t.history) == 1 and t.val_curve == [(1, 1.0)]
    assert torch.load(tmp_path / "state.pt", weights_only=False)["iteration"] == 1
