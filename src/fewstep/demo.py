"""`fewstep demo`: the main job. On a built-in model, benchmark the shipped solver cards and AMED predictors
(`fewstep.shipped`) beside every classic solver at NFE 3–10 from the same noise against the same reference, learn
one card live on `gmm` (seconds) beside its shipped twin, and write the table (markdown + JSON), an error-vs-NFE
plot and a side-by-side PNG of the same seeds at NFE 5. `train=True` (`fewstep demo --train`), or a model with
nothing shipped, fits the predictors and cards from scratch instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .amed.recipes import recipe
from .amed.train import train as train_predictor
from .evaluation.bench import DEFAULT_SOLVERS, classic_methods, markdown_table, measure, run_bench, table_rows
from .evaluation.plots import plot_error_vs_nfe
from .io import atomic_write, write_json, write_text
from .learned.train import LearnConfig, learn
from .methods import Method, SolverSpec, resolve_method
from .models import load_model
from .models.registry import ModelInfo
from .noise import seeded_noise
from .reference import reference_solution
from .sampling import to_uint8
from .shipped import shipped_cards, shipped_predictor

DEMO_NFES = (3, 4, 5, 6, 7, 8, 9, 10)
AMED_RECIPES = {"AMED-Solver": "solver", "AMED-Plugin[ipndm]": "plugin-ipndm", "AMED-Plugin[deis]": "plugin-deis"}
PICTURE_NFE = 5
CARD_NFES = (3, 5)
CARD_PARAMS = ("steps", "offsets", "coeffs", "weights")
CARD_LABEL = "learned card"
LIVE_MODEL, LIVE_NFE = "gmm", 5  # the card the demo learns live: an analytic model, seconds


@dataclass(frozen=True)
class DemoSettings:
    """How much the demo samples and trains on a model: a network gets fewer samples and reuses a pool of
    teacher runs in AMED training (the teacher is the cost). The shipped predictors were trained with these."""

    n: int
    kimg: float
    pool: int
    batch: int

    @classmethod
    def of(cls, model: ModelInfo) -> DemoSettings:
        return cls(256, 10.0, 0, 128) if model.exact else cls(64, 3.2, 256, 64)


def run_demo(model: ModelInfo, out: str | Path, n: int = 256, kimg: float = 10.0, pool: int = 0,
             batch: int = 128, amed_nfes: tuple[int, ...] = (PICTURE_NFE,), card_nfes: tuple[int, ...] = CARD_NFES,
             card_iters: int | None = None, train: bool = False, progress: bool = True,
             log: Any = print) -> list[dict[str, Any]]:
    """Run the demo; `train` fits every predictor and card (`kimg`, `pool`, `batch`; cards at `card_nfes` with
    `card_iters`) where it would otherwise take the shipped ones."""
    out = Path(out)
    start = time.perf_counter()
    fd = _fd_metric(model)
    seeds = list(range(n))
    ref = reference_solution(model, seeds, progress=progress)
    log(f"reference solve of {n} samples: {time.perf_counter() - start:.1f} s")
    noise = seeded_noise(seeds, model.shape, model.state_dtype, model.device)  # drawn on the CPU, moved once
    records: list[dict[str, Any]] = []
    pictures: dict[str, torch.Tensor] = {"reference": ref[:8]}

    def add(method: Method, label: str, **fields: Any) -> None:
        """One table row by bench's loop, under the demo's label (AFS marked, recipes and cards by name)."""
        record, x = next(measure(model, [method], noise, ref, fd))
        records.append(replace(record, solver=label, **fields).to_json())
        if method.nfe == PICTURE_NFE:
            pictures[label] = x[:8].cpu()

    began = time.perf_counter()
    specs = [SolverSpec.parse(name + ("+afs" if afs else "")) for name in DEFAULT_SOLVERS for afs in (False, True)]
    for method in tqdm(classic_methods(model, specs, DEMO_NFES), desc="classic solvers", disable=not progress,
                       leave=False):
        add(method, method.label + (" +AFS" if method.afs else ""))
    log(f"classic solvers at NFE {DEMO_NFES[0]}–{DEMO_NFES[-1]}: {time.perf_counter() - began:.1f} s")
    for label, name in AMED_RECIPES.items():
        for nfe in amed_nfes:
            folder = None if train else shipped_predictor(model, name, nfe)
            if folder is None:
                folder = out / "predictors" / f"{name}-nfe{nfe}"
                cfg = recipe(name, nfe, model.frame.final_denoise, kimg=kimg, pool=pool, batch=batch)
                _, _, stats = train_predictor(model, cfg, out=folder, progress=progress)
                add(resolve_method(SolverSpec("amed", path=str(folder)), model), label,
                    train_seconds=stats["seconds"])
                log(f"trained {label} for NFE {nfe} in {stats['seconds']:.1f} s: RMSE {records[-1]['rmse']:.4f}")
            else:
                add(resolve_method(SolverSpec("amed", path=str(folder)), model), label)
    cards = [] if train else [c for c in shipped_cards(model.name) if not c.conditions]
    for card in cards:  # the learned global solver: the most accurate per model call (README, learned solvers)
        add(resolve_method(SolverSpec("learned", path=str(card.path)), model), CARD_LABEL)
    if cards:
        log("shipped cards: " + ", ".join(f"NFE {r['nfe']} {r['rmse']:.4f}" for r in records
                                           if r["solver"] == CARD_LABEL))
    else:
        for nfe in card_nfes:
            folder = out / "cards" / f"nfe{nfe}"
            card = learn(model, _card_config(model, nfe, card_iters), folder, progress=progress,
                         time_limit=90.0 if not model.exact else None)
            add(resolve_method(SolverSpec("learned", path=str(folder)), model), CARD_LABEL,
                train_seconds=card.training["seconds"])
            log(f"learned a UniPC card for NFE {nfe} in {card.training['seconds']:.1f} s: "
                f"RMSE {records[-1]['rmse']:.4f}")
    if not train:
        _live_card(out / "live_card", progress, log)
    began = time.perf_counter()
    header, rows = table_rows(records, list(DEMO_NFES))
    title = f"RMSE to the reference solution — {model.name} ({model.description}), {n} samples"
    text = f"# {title}\n\n(* best per NFE)\n\n" + markdown_table(header, rows)
    metrics = ["rmse", *[k for k in records[0] if k.startswith("fd_")]]
    for key in metrics[1:]:
        text += f"\n## {key.replace('fd_', 'FD-')} of the same samples ({n}; noisy at this sample count)\n\n"
        text += markdown_table(*table_rows(records, list(DEMO_NFES), metric=key))
    write_text(out / "table.md", text)
    write_json(out / "table.json", records)
    plot_error_vs_nfe(records, out / "error_vs_nfe.png", title=f"{model.name}: error vs NFE", metric=metrics)
    _side_by_side(pictures, out / f"samples_nfe{PICTURE_NFE}.png",
                  {r["solver"]: r["rmse"] for r in records if r["nfe"] == PICTURE_NFE})
    log(f"table and plots: {time.perf_counter() - began:.1f} s; demo finished in {time.perf_counter() - start:.0f} s")
    return records


def _card_config(model: ModelInfo, nfe: int, iters: int | None) -> LearnConfig:
    """The demo's quick UniPC card (`--train`, or a model without shipped cards)."""
    return LearnConfig(base="unipc", nfe=nfe, afs=True, params=CARD_PARAMS, init_schedule="time_uniform:1",
                       loss="rmse", lr=0.01, pairs=256 if not model.exact else 512, val_pairs=64,
                       iters=iters or (150 if not model.exact else 400))


