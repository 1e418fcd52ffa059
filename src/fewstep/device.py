"""Where a run computes: `--device` for the commands that run a model (sample, bench, train, demo).

The model's weights are moved once to the device; the per-seed noise is still drawn on the CPU (identical on every
device, docs/maths.md §12) and moved there once, so the solver's state and arithmetic live where the model is and
no call copies x or D between devices. Under torchrun each rank uses its local device (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .errors import FewstepError

DEVICE_HELP = "where the model and the solver run: cpu (default), cuda, cuda:N, mps (torchrun: each rank's own GPU)"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device for `name` (None: cpu), checked to exist; a bare 'cuda' under torchrun is cuda:LOCAL_RANK."""
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise FewstepError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FewstepError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                               f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        if (device.index or 0) >= torch.cuda.device_count():
            raise FewstepError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise FewstepError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise FewstepError(f"--device {name}: unsupported device type {device.type!r}; use cpu, cuda or mps")
    return device


def _move(part: Any, device: torch.device) -> None:
    """Move a model part's weights or tensors in place: modules, and objects with a `to(device)` method."""
    if part is None:
        return
    if isinstance(part, torch.nn.Module) or callable(getattr(part, "to", None)):
        part.to(device)


def to_device(model: Any, device: str | torch.device | None) -> Any:
    """`model` (a ModelInfo) with its denoiser, conditional denoiser and classifier moved to `device` (checked),
    recorded as `model.device` so that noise and reference solves follow it. CPU leaves the model as it is."""
    device = resolve_device(device)
    if device.type != "cpu":
        for name in ("denoiser", "cond_denoiser", "noisy_classifier"):
            _move(getattr(model, name, None), device)
    return dataclasses.replace(model, device=str(device))


__all__ = ["DEVICE_HELP", "resolve_device", "to_device"]
