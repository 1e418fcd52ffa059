"""Solver cards: a learned global solver as one small JSON file, `card.json`, in a folder.

A card holds the base solver and its options, AFS, the learned σ grid, the evaluation offsets ξ, the optional
correction matrices Δw / Δβ and the optional AFS shift μ (docs/maths.md, "Learned global solvers"), the identity
of the model it was fitted to (name, shape, weights fingerprint, condition distribution; the dtype and device of the
fit: a card samples on any device and dtype, and at another size with a warning) and the training record
(settings, train/validation losses). Every field is validated on load, and an error names the field; floats
round-trip exactly through JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FewstepError
from ..fitted import check_fitted
from ..frames import EDM, Frame, get_frame
from ..io import write_json
from ..solvers import get_solver, nfe
from .solver import BASES, LearnedSolver

CARD_FILE = "card.json"
FORMAT_VERSION = 1
# What `fewstep learn --params` may fit, each family stored in the card field of the same name except `steps`
# (the grid, field `sigmas`) and `mean` (field `afs_shift`: the learned shift of AFS's first D_0, AFS only).
PARAMETER_FAMILIES = ("steps", "offsets", "weights", "coeffs", "mean")


class CardError(FewstepError):
    """A solver card is missing, corrupt, hand-edited into nonsense, or made for another model."""


@dataclass
class Card:
    """What a learned solver needs to sample, and where it came from."""

    base: str
    base_options: dict[str, Any]
    afs: bool
    sigmas: list[float]  # N + 1 grid points, strictly decreasing
    offsets: list[float]  # ξ_i for the evaluated grid points 0 … N−1 (0 at AFS's analytic first point)
    weights: list[list[float]] | None = None  # Δw [N][K] on d (None: not learned)
    coeffs: list[list[float]] | None = None  # Δβ [N][K] on D
    afs_shift: list[float] | None = None  # μ added to AFS's first D_0, flattened (family `mean`; None: not learned)
    params: list[str] = field(default_factory=list)  # the families that were learned
    model: dict[str, Any] = field(default_factory=dict)  # name, shape, fingerprint, sigma_min, sigma_max, frame, and
    # what it was fitted at: dtype, device, weights (the weights-only fingerprint, fewstep.fitted)
    conditions: dict[str, Any] | None = None  # condition distribution and guidance (conditional models)
    training: dict[str, Any] = field(default_factory=dict)  # settings and metrics

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    @property
    def frame(self) -> Frame:
        """The frame of the model the card was fitted to (cards before flow support: EDM)."""
        return get_frame(self.model.get("frame", "edm"))

    @property
    def nfe(self) -> int:
        return nfe(get_solver(self.base, **self.base_options), self.num_steps, afs=self.afs,
                   denoise_to_zero=self.frame.final_denoise)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.base_options.items())
        return f"learned[{self.base}{'(' + opts + ')' if opts else ''}:{'+'.join(self.params) or 'none'}]"

    def solver(self) -> LearnedSolver:
        """The card as a solver for `fewstep.sample` (float64 tensors, grid and AFS built in)."""
        as_tensor = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)
        return LearnedSolver(self.base, self.base_options, as_tensor(self.sigmas), self.afs, as_tensor(self.offsets),
                             as_tensor(self.weights), as_tensor(self.coeffs), label=self.label,
                             afs_shift=as_tensor(self.afs_shift), final_denoise=self.frame.final_denoise)

    def check_frame(self, frame: Frame, model: str) -> None:
        """Refuse a model of the other kind (`model` names it in the message): a card for an EDM / diffusion
        model does not run on a flow model, nor the reverse."""
        if self.frame is not frame:
            kinds = {"edm": "an EDM / diffusion", "flow": "a flow-matching"}
            raise CardError(f"this card was learned on {kinds[self.frame.name]} model "
                            f"({self.model.get('name')!r}); {model} is {kinds[frame.name]} model")

    def check_model(self, model: Any) -> None:
        """Refuse a model other than the one the card was fitted to (name, weights, frame); the same model in
        another dtype, on another device or at another sample size is accepted, the last with a warning
        (fewstep.fitted; a learned AFS shift fixes the size)."""
        name, shape = self.model.get("name"), self.model.get("shape")
        self.check_frame(getattr(model, "frame", EDM), repr(model.name))
        check_fitted("card was learned", CardError, str(name), shape, self.model.get("fingerprint", ""),
                     self.model.get("weights", ""), self.model.get("dtype", ""), model,
                     resizable=self.afs_shift is None, remedy="learn it again")


def save_card(out: str | Path, card: Card) -> Path:
    """Write `out/card.json` atomically (after validating the card)."""
    validate(asdict(card), str(Path(out) / CARD_FILE))
    return write_json(Path(out) / CARD_FILE, {"format": FORMAT_VERSION, **asdict(card)})


def load_card(path: str | Path, model: Any = None) -> Card:
    """Read and validate a card folder (or its card.json); with `model`, check it was learned for that model."""
    path = Path(path)
    file = path / CARD_FILE if path.is_dir() else path
    if not file.is_file():
        raise CardError(f"{path} is not a solver card: {CARD_FILE} not found (make one with `fewstep learn`)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise CardError(f"{file} is not valid JSON: {e}") from e
    card = validate(raw, str(file))
    if model is not None:
        card.check_model(model)
    return card


def load_solver(path: str | Path, model: Any = None) -> LearnedSolver:
    """`fewstep.load_solver(DIR)`: a card as a solver for `fewstep.sample(denoiser, noise, solver)`."""
    return load_card(path, model).solver()


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def validate(raw: Any, where: str) -> Card:
    """Check every field of a card dict and build the Card; errors name the field."""
    if not isinstance(raw, dict):
        raise CardError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    fmt = raw.pop("format", FORMAT_VERSION)
    if fmt != FORMAT_VERSION or isinstance(fmt, bool):
        raise CardError(f"{where}: field 'format' is {fmt!r}; this fewstep reads format {FORMAT_VERSION}")
    known = set(Card.__dataclass_fields__)
    if set(raw) - known:
        raise CardError(f"{where}: unknown field(s) {sorted(set(raw) - known)}")
    for key in ("base", "base_options", "afs", "sigmas", "offsets"):
        if key not in raw:
            raise CardError(f"{where}: field {key!r} is missing")

    def fail(key: str, problem: str) -> CardError:
        return CardError(f"{where}: field {key!r} {problem}")

    if raw["base"] not in BASES:
        raise fail("base", f"is {raw['base']!r}; expected one of {', '.join(BASES)}")
    for key in ("base_options", "model", "training"):
        if not isinstance(raw.get(key, {}), dict):
            raise fail(key, "must be an object")
    if raw.get("conditions") is not None and not isinstance(raw["conditions"], dict):
        raise fail("conditions", "must be an object or null")
    if not isinstance(raw["afs"], bool):
        raise fail("afs", f"must be true or false, got {raw['afs']!r}")
    sigmas = _numbers(raw["sigmas"], "sigmas", fail)
    if len(sigmas) < 2 or any(s <= 0 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise fail("sigmas", "must be at least 2 positive, strictly decreasing values")
    n = len(sigmas) - 1
    offsets = _numbers(raw["offsets"], "offsets", fail)
    if len(offsets) != n:
        raise fail("offsets", f"has {len(offsets)} values; the grid has {n} evaluated points")
    if any(abs(v) > 5 for v in offsets):
        raise fail("offsets", "has |ξ| > 5 (σ scaled by more than e^5)")
    if raw["afs"] and offsets[0] != 0:
        raise fail("offsets", "must start with 0 with afs (the first point is not evaluated)")
    for key in ("weights", "coeffs"):
        rows = raw.get(key)
        if rows is None:
            continue
        if not isinstance(rows, list) or len(rows) != n:
            raise fail(key, f"must be a list of {n} rows (one per interval)")
        width = {len(r) if isinstance(r, list) else -1 for r in rows}
        if len(width) != 1 or min(width) < 1:
            raise fail(key, "rows must be non-empty lists of equal length")
        for i, row in enumerate(rows):
            _numbers(row, f"{key}[{i}]", fail)
    if raw.get("afs_shift") is not None:
        shift = _numbers(raw["afs_shift"], "afs_shift", fail)
        shape = raw.get("model", {}).get("shape")
        if isinstance(shape, list) and all(isinstance(v, int) for v in shape) and len(shift) != math.prod(shape):
            raise fail("afs_shift", f"has {len(shift)} values for data of shape {shape}")
        if not raw["afs"]:
            raise fail("afs_shift", "needs afs true (it shifts AFS's first node)")
    params = raw.get("params", [])
    if not isinstance(params, list) or not set(params) <= set(PARAMETER_FAMILIES):
        raise fail("params", f"must be a list drawn from {list(PARAMETER_FAMILIES)}")
    card = Card(**raw)
    try:
        card.solver()  # base options, matrix shapes
    except FewstepError as e:
        raise CardError(f"{where}: {e}") from e
    return card


def _numbers(value: Any, key: str, fail: Any) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise fail(key, "must be a list of numbers")
    if not all(math.isfinite(v) for v in value):
        raise fail(key, "contains a non-finite value")
    return [float(v) for v in value]
