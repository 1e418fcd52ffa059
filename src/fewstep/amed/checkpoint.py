"""Predictor checkpoints: `predictor.safetensors` (weights) + `amed.json` (every sampling setting, model identity).

A checkpoint folder is all `fewstep sample --predictor DIR` and `fewstep bench --predictor DIR` need.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import FewstepError, ModelError
from ..io import atomic_write, write_json
from ..models.registry import ModelInfo
from ..schedules import get_schedule
from ..solvers import sample
from .predictor import AMEDPredictor

WEIGHTS = "predictor.safetensors"
SETTINGS = "amed.json"
FORMAT_VERSION = 1


class CheckpointError(FewstepError):
    """A predictor checkpoint is missing, corrupt, or made for another model."""


@dataclass
class SamplingSettings:
    """Everything needed to sample with a trained predictor (SPEC §5)."""

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
    sigmas: list[float] | None = None  # the exact student grid (so gits:FILE need not exist at sampling time)
    model_fingerprint: str = ""  # the weights the predictor was trained on (networks)
    predictor: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        from ..solvers import nfe

        return nfe(self.student, self.num_steps, afs=self.afs, amed=True, **self.student_options)

    @property
    def label(self) -> str:
        if self.student == "amed":
            return "AMED-Solver"
        opts = ",".join(f"{k}={v}" for k, v in self.student_options.items())
        return f"AMED-Plugin[{self.student}{'(' + opts + ')' if opts else ''}]"

    def schedule_tensor(self) -> torch.Tensor:
        if self.sigmas is not None:
            return get_schedule("custom", self.num_steps, sigmas=self.sigmas)
        return get_schedule(self.schedule, self.num_steps, self.sigma_min, self.sigma_max, rho=self.rho)

    def check_model(self, model: ModelInfo) -> None:
        """Refuse to run a predictor on a model it was not trained for."""
        if model.name != self.model or list(model.shape) != list(self.model_shape):
            raise CheckpointError(
                f"this predictor was trained for model {self.model!r} {tuple(self.model_shape)}, "
                f"not {model.name!r} {tuple(model.shape)}"
            )
        if self.model_fingerprint and model.fingerprint and self.model_fingerprint != model.fingerprint:
            raise CheckpointError(
                f"this predictor was trained for other weights of {self.model!r} (fingerprint "
                f"{self.model_fingerprint}, the loaded model has {model.fingerprint}); retrain it"
            )


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
        raw.pop("format", None)
        settings = SamplingSettings(**raw)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / SETTINGS} is corrupt or not an AMED settings file: {e}") from e
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


def sample_checkpoint(model: ModelInfo, noise: torch.Tensor, predictor: AMEDPredictor,
                      settings: SamplingSettings, **kwargs: Any) -> torch.Tensor:
    """Sample `model` from `noise` exactly as the checkpoint prescribes (student, schedule, AFS, options)."""
    settings.check_model(model)
    if tuple(noise.shape[1:]) != tuple(model.shape):
        raise ModelError(f"noise shape {tuple(noise.shape[1:])} does not match model shape {model.shape}")
    return sample(model.denoiser, noise, settings.student, settings.schedule_tensor(), afs=settings.afs,
                  predictor=predictor, bottleneck=model.bottleneck, **settings.student_options, **kwargs)
