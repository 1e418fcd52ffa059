"""The seed registry (fewstep.seeds): every purpose's seeds in one named range, no accepted run seed or count can
leave its range (so nothing trains on the seeds a benchmark measures on), the numbers fewstep always used are kept,
runs record the ranges they used, and the commands refuse the rest with one line naming the option."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fewstep import seeds as S
from fewstep.cli import main
from fewstep.models import load_model

GMM = load_model("gmm")
RUN_RANGES = [r for r in S.RANGES.values() if r.runs > 1]


def test_every_accepted_run_of_every_range_is_disjoint_from_all_others():
    """Exhaustive: the whole block of every accepted run seed of every range (the most seeds one run may take;
    any accepted count is a prefix of it) lies in one period inside its range's window, and no two blocks share a
    seed: no accepted value reaches another range, nor another run's seeds."""
    blocks = []
    for r in S.RANGES.values():
        for run in range(r.runs):
            span = r.seeds(r.block, run)
            blocks.append((span.start, span.stop))
            assert span.start // S.PERIOD == (span.stop - 1) // S.PERIOD
            assert span.start % S.PERIOD in r.window and (span.stop - 1) % S.PERIOD in r.window
    blocks.sort()
    assert all(stop <= start for (_, stop), (start, _) in zip(blocks, blocks[1:]))
    assert len(blocks) == sum(r.runs for r in S.RANGES.values())


def test_the_windows_of_the_ranges_do_not_overlap():
    windows = sorted((r.window.start, r.window.stop) for r in S.RANGES.values())
    assert all(stop <= start for (_, stop), (start, _) in zip(windows, windows[1:]))
    assert windows[-1][1] <= S.PERIOD and S.EVALUATION.window.start == 0


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(S.RANGES.values())), st.data())
def test_accepted_seeds_belong_to_their_range(seed_range, data):
    run = data.draw(st.integers(0, seed_range.runs - 1))
    count = data.draw(st.integers(1, seed_range.block))
    span = seed_range.seeds(count, run)
    inside = data.draw(st.integers(span.start, span.stop - 1))
    assert {S.owner(span.start), S.owner(inside), S.owner(span.stop - 1)} == {seed_range.name}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(S.RANGES.values())), st.integers(-10**12, 10**12), st.integers(-10**9, 10**9))
def test_every_other_run_seed_or_count_is_refused(seed_range, run, count):
    accepted = 0 <= run < seed_range.runs and 0 <= count <= seed_range.block
    try:
        span = seed_range.seeds(count, run)
    except S.SeedError:
        assert not accepted
    else:
        assert accepted and len(span) == count


def test_the_numbers_fewstep_always_used():
    assert S.EVALUATION.seeds(512) == range(512)
    assert S.AMED_TRAINING.seeds(10_000, 0) == range(1_000_000, 1_010_000)
    assert S.AMED_TRAINING.seeds(8, 7).start == 1_000_000 + 7 * 10_000_000
    assert S.GITS_WARMUP.seeds(256) == range(2_000_000, 2_000_256)
    assert S.CARD_TRAINING.seeds(512, 0) == range(3_000_000, 3_000_512)
    assert S.CARD_TRAINING.seeds(512, 9).start == 3_900_000
    assert S.VALIDATION.seeds(128) == range(4_000_000, 4_000_128)


def test_cards_and_checkpoints_record_their_ranges(tmp_path):
    from fewstep.amed.train import TrainConfig, train
    from fewstep.learned.train import LearnConfig, learn

    card = learn(GMM, LearnConfig(nfe=2, pairs=4, val_pairs=2, iters=1, batch=4, teacher_steps=10, seed=3),
                 progress=False)
    assert card.training["seeds"] == {"training": {"range": "card-training", "run": 3, "first": 3_300_000, "count": 4},
                                      "validation": {"range": "validation", "first": 4_000_000, "count": 2}}
    _, settings_, _ = train(GMM, TrainConfig(batch=4, kimg=0.008, afs=True, seed=2), progress=False)
    assert settings_.training["seeds"] == {"training": {"range": "amed-training", "run": 2, "first": 21_000_000,
                                                        "count": 8}}
    _, pooled, _ = train(GMM, TrainConfig(batch=4, kimg=0.008, afs=True, pool=6), progress=False)
    assert pooled.training["seeds"]["training"]["count"] == 6


BAD = {
    "learn --seed -30 (evaluation seeds before)": (["learn", "--seed=-30"], ["--seed", "0…9"]),
    "learn --seed 10 (validation seeds before)": (["learn", "--seed", "10"], ["--seed", "0…9"]),
    "learn --pairs beyond the run's block": (["learn", "--pairs", "100001"], ["--pairs", "at most 100000"]),
    "learn --val-pairs beyond validation": (["learn", "--val-pairs", "1000001"], ["--val-pairs", "at most 1000000"]),
    "train --seed -1": (["train", "--seed=-1"], ["--seed", "0…999999"]),
    "train --seed 1000000": (["train", "--seed", "1000000"], ["--seed", "0…999999"]),
    "train --kimg beyond the run's block": (["train", "--kimg", "1001", "--batch", "1000"], ["--kimg", "1000000"]),
    "train --pool beyond the run's block": (["train", "--pool", "1000001"], ["--pool", "at most 1000000"]),
    "tune --pairs beyond a run's block": (["tune", "--pairs", "100001"], ["--pairs", "at most 100000"]),
    "tune --n beyond evaluation": (["tune", "--n", "1000001"], ["--n", "at most 1000000"]),
    "gits --warmup beyond warm-up": (["gits", "--nfe", "4", "--warmup", "1000001"], ["--warmup", "at most 1000000"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_seed_outside_its_range_is_one_clear_line(case, tmp_path, capsys):
    argv, needles = BAD[case]
    out = tmp_path / "out"
    try:
        rc = main([*argv[:1], "--model", "gmm", *argv[1:], "--out", str(out), "--no-progress"])
    except SystemExit as e:  # refused by the parser
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not out.exists() or not any(out.iterdir())
