"""`fewstep tune`: per NFE, fit the card families within a time budget and keep the best on validation pairs.

For each NFE the starting grid of each base is the schedule (of the best-classic sweep's) on which that base is
best on the *validation* pairs, so no test seed takes part in any choice. The chosen card is then measured on the
test seeds beside the best classic solver over solvers × schedules × AFS (`evaluation.bench.run_best_classic`).
It sits above both `learned` (the fitting) and `evaluation` (the yardstick), as the demo does.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .costs import CostPlan, training_cost
from .evaluation.bench import (DEFAULT_SOLVERS, best_classic_schedules, best_per_nfe, expand_schedules, markdown_table,
                               run_bench, run_best_classic)
from .io import write_json, write_text
from .learned.card import Card, save_card
from .learned.pairs import cached_count, teacher_nfe
from .learned.train import LearnConfig, card_nfe, learn, sample_error, teacher_pairs
from .memory import MemoryPlan
from .methods import SolverSpec
from .methods import ARG_SCHEDULES
from .models.registry import ModelInfo
from .noise import seeded_noise
from .schedules import get_schedule
from .seeds import CARD_TRAINING, EVALUATION, VALIDATION
from .solvers import num_steps_for_nfe, sample
from .solvers.base import Denoiser


@dataclass(frozen=True)
class Family:
    """One candidate: a base solver and the parameter families learned on it."""

    base: str
    params: tuple[str, ...]


# In order of what measured best here (README, "Learned solvers"); tune tries them while its budget lasts.
FAMILIES = (
    Family("unipc", ("steps", "offsets", "coeffs", "weights", "mean")),
    Family("dpmpp", ("steps", "offsets", "coeffs", "weights", "mean")),
    Family("deis", ("steps", "offsets", "weights", "mean")),
    Family("ipndm", ("steps", "offsets", "weights")),
)
# Tried only when asked (`tune --families`): a learned Euler (steps, offsets and multistep weights on d), for
# models whose best classic solver is Euler, as flow models' nearly straight trajectories make it, and a learned
# gradient estimation (Euler with an extrapolated direction), the best classic solver on the flow models here.
OPTIONAL_FAMILIES = (Family("euler", ("steps", "offsets", "weights", "mean")),
                     Family("gradient_estimation", ("steps", "offsets", "weights", "mean")))


def default_config(model: ModelInfo, pairs: int | None = None, iters: int | None = None) -> LearnConfig:
    """tune's training settings: 2 048 teacher pairs (the memorising digits-opt overfits 512). On a network the
    rollout is the cost and the gradient noise the limit: batches of 128 at learning rate 0.02 (the measurements
    behind this are in the README, "What was measured on the way")."""
    if model.exact:
        return LearnConfig(pairs=pairs or 2048, val_pairs=256, iters=iters or 400, lr=0.01, loss="rmse", window=3)
    return LearnConfig(pairs=pairs or 2048, val_pairs=128, iters=iters or 400, batch=128, lr=0.02, loss="rmse",
                       window=3)


def classic_label(record: dict[str, Any]) -> str:
    """A best-classic record as the tables name it, e.g. 'deis @ time_uniform(rho=2) +AFS'."""
    return f"{record['solver']} @ {record['schedule']}" + (" +AFS" if record["afs"] else "")


def best_init_schedule(model: ModelInfo, base: str, nfe: int, cfg: LearnConfig, bind: Callable[[list[int]], Denoiser],
                       targets: torch.Tensor, seeds: list[int], chunk: int | None = None) -> tuple[str, bool, float]:
    """The best-classic schedule (`best_classic_schedules`) and AFS (on or off) with which `base` has the lowest
    validation RMSE (solved in chunks of `chunk` seeds; None: all at once): the card starts there."""
    device = torch.device(getattr(model, "device", None) or "cpu")
    noise, targets = seeded_noise(seeds, model.shape, device=device), targets.to(device)
    scores = []
    for afs in (True, False):
        num_steps = num_steps_for_nfe(base, nfe, afs=afs, denoise_to_zero=model.frame.final_denoise)
        for text in best_classic_schedules(model):
            name, _, arg = text.partition(":")
            if name in ARG_SCHEDULES:
                grid = get_schedule(text, num_steps, model.sigma_min, model.sigma_max, model=model)
            else:
                grid = get_schedule(name, num_steps, model.sigma_min, model.sigma_max, rho=float(arg) if arg else None)
            step = chunk or len(seeds)
            with torch.no_grad():
                x = torch.cat([sample(bind(seeds[i : i + step]), noise[i : i + step], base, grid, afs=afs)
                               for i in range(0, len(seeds), step)])
            scores.append((float(sample_error(x, targets).mean()), not afs, text))
    err, no_afs, text = min(scores)  # ties: AFS first (its learned mean is one more correction)
    return text, not no_afs, err


def tune(model: ModelInfo, nfes: list[int], out: str | Path, budget_s: float = 600.0, n_test: int | None = None,
         progress: bool = True, conditions: dict[str, Any] | None = None,
         bind: Callable[[list[int]], Denoiser] | None = None, log: Callable[[str], None] = print,
         families: tuple[Family, ...] = FAMILIES, base_config: LearnConfig | None = None,
         memory: MemoryPlan | None = None) -> list[dict[str, Any]]:
    """Fit `families` per NFE within `budget_s` seconds each; write every card, the best per NFE under
    `out/nfe{N}/best`, and `table.md`, `table.json`, `error_vs_nfe.png` in `out`. Returns the table rows.
    `memory` (fewstep.memory) bounds the memory of every fit."""
    out = Path(out)
    bind = bind or (lambda seeds: model.denoiser)
    n_test = n_test or (512 if model.exact else 64)
    test_seeds = EVALUATION.seeds(n_test, option="--n")  # what bench measures on: seeds 0 … n_test − 1
    test_model = model
    if conditions is not None:  # the test seeds' conditions drawn from the same distribution
        from .conditioning import ConditionSpec, conditioned_model

        test_model = conditioned_model(model, ConditionSpec.from_json(conditions), list(test_seeds))
    base_cfg = base_config or default_config(model)
    memory = memory or MemoryPlan()
    memory.validate(base_cfg.batch, "tune")
    chunk = memory.eval_chunk if memory.micro_batch else None
    for nfe in nfes:  # every setting (seeds included) checked before any teacher runs
        replace(base_cfg, nfe=nfe, afs=True, conditions=conditions).validate()
    rows = []
    for nfe in nfes:
        began = time.perf_counter()
        cfg0 = replace(base_cfg, nfe=nfe, afs=True, conditions=conditions)
        val_seeds = list(VALIDATION.seeds(cfg0.val_pairs))
        val_targets = teacher_pairs(model, val_seeds, cfg0, bind, memory.eval_chunk, progress=progress)
        tried: list[tuple[float, Card, Path]] = []
        for family in families:
            spent = time.perf_counter() - began
            if tried and spent > budget_s:
                break
            init, afs, init_err = best_init_schedule(model, family.base, nfe, cfg0, bind, val_targets, val_seeds,
                                                     chunk)
            params = family.params if afs else tuple(p for p in family.params if p != "mean")  # μ shifts AFS's D_0
            cfg = replace(cfg0, base=family.base, params=params, init_schedule=init, afs=afs)
            key = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
            folder = out / f"nfe{nfe}" / f"{family.base}-{'+'.join(params)}-{key}"  # resumes the same config
            card = learn(model, cfg, folder, progress=progress, bind=bind, time_limit=max(budget_s - spent, 1.0),
                         memory=memory, log=log)
            log(f"NFE {nfe}: {card.label} from {init}{' +AFS' if afs else ''} (val {init_err:.4f}) → val "
                f"{card.training['val_rmse']:.4f}")
            tried.append((card.training["val_rmse"], card, folder))
        val, best, folder = min(tried, key=lambda t: t[0])
        save_card(out / f"nfe{nfe}" / "best", best)
        records = run_best_classic(test_model, [nfe], n_test, progress=progress)
        classic = best_per_nfe(records)[nfe]
        learned = run_bench(test_model, [], [nfe], n_test, progress=progress, learned=[out / f"nfe{nfe}" / "best"])[0]
        rows.append({
            "nfe": nfe, "best_classic": classic_label(classic),
            "best_classic_rmse": classic["rmse"], "learned": best.label, "learned_rmse": learned["rmse"],
            "ratio": learned["rmse"] / classic["rmse"], "train_rmse": best.training["train_rmse"],
            "val_rmse": val, "seconds": time.perf_counter() - began,
        })
        log(f"NFE {nfe}: {best.label} test {learned['rmse']:.4f} vs best classic {classic['rmse']:.4f} "
            f"({rows[-1]['best_classic']}): ratio {rows[-1]['ratio']:.2f}")
    write_json(out / "table.json", rows)
    header = ["NFE", "best classic", "RMSE", "learned card", "train", "val", "test", "ratio"]
    body = [[str(r["nfe"]), r["best_classic"], f"{r['best_classic_rmse']:.4f}", r["learned"], f"{r['train_rmse']:.4f}",
             f"{r['val_rmse']:.4f}", f"{r['learned_rmse']:.4f}", f"{r['ratio']:.2f}"] for r in rows]
    write_text(out / "table.md", markdown_table(header, body))
    _plot(rows, out / "error_vs_nfe.png", model.name)
    return rows


def tune_plan(model: ModelInfo, nfes: list[int], budget_s: float, n_test: int | None = None,
              conditions: dict[str, Any] | None = None, base_config: LearnConfig | None = None,
              families: tuple[Family, ...] = FAMILIES, memory: MemoryPlan | None = None) -> CostPlan:
    """The model calls `tune` plans (fewstep.costs): the teacher pairs (shared by every NFE and card), then per
    NFE the initial-schedule sweep on the validation pairs, at most one fit per family (the budget stops earlier)
    and the test benchmark. Validates every setting first."""
    base_cfg = base_config or default_config(model)
    memory = memory or MemoryPlan()
    memory.validate(base_cfg.batch, "tune")
    n_test = n_test or (512 if model.exact else 64)
    EVALUATION.seeds(n_test, option="--n")
    cfg0 = replace(base_cfg, nfe=nfes[0], afs=True, conditions=conditions, frame=model.frame.name)
    for nfe in nfes:
        replace(cfg0, nfe=nfe).validate()
    train_seeds, val_seeds = CARD_TRAINING.seeds(cfg0.pairs, cfg0.seed), VALIDATION.seeds(cfg0.val_pairs)
    total = len(train_seeds) + len(val_seeds)
    todo = total - cached_count(model, list(train_seeds), cfg0) - cached_count(model, list(val_seeds), cfg0)
    tcalls = teacher_nfe(model, cfg0)
    plan = CostPlan(f"tune NFE {','.join(map(str, nfes))} on {model.name}: at most {len(families)} cards per NFE, "
                    f"{budget_s:g} s of training each NFE ({memory.describe()})")
    plan.add("teacher pairs", todo * tcalls, formula=f"{todo:,} of {total:,} pairs × {tcalls} calls; shared by "
                                                     "every NFE and card")
    schedules = len(best_classic_schedules(model))
    configs = 2 * len(expand_schedules([SolverSpec.parse(s) for s in DEFAULT_SOLVERS], best_classic_schedules(model)))
    for nfe in nfes:
        cfgs = [replace(cfg0, nfe=nfe, base=f.base, params=f.params) for f in families]
        calls = max(card_nfe(c) for c in cfgs)
        plan.add(f"NFE {nfe} initial grids", len(cfgs) * 2 * schedules * cfg0.val_pairs * nfe,
                 formula=f"{len(cfgs)} bases × {schedules} schedules × AFS on/off × {cfg0.val_pairs} pairs × {nfe}")
        training_cost(plan, f"NFE {nfe} training (at most)", cfg0.iters, cfg0.batch, calls, memory.checkpoint,
                      runs=len(cfgs))
        checks = 1 + cfg0.iters // 25 + (1 if cfg0.iters % 25 else 0)
        plan.add(f"NFE {nfe} validation (at most)", len(cfgs) * (checks * cfg0.val_pairs + cfg0.pairs) * calls,
                 formula=f"{len(cfgs)} cards × ({checks} × {cfg0.val_pairs} + {cfg0.pairs}) pairs × {calls}")
        plan.add(f"NFE {nfe} test", (configs + 1) * n_test * nfe,
                 formula=f"{configs} classic configurations + the card × {n_test} seeds × {nfe}")
    plan.notes.append("training stops at the budget: its lines are upper bounds; the test's reference solutions "
                      "(a 500-point Heun solve per seed on a network) come on top unless cached")
    return plan


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    nfes = [r["nfe"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(nfes, [r["best_classic_rmse"] for r in rows], "o-", color="tab:blue", label="best classic")
    ax.plot(nfes, [r["learned_rmse"] for r in rows], "s-", color="tab:red", label="learned card")
    ax.set(xlabel="NFE", ylabel="RMSE to reference", yscale="log", title=f"{title}: learned vs best classic")
    ax.set_xticks(nfes)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
