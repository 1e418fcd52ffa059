"""The solver cards (and the demo's AMED predictors) shipped with fewstep: one card set per built-in model and
condition distribution, NFE 3–8.

A card set is fitted by `benchmarks/ship_cards.py` (`fewstep tune` with one card family and a fixed number of
iterations) and lives in the package under `data/cards/SET/nfeN/card.json`, beside `SET/table.json` (the card's
train / validation / test RMSE and the best classic configuration on the same test seeds). `fewstep cards` lists
them; `--solver auto` samples with the one that matches the model, its weights and the conditions, and without
one with `CLASSIC_RULE` (resolved in `fewstep.methods`). The demo's AMED predictors live in `data/predictors`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .conditioning import ConditionSpec, resolve
from .fitted import base_name
from .learned.card import CARD_FILE, Card, CardError, load_card

SHIPPED_DIR = Path(__file__).parent / "data" / "cards"
PREDICTORS_DIR = Path(__file__).parent / "data" / "predictors"  # MODEL/RECIPE-nfeN: the demo's AMED predictors


@dataclass(frozen=True)
class CardSet:
    """How one set is fitted: the model, the guidance scale of its conditions (classes drawn uniformly), the card
    family (a `tune` base, or several: per NFE the best on validation is shipped; `params`: other parameter
    families than tune's for that base) and the training settings (None: `tune.default_config`'s)."""

    model: str
    guidance: float = 1.0
    family: str = "unipc"  # comma-separated for several
    pairs: int = 1024
    iters: int = 300
    batch: int | None = 64
    lr: float | None = None
    params: tuple[str, ...] | None = None

    @property
    def bases(self) -> tuple[str, ...]:
        return tuple(self.family.split(","))


# In the order they are fitted: the default model first. EDM models learn a UniPC card (README, "Learned
# solvers"); digits-flow a gradient-estimation or an Euler card, the better on validation per NFE, with coefficient
# corrections too (its best classic solvers: nearly straight trajectories; the corrections on D take the Euler
# card at NFE 5 from 0.0278 to 0.0253; batches of 128 fit it better), gmm-flow a DEIS card (best there). The
# memorising digits-opt (its trajectories switch between training digits) needs large batches and a small step: at
# batch 64 its validation error jumps 10x.
CARD_SETS = {
    "digits": CardSet("digits"),
    "gmm": CardSet("gmm", pairs=2048, iters=400, batch=None),
    "digits-opt": CardSet("digits-opt", pairs=2048, iters=400, batch=256, lr=0.005),
    "gmm-flow": CardSet("gmm-flow", family="deis", pairs=2048, iters=400, batch=None),
    "digits-flow": CardSet("digits-flow", family="gradient_estimation,euler", pairs=2048, iters=400, batch=128,
                           params=("steps", "offsets", "weights", "coeffs", "mean")),
    "digits-cond": CardSet("digits-cond"),
    "digits-cond-w2": CardSet("digits-cond", guidance=2.0),
}


def set_model(name: str) -> tuple[Any, ConditionSpec]:
    """A card set's model and the conditions its cards are fitted and measured for (classes drawn uniformly)."""
    from .models import load_model

    card_set = CARD_SETS[name]
    model = load_model(card_set.model)
    if model.num_classes:
        return resolve(model, guidance=card_set.guidance, draw="uniform")
    return model, ConditionSpec()


@dataclass(frozen=True)
class ShippedCard:
    """One card of the package (or of a user's card folder): where it is and what it was fitted for."""

    path: Path  # the card folder
    set: str  # the card set ('digits', 'digits-cond-w2', …) or '' for a user's card
    model: str
    shape: tuple[int, ...]
    nfe: int
    conditions: dict[str, Any] | None
    val_rmse: float
    card: Card  # the validated card itself
    row: dict[str, Any] | None = None  # the set's table row: test RMSE, best classic

    @property
    def name(self) -> str:
        return f"{self.set}/nfe{self.nfe}" if self.set else str(self.path)


def shipped_cards(model: str | None = None, folder: Path = SHIPPED_DIR) -> list[ShippedCard]:
    """Every shipped card (of the built-in `model` only, if given), set by set in `CARD_SETS` order, NFE
    ascending (read from the card files)."""
    out = []
    for name in (n for n, s in CARD_SETS.items() if model is None or s.model == model):
        table = folder / name / "table.json"
        rows = {r["nfe"]: r for r in json.loads(table.read_text())["rows"]} if table.is_file() else {}
        for card in sorted(_cards_under(folder / name), key=lambda c: c.nfe):
            out.append(replace(card, set=name, row=rows.get(card.nfe)))
    return out


