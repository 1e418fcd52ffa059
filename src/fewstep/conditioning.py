"""Per-sample conditions and guidance: bind a conditional model into a plain D(x, σ)
(docs/maths.md, "Conditions and guidance").

A conditional denoiser is `D(x, σ, cond)` with `cond` a per-sample tensor with a leading batch axis; for the
class-conditional models of the registry (`ModelInfo.num_classes` = K > 0) it is int64 labels [B] in 0…K−1 and
the null (unconditional) label ∅ is K. Solvers never see conditions: `bind` turns a model plus one batch of
conditions into a 2-argument denoiser, so every solver, AMED predictor and learned-solver card works unchanged.

* `ClassifierFreeGuidance`: D_w = D(x, σ, ∅) + w·(D(x, σ, c) − D(x, σ, ∅)), one network call on the
  doubled batch [∅; c] (w = 1: D(x, σ, c) on the plain batch; w = 0: D(x, σ, ∅)). One guided evaluation counts as
  **one NFE**, as in the literature.
* `ClassifierGuidance`: D + σ²·w·∇ₓ log p(c | x, σ) from a noise-aware classifier `logits = clf(x, σ)`.
* `ConditionSpec`: the distribution conditions are drawn from, per seed, and the guidance scale; recorded as JSON
  in AMED checkpoints (`amed.json`), solver cards and bench records, and checked on load (`check_conditions`).

Per-seed rule (`conditions_for_seeds`, independent of batching): `draw='cycle'` gives seed s the value
values[s mod len(values)] (`fewstep sample --classes 0-9`: seed 13 → class 3); `draw='uniform'` draws an index
uniformly from a generator seeded by a hash of s (never the noise generator of s), the default of `bench`,
`train`, `learn`, `gits` and `analyze` for a conditional model (all classes, or all prompts of `--prompts FILE`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConditionError
from .frames import frame_of
from .models.registry import CondDenoiser, Denoiser, ModelInfo

KINDS = ("none", "classes", "prompts")
DRAWS = ("cycle", "uniform")


def _sigma_rows(sigma: torch.Tensor | float, b: int, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, device=like.device).reshape(-1)
    return s.expand(b) if s.numel() == 1 else s


def batch_rows(t: torch.Tensor, b: int, what: str, error: type[Exception] = ConditionError) -> torch.Tensor:
    """`t` with b rows: as it is, or its single row broadcast; another row count raises `error` naming `what`."""
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise error(f"{what} has {t.shape[0]} rows for a batch of {b} samples (expected 1 or {b})")


class ClassifierFreeGuidance:
    """D_w(x, σ) = D(x, σ, ∅) + w·(D(x, σ, c) − D(x, σ, ∅)) for a fixed batch of conditions (one NFE per call).

    `cond` and `null` have B rows (or one, broadcast); the network sees the doubled batch [∅; c] unless w is 1
    (conditional rows only) or 0 (null rows only).
    """

    def __init__(self, denoiser: CondDenoiser, cond: torch.Tensor, guidance: float, null: torch.Tensor):
        self.denoiser, self.cond, self.null, self.guidance = denoiser, cond, null, float(guidance)
        self.frame = frame_of(denoiser)  # guidance on a flow model's D is guidance on its velocity

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        cond = batch_rows(self.cond, b, "the conditions")
        if self.guidance == 1.0:
            return self.denoiser(x, sigma, cond)
        null = batch_rows(self.null, b, "the null condition")
        if self.guidance == 0.0:
            return self.denoiser(x, sigma, null)
        s = _sigma_rows(sigma, b, x)
        d = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), torch.cat([null, cond]))
        d_u, d_c = d[:b], d[b:]
        return d_u + self.guidance * (d_c - d_u)


class ClassifierGuidance:
    """D(x, σ) + σ²·w·∇ₓ log p(c | x, σ), with `classifier(x, σ)` → logits [B, K] of a noise-aware classifier.

    The gradient is taken per sample (the classifier must treat rows independently, e.g. eval mode) and is not
    differentiated further. The classifier call is not a denoiser call: the NFE count is unchanged.
    """

    def __init__(self, denoiser: Denoiser, classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 cond: torch.Tensor, scale: float):
        self.denoiser, self.classifier, self.cond, self.scale = denoiser, classifier, cond, float(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d = self.denoiser(x, sigma)
        if self.scale == 0.0:
            return d
        b = x.shape[0]
        s = _sigma_rows(sigma, b, x).to(torch.float32)
        labels = batch_rows(self.cond, b, "the conditions").to(device=x.device, dtype=torch.long).reshape(b, 1)
        with torch.enable_grad():
            xg = x.detach().to(torch.float32).requires_grad_(True)
            logp = self.classifier(xg, s).log_softmax(-1).gather(1, labels).sum()
            (grad,) = torch.autograd.grad(logp, xg)
        bc = (-1,) + (1,) * (x.ndim - 1)
        return d + (self.scale * s**2).reshape(bc).to(d.dtype) * grad.to(d.dtype)


def bind(model: ModelInfo, cond: torch.Tensor | None, guidance: float = 1.0,
         classifier_scale: float = 0.0) -> Denoiser:
    """A plain D(x, σ) for one batch: `model` with conditions `cond` ([B] labels, or None) under classifier-free
    guidance `guidance` (and classifier guidance `classifier_scale` with the model's noise-aware classifier).

    Unconditional model and cond None: `model.denoiser` itself (bit-exact). Stable API (used by `fewstep learn`).
    """
    if model.num_classes == 0 or model.cond_denoiser is None:
        if cond is not None or guidance != 1.0 or classifier_scale != 0.0:
            raise ConditionError(f"model {model.name!r} is unconditional: it takes no classes, prompts or guidance")
        return model.denoiser
    if cond is None:
        raise ConditionError(f"model {model.name!r} is conditional: give conditions (e.g. --classes 0-9)")
    cond = cond.to(torch.long)
    if cond.ndim != 1 or (cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > model.num_classes)):
        raise ConditionError(f"conditions must be labels [B] in 0…{model.num_classes} "
                             f"({model.num_classes} = unconditional)")
    null = torch.full((1,), model.num_classes, dtype=torch.long)
    out: Denoiser = ClassifierFreeGuidance(model.cond_denoiser, cond, guidance, null)
    if classifier_scale != 0.0:
        if model.noisy_classifier is None:
            raise ConditionError(f"model {model.name!r} has no noise-aware classifier for classifier guidance")
        out = ClassifierGuidance(out, model.noisy_classifier, cond, classifier_scale)
    return out


# ------------------------------------------------------------------------------------------------ distributions

@dataclass(frozen=True)
class ConditionSpec:
    """Where per-seed conditions come from, and the guidance scale (recorded with every trained artefact).

    kind: 'none' (unconditional), 'classes' (values = class labels) or 'prompts' (values = prompt texts; the
    condition of a seed is a prompt index). draw: 'cycle' or 'uniform' (module docstring). source: the prompt
    file, for the record.
    """

    kind: str = "none"
    values: tuple[Any, ...] = ()
    draw: str = "uniform"
    guidance: float = 1.0
    classifier_scale: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.draw not in DRAWS:
            raise ConditionError(f"condition kind must be one of {KINDS} and draw one of {DRAWS}")
        if (self.kind == "none") != (not self.values):
            raise ConditionError("a conditional spec needs values (classes or prompts); 'none' takes none")
        if not (self.guidance == self.guidance and abs(self.guidance) < 1e6) or self.classifier_scale < 0:
            raise ConditionError(f"bad guidance {self.guidance} / classifier scale {self.classifier_scale}")
        if self.kind == "none" and (self.guidance != 1.0 or self.classifier_scale != 0.0):
            raise ConditionError("guidance needs a conditional model")

    @property
    def conditional(self) -> bool:
        return self.kind != "none"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": list(self.values), "draw": self.draw, "guidance": self.guidance,
                "classifier_scale": self.classifier_scale, "source": self.source}

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> ConditionSpec:
        """The spec recorded by `to_json` (None or {} = unconditional)."""
        if not raw:
            return cls()
        try:
            return cls(str(raw["kind"]), tuple(raw.get("values", ())), str(raw.get("draw", "uniform")),
                       float(raw.get("guidance", 1.0)), float(raw.get("classifier_scale", 0.0)),
                       str(raw.get("source", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ConditionError(f"recorded conditions are malformed: {raw!r} ({e})") from e

    def key(self) -> str:
        """A short digest (cache keys of references and searches)."""
        return "" if not self.conditional else hashlib.sha1(
            json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:10]

    def describe(self) -> str:
        if not self.conditional:
            return "unconditional"
        vals = ",".join(map(str, self.values)) if self.kind == "classes" else f"{len(self.values)} prompts"
        cg = f", classifier guidance {self.classifier_scale:g}" if self.classifier_scale else ""
        return f"{self.kind} {vals} ({self.draw}), guidance {self.guidance:g}{cg}"


def condition_seed(seed: int) -> int:
    """The seed of the condition generator of noise seed `seed` (a hash: unrelated to the noise generator)."""
    return int.from_bytes(hashlib.sha256(f"fewstep-condition:{int(seed)}".encode()).digest()[:8], "little") >> 1


def conditions_for_seeds(spec: ConditionSpec, seeds: Sequence[int]) -> torch.Tensor | None:
    """The conditions of `seeds` (int64 [B]: class labels, or prompt indices), None for an unconditional spec.
    Deterministic per seed, independent of batching. Stable API (used by `fewstep learn`)."""
    if not spec.conditional:
        return None
    n = len(spec.values)
    if spec.draw == "cycle":
        idx = [int(s) % n for s in seeds]
    else:
        idx = [int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(condition_seed(s)))) for s in seeds]
    return torch.tensor([spec.values[i] for i in idx] if spec.kind == "classes" else idx, dtype=torch.long)


def conditioned_model(model: ModelInfo, spec: ConditionSpec, seeds: Sequence[int]) -> ModelInfo:
    """`model` with the conditions of `seeds` bound into its `denoiser` (for batches of exactly these seeds, in
    this order) and a `condition_key` for caches; an unconditional model with an unconditional spec as is."""
    if not spec.conditional and model.num_classes == 0:
        return model
    cond = conditions_for_seeds(spec, seeds)
    den = bind(model, cond, spec.guidance, spec.classifier_scale)
    return dataclasses.replace(model, denoiser=den, condition_key=spec.key(), conditions=spec)


# ----------------------------------------------------------------------------------------------- CLI helpers

def parse_classes(text: str, num_classes: int) -> list[int]:
    """'3' → [3]; '0-9' → 0…9; '1,3,5-7' → [1, 3, 5, 6, 7]; every class in 0…num_classes−1."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError(part)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError as e:
        raise ConditionError(f"bad --classes {text!r}: use e.g. '3', '0-9' or '1,3,5-7'") from e
    if not out:
        raise ConditionError(f"bad --classes {text!r}: no class given")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ConditionError(f"--classes {text!r}: class {bad[0]} is out of range 0-{num_classes - 1}")
    return out


def load_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 prompt file (one prompt per line)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConditionError(f"cannot read --prompts file {p}: {e}") from e
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise ConditionError(f"--prompts file {p} has no prompts (one per line)")
    return prompts


def resolve(model: ModelInfo, classes: str | None = None, prompts: str | None = None,
            guidance: float | None = None, classifier_scale: float = 0.0,
            draw: str | None = None) -> tuple[ModelInfo, ConditionSpec]:
    """The model and condition spec of a command line: `--classes` (drawn by `draw`, default cycle), else uniform
    over every class; `--prompts FILE` for prompt models (encoded once); unconditional models refuse all."""
    g = 1.0 if guidance is None else float(guidance)
    if prompts is not None:
        if model.with_prompts is None:
            raise ConditionError(f"model {model.name!r} does not take prompts (--prompts is for diffusers pipelines)")
        if classes is not None:
            raise ConditionError("give --classes or --prompts, not both")
        texts = load_prompts(prompts)
        model = model.with_prompts(texts)
        return model, ConditionSpec("prompts", tuple(texts), draw or "cycle", g, classifier_scale, str(prompts))
    if model.num_classes == 0:
        if classes is not None or g != 1.0 or classifier_scale:
            raise ConditionError(f"model {model.name!r} is unconditional: --classes/--prompts/--guidance need a "
                                 "conditional model (e.g. digits-cond)")
        return model, ConditionSpec()
    if classes is not None:
        return model, ConditionSpec("classes", tuple(parse_classes(classes, model.num_classes)), draw or "cycle", g,
                                    classifier_scale)
    return model, ConditionSpec("classes", tuple(range(model.num_classes)), "uniform", g, classifier_scale)


def check_conditions(recorded: dict[str, Any] | None, used: ConditionSpec, what: str = "this checkpoint") -> None:
    """Compare the conditions an artefact was trained with to the ones in use: conditional vs unconditional or
    another kind → ConditionError; another guidance or condition set → a warning."""
    rec = ConditionSpec.from_json(recorded)
    if rec.conditional != used.conditional or rec.kind != used.kind:
        raise ConditionError(f"{what} was trained {rec.describe()}, but it is used {used.describe()}; "
                             "train it for this model and conditions")
    if not rec.conditional:
        return
    if (rec.guidance, rec.classifier_scale) != (used.guidance, used.classifier_scale):
        warnings.warn(f"{what} was trained at guidance {rec.guidance:g} (classifier {rec.classifier_scale:g}) "
                      f"and is used at {used.guidance:g} ({used.classifier_scale:g}): expect a larger error",
                      UserWarning, stacklevel=2)
    if set(rec.values) != set(used.values):
        warnings.warn(f"{what} was trained on {rec.describe()}, used on {used.describe()}", UserWarning, stacklevel=2)


def check_artifacts(paths: Sequence[str | Path], used: ConditionSpec) -> None:
    """`check_conditions` for AMED checkpoint folders (amed.json) and solver cards (card.json) by path; files
    that cannot be read are left to their own loaders to report."""
    for path in paths:
        for name in ("amed.json", "card.json"):
            file = Path(path) / name
            try:
                raw = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(raw, dict):
                check_conditions(raw.get("conditions"), used, f"{file}")
