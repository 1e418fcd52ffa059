"""Predictor checkpoints: `predictor.safetensors` (weights) + `amed.json` (every sampling setting, model identity).

A checkpoint folder is all `fewstep sample --predictor DIR` and `fewstep bench --predictor DIR` need.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import FewstepError, ModelError
from ..fitted import check_fitted
from ..frames import get_frame
from ..io import atomic_write, write_json
from ..models.registry import ModelInfo
from ..schedules import get_schedule
from ..solvers import get_solver, nfe, sample
from .predictor import AMEDPredictor
from .solver import AMEDPlugin

WEIGHTS = "predictor.safetensors"
SETTINGS = "amed.json"
FORMAT_VERSION = 1


class CheckpointError(FewstepError):
    """A predictor checkpoint is missing, corrupt, or made for another model."""


@dataclass
class SamplingSettings:
    """Everything needed to sample with a trained predictor (docs/maths.md §8)."""

    model: str
    model_shape: list[int]
    num_steps: int
    student: str
    student_options: dict[str, Any]
    schedule: str
    rho: float | None
    sigma_min: float
    sigma_max: float
    afs: bool
    scale_dir: float
    scale_time: float
    teacher: str
    M: int
    guidance: float | None = None
    conditions: dict[str, Any] | None = None  # fewstep.conditioning.ConditionSpec.to_json() of a conditional model
    sigmas: list[float] | None = None  # the exact student grid (so gits:FILE need not exist at sampling time)
    model_fingerprint: str = ""  # the weights the predictor was trained on (networks)
    frame: str = "edm"  # the model's frame (docs/maths.md §15): a flow run ends with one more call, the step to 0
    model_dtype: str = ""  # the network dtype it was trained at (it samples in any; fewstep.fitted)
    model_weights: str = ""  # the weights-only fingerprint (a pipeline folder's), where the model has one
    predictor: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def solver(self, predictor: AMEDPredictor | None = None, bottleneck: torch.nn.Module | None = None) -> AMEDPlugin:
        """The AMED-Plugin of the recorded student with `predictor` (None: to count its NFE), its steps those of
        the run it was trained in (a final denoise after the grid on flow models only)."""
        return AMEDPlugin(get_solver(self.student, **self.student_options), predictor, bottleneck,
                          final_denoise=get_frame(self.frame).final_denoise)

    @property
    def nfe(self) -> int:
        return nfe(self.solver(), self.num_steps, afs=self.afs, denoise_to_zero=get_frame(self.frame).final_denoise)

    @property
    def label(self) -> str:
        if self.student == "amed":
            return "AMED-Solver"
        opts = ",".join(f"{k}={v}" for k, v in self.student_options.items())
        return f"AMED-Plugin[{self.student}{'(' + opts + ')' if opts else ''}]"

    @property
    def schedule_label(self) -> str:
        """The schedule as bench and demo tables show it, e.g. "time_uniform(rho=1)"."""
        return self.schedule + (f"(rho={self.rho:g})" if self.rho is not None else "")

    def schedule_tensor(self) -> torch.Tensor:
        if self.sigmas is not None:
            return get_schedule("custom", self.num_steps, sigmas=self.sigmas)
        return get_schedule(self.schedule, self.num_steps, self.sigma_min, self.sigma_max, rho=self.rho)

    def check_model(self, model: ModelInfo) -> None:
        """Refuse to run a predictor on a model it was not trained for (name, weights, frame); the same model in
        another dtype, on another device or at another sample size runs, the last with a warning (fewstep.fitted;
        its features are pooled to 8×8 whatever the size)."""
        if model.frame is not get_frame(self.frame):
            raise CheckpointError(f"this predictor was trained on a {self.frame} model ({self.model!r}); "
                                  f"{model.name!r} is a {model.frame.name} model")
        check_fitted("predictor was trained", CheckpointError, self.model, self.model_shape, self.model_fingerprint,
                     self.model_weights, self.model_dtype, model, remedy="retrain it")


def save_checkpoint(out: str | Path, predictor: AMEDPredictor, settings: SamplingSettings) -> Path:
    """Write weights and settings atomically into the folder `out`."""
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    settings.predictor = predictor.config()
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": str(FORMAT_VERSION)}))
    write_json(out / SETTINGS, {"format": FORMAT_VERSION, **asdict(settings)})
    return out


def load_checkpoint(path: str | Path, model: ModelInfo | None = None) -> tuple[AMEDPredictor, SamplingSettings]:
    """Load a predictor folder; with `model`, check that it was trained for that model."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"predictor folder {path} does not exist")
    for name in (WEIGHTS, SETTINGS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a predictor checkpoint: {name} is missing")
    try:
        raw = json.loads((path / SETTINGS).read_text())
        _check_settings(raw, path / SETTINGS)
        raw.pop("format")
        settings = SamplingSettings(**raw)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / SETTINGS} is corrupt or not an AMED settings file: {e}") from e
    try:
        get_solver(settings.student, **settings.student_options)
    except FewstepError as e:
        raise CheckpointError(f"{path / SETTINGS}: {e}") from e
    try:
        state = load_file(path / WEIGHTS)
    except Exception as e:
        raise CheckpointError(f"{path / WEIGHTS} is corrupt or not a safetensors file: {e}") from e
    cfg = settings.predictor
    predictor = AMEDPredictor(cfg.get("scale_dir", settings.scale_dir), cfg.get("scale_time", settings.scale_time),
                              cfg.get("feature_dim", 64), cfg.get("hidden", 128), cfg.get("time_channels", 8))
    try:
        predictor.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path / WEIGHTS} does not match the predictor described in {SETTINGS}: {e}") from e
    if model is not None:
        settings.check_model(model)
    return predictor.eval(), settings


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_NAME = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
_POSITIVE = (lambda v: _is_number(v) and v > 0, "a positive number")
_SCALE = (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
_SIZE = (lambda v: _is_int(v) and 0 < v <= 65536, "an integer in 1…65536")
# amed.json field → (check, what it must be); fields missing here are checked by SamplingSettings itself
SETTINGS_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": _NAME, "student": _NAME, "teacher": _NAME, "schedule": _NAME,
    "model_shape": (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(s) and s > 0 for s in v),
                    "a list of positive integers"),
    "num_steps": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "M": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "student_options": (lambda v: isinstance(v, dict), "an object"),
    "rho": (lambda v: v is None or _POSITIVE[0](v), "null or a positive number"),
    "sigma_min": _POSITIVE, "sigma_max": _POSITIVE, "scale_dir": _SCALE, "scale_time": _SCALE,
    "afs": (lambda v: isinstance(v, bool), "true or false"),
    "guidance": (lambda v: v is None or _is_number(v), "null or a number"),
    "conditions": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "sigmas": (lambda v: v is None or (isinstance(v, list) and all(_is_number(s) for s in v)),
               "null or a list of numbers"),
    "model_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "model_dtype": (lambda v: isinstance(v, str), "a string"),
    "model_weights": (lambda v: isinstance(v, str), "a string"),
    "predictor": (lambda v: isinstance(v, dict), "an object"),
    "training": (lambda v: isinstance(v, dict), "an object"),
}
PREDICTOR_FIELDS = {"feature_dim": _SIZE, "hidden": _SIZE, "time_channels": _SIZE, "scale_dir": _SCALE,
                    "scale_time": _SCALE}