def _live_card(out: Path, progress: bool, log: Callable[[str], None]) -> None:
    """Learn one card on `gmm` at NFE 5 in seconds and print its test RMSE beside the shipped card's and the best
    classic's (writes `out/card.json` and `out/result.json`)."""
    gmm = load_model(LIVE_MODEL)
    card = learn(gmm, _card_config(gmm, LIVE_NFE, 200), out, progress=progress)
    test = run_bench(gmm, [], [LIVE_NFE], 512, progress=progress, learned=[out])[0]["rmse"]
    shipped = next((c.row for c in shipped_cards(LIVE_MODEL) if c.nfe == LIVE_NFE and c.row), None)
    result = {"model": LIVE_MODEL, "nfe": LIVE_NFE, "seconds": card.training["seconds"], "test_rmse": test,
              "shipped": shipped}
    write_json(out / "result.json", result)
    beside = (f"; shipped card {shipped['learned_rmse']:.4f}, best classic {shipped['best_classic_rmse']:.4f} "
              f"({shipped['best_classic']})" if shipped else "")
    log(f"learned live: a {card.label} card on {LIVE_MODEL} at NFE {LIVE_NFE} in {card.training['seconds']:.1f} s, "
        f"test RMSE {test:.4f} (512 seeds){beside}")


def _fd_metric(model: ModelInfo) -> Callable[[torch.Tensor], dict[str, float]]:
    """FD of samples against the shipped reference statistics, for models with a feature network."""
    from .evaluation.fid import MODEL_FEATURES, bench_fd_metric

    if model.name not in MODEL_FEATURES:
        return lambda x: {}
    return bench_fd_metric(model.name)


def _side_by_side(pictures: dict[str, torch.Tensor], path: Path, rmse_by_label: dict[str, float]) -> None:
    import matplotlib.pyplot as plt

    fig = side_by_side_figure(pictures, rmse_by_label)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def side_by_side_figure(pictures: dict[str, torch.Tensor], rmse_by_label: dict[str, float]) -> Any:
    """One labelled row per method (reference first), the same 8 seeds in the columns, under a title that
    keeps a fixed strip of its own (it never overlaps the first row). Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 0.85 * len(pictures) + 0.4  # inches: the rows, and a fixed strip on top for the title
    fig, axes = plt.subplots(len(pictures), 1, figsize=(8, height), dpi=110, squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], pictures.items()):
        imgs = to_uint8(x)
        ax.imshow(np.concatenate(list(imgs[..., 0] if imgs.shape[-1] == 1 else imgs), axis=1), cmap="gray",
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        suffix = f"  {rmse_by_label[label]:.3f}" if label in rmse_by_label else ""
        ax.set_ylabel(label + suffix, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"the same seeds at NFE {PICTURE_NFE} (label: RMSE to the reference)", fontsize=8,
                 y=1 - 0.1 / height, va="top")
    fig.subplots_adjust(left=0.26, right=0.98, top=1 - 0.4 / height, bottom=0.01, hspace=0.15)
    return fig