def _cards_under(folder: Path) -> list[ShippedCard]:
    """The cards in `folder` and below it (a `tune` output holds several per NFE), as read from their files."""
    found = []
    for file in sorted(folder.rglob(CARD_FILE)) if folder.is_dir() else []:
        card = load_card(file)
        found.append(ShippedCard(file.parent, "", str(card.model.get("name")), tuple(card.model.get("shape", ())),
                                 card.nfe, card.conditions, float(card.training.get("val_rmse", math.inf)), card))
    return found


def find_card(model: Any, nfe: int, conditions: ConditionSpec | None = None,
              card_dirs: Sequence[str | Path] = ()) -> tuple[ShippedCard | None, str]:
    """The card `--solver auto` uses on `model` at `nfe` calls: the best-validated one fitted to this model (its
    name, shape and weights), NFE and conditions — among the user's `card_dirs` first, then the shipped ones.
    Returns (card, '') or (None, why not): a card for this model that is refused (other weights: a retrained
    model) is named."""
    conditions = conditions or ConditionSpec()
    notes = []
    for source in ([c for d in card_dirs for c in _cards_under(Path(d))], shipped_cards(base_name(model.name))):
        candidates = [c for c in source if c.nfe == nfe and base_name(c.model) == base_name(model.name)
                      and list(c.shape) == list(model.shape) and _conditions_match(c.conditions, conditions)]
        for c in sorted(candidates, key=lambda c: c.val_rmse):
            try:
                c.card.check_model(model)
            except CardError as e:
                notes.append(f"card {c.name} refused: {e}")
                continue
            return c, ""
    if notes:
        return None, notes[0] + (f" (and {len(notes) - 1} more)" if len(notes) > 1 else "")
    return None, f"no card for {model.name or 'this model'} at NFE {nfe}" + (
        f" {conditions.describe()}" if conditions.conditional else "")


def _conditions_match(recorded: dict[str, Any] | None, used: ConditionSpec) -> bool:
    """A card fits conditions of the same kind and guidance drawn from its own condition set."""
    rec = ConditionSpec.from_json(recorded)
    return (rec.kind == used.kind and (rec.guidance, rec.classifier_scale) == (used.guidance, used.classifier_scale)
            and set(used.values) <= set(rec.values))


def rule_specs(frame: str, nfe: int) -> list[str]:
    """The classic rule's specs for a frame, the one for `nfe` first, then by distance in NFE (the caller takes
    the first that reaches exactly `nfe` calls; outside 3–8 the nearest tabulated NFE's)."""
    rules = CLASSIC_RULE[frame]
    return [rules[k] for k in sorted(rules, key=lambda k: (abs(k - nfe), k))]


def shipped_predictor(model: Any, recipe: str, nfe: int) -> Path | None:
    """The shipped AMED predictor of `recipe` at `nfe` for `model` (benchmarks/ship_predictors.py), or None when
    there is none or it was trained on other weights."""
    from .amed.checkpoint import CheckpointError, load_checkpoint

    folder = PREDICTORS_DIR / model.name / f"{recipe}-nfe{nfe}"
    if not folder.is_dir():
        return None
    try:
        load_checkpoint(folder, model)
    except CheckpointError:
        return None
    return folder


# `--solver auto` without a card: per frame and NFE, the classic configuration whose worst RMSE ratio to the best
# configuration of each built-in model (and condition set) is lowest — never more than 1.27–2.19× the best on an
# EDM model, 1.01–1.39× on a flow model (benchmarks/auto_rule.py; results/auto_rule.md has every ratio).
CLASSIC_RULE: dict[str, dict[int, str]] = {
    "edm": {
        3: "dpmpp@time_uniform:2+afs", 4: "dpmpp@time_uniform:2+afs", 5: "deis@time_uniform:2+afs",
        6: "unipc@time_uniform:2+afs", 7: "unipc@time_uniform:2+afs", 8: "unipc@time_uniform:2+afs"},
    "flow": {
        3: "euler@flow:dynamic+afs", 4: "gradient_estimation@flow:shift=1+afs",
        5: "gradient_estimation@flow:shift=1+afs", 6: "gradient_estimation@kl_optimal",
        7: "gradient_estimation@kl_optimal", 8: "gradient_estimation@flow:shift=1+afs"},
}