def _check_settings(raw: Any, where: Path) -> None:
    """Refuse an amed.json whose values have the wrong type or range (hand-edited, or from another program)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format {raw.get('format')!r} is not {FORMAT_VERSION}, the version this "
                              "fewstep reads")
    checks = [(k, v, SETTINGS_FIELDS[k]) for k, v in raw.items() if k in SETTINGS_FIELDS]
    predictor = raw.get("predictor") if isinstance(raw.get("predictor"), dict) else {}
    checks += [(f"predictor.{k}", v, PREDICTOR_FIELDS[k]) for k, v in predictor.items() if k in PREDICTOR_FIELDS]
    for key, value, (ok, what) in checks:
        if not ok(value):
            raise CheckpointError(f"{where}: {key} must be {what}, got {json.dumps(value)[:60]}")
    if raw.get("sigma_min", 0) >= raw.get("sigma_max", math.inf):
        raise CheckpointError(f"{where}: sigma_min must be below sigma_max")


def model_identity(model: ModelInfo) -> dict[str, Any]:
    """What identifies a model's outputs: name, shape, σ range and weights fingerprint."""
    return {"name": model.name, "shape": list(model.shape), "sigma_min": model.sigma_min,
            "sigma_max": model.sigma_max, "fingerprint": model.fingerprint}


def check_no_predictor(out: str | Path) -> None:
    """Refuse to train into a folder that holds a finished predictor but no training state to resume."""
    out = Path(out)
    if (out / WEIGHTS).exists() or (out / SETTINGS).exists():
        raise CheckpointError(f"--out {out}: already holds a trained predictor and no train_state.pt to resume; "
                              "use another --out, or delete the folder to retrain")


def sample_checkpoint(model: ModelInfo, noise: torch.Tensor, predictor: AMEDPredictor,
                      settings: SamplingSettings, **kwargs: Any) -> torch.Tensor:
    """Sample `model` from `noise` exactly as the checkpoint prescribes (student, schedule, AFS, options)."""
    settings.check_model(model)
    if tuple(noise.shape[1:]) != tuple(model.shape):
        raise ModelError(f"noise shape {tuple(noise.shape[1:])} does not match model shape {model.shape}")
    with torch.no_grad():
        return sample(model.denoiser, noise, settings.solver(predictor, model.bottleneck), settings.schedule_tensor(),
                      afs=settings.afs, **kwargs)
