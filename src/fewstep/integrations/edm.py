"""A `--model` factory for NVlabs EDM network snapshots (`network-snapshot-*.pkl`, e.g. edm-cifar10-32x32-*.pkl).

The pickles reference the EDM repository's own `dnnlib` and `torch_utils` packages, so that repository must be
importable (clone github.com/NVlabs/edm and put it on PYTHONPATH). Then, from the shell:

    FEWSTEP_EDM_PKL=edm-cifar10-32x32-uncond-vp.pkl PYTHONPATH=path/to/edm \\
        fewstep sample --model fewstep.integrations.edm:from_env --solver ipndm --nfe 5 --seeds 0-63 --out out/

or from Python: `info = load_edm("edm-cifar10-32x32-uncond-vp.pkl")` → a ModelInfo whose `denoiser(x, σ)` is the
network's own preconditioned D(x, σ) (EDMPrecond / VPPrecond / VEPrecond all return D), whose σ range is EDM's
[0.002, 80] clipped to the network's, and whose `bottleneck` is the last (lowest-resolution) encoder block of
the U-Net (the block AMED's reference code hooks: '8x8_block3' for CIFAR-10, '8x8_block2' for ImageNet-64).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..models.registry import ModelInfo


def _require_edm_modules() -> None:
    try:
        import dnnlib  # noqa: F401
        import torch_utils  # noqa: F401
    except ImportError as e:
        raise ModelError(
            "loading an NVlabs EDM .pkl needs the EDM repository's `dnnlib` and `torch_utils` packages "
            f"({e}); clone https://github.com/NVlabs/edm and add it to PYTHONPATH"
        ) from e


def bottleneck_of(net: nn.Module) -> nn.Module | None:
    """The last encoder block of an EDM U-Net (SongUNet / DhariwalUNet inside the preconditioner), if any."""
    enc = getattr(getattr(net, "model", None), "enc", None)
    if isinstance(enc, nn.ModuleDict) and len(enc) > 0:
        return enc[list(enc.keys())[-1]]
    return None


class EDMDenoiser:
    """D(x, σ) of an EDM network; `class_label` (int) conditions class-conditional networks on one class, and
    `denoiser(x, σ, labels)` on a class per sample (int64 [B]; label_dim = ∅, a zero label vector as in EDM's
    label dropout) for fewstep.conditioning (`--classes`, `--guidance`)."""

    def __init__(self, net: nn.Module, class_label: int | None = None):
        self.net = net
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)
        if class_label is not None and not (0 <= class_label < self.label_dim):
            raise ModelError(f"class_label {class_label} out of range for a network with {self.label_dim} classes")
        self.class_label = class_label

    def to(self, device: str | torch.device) -> EDMDenoiser:
        """Move the network (in place); inputs already on its device and in float32 are then not copied."""
        self.net.to(device)
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        device = next(self.net.parameters()).device
        labels = None
        if class_labels is not None:
            one_hot = torch.eye(self.label_dim + 1, device=device)[class_labels.to(device, torch.long)]
            labels = one_hot[:, : self.label_dim]  # row label_dim (∅) is all zeros
        elif self.label_dim and self.class_label is not None:
            labels = torch.zeros(x.shape[0], self.label_dim, device=device)
            labels[:, self.class_label] = 1
        out = self.net(x.to(device, torch.float32), sigma.to(device, torch.float32), labels)
        return out.to(device=x.device, dtype=x.dtype)


def load_edm(path: str | Path, class_label: int | None = None, device: str | torch.device | None = None) -> ModelInfo:
    """Load an EDM network-snapshot .pkl (its 'ema' network) as a fewstep ModelInfo."""
    _require_edm_modules()
    path = str(path)
    try:
        if "://" in path:
            import dnnlib

            with dnnlib.util.open_url(path) as f:
                data = pickle.load(f)
        else:
            if not Path(path).is_file():
                raise ModelError(f"EDM snapshot {path} not found")
            with open(path, "rb") as f:
                data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise ModelError(f"{path} is not a readable EDM network snapshot: {e}") from e
    net = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(net, nn.Module):
        raise ModelError(f"{path}: expected a dict with an 'ema' network (EDM network-snapshot format)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = net.eval().requires_grad_(False).to(device)
    for attr in ("img_channels", "img_resolution"):
        if not hasattr(net, attr):
            raise ModelError(f"{path}: the network has no `{attr}`; is this an EDM preconditioned network?")
    lo = max(float(getattr(net, "sigma_min", 0.0) or 0.0), 0.002)
    hi = min(float(getattr(net, "sigma_max", float("inf"))), 80.0)
    res, ch = int(net.img_resolution), int(net.img_channels)
    label = "" if class_label is None else f", class {class_label}"
    den = EDMDenoiser(net, class_label)
    per_sample = class_label is None and den.label_dim > 0  # --classes / --guidance pick a class per sample
    return ModelInfo(f"edm:{Path(path).name}" + (f":{class_label}" if class_label is not None else ""),
                     den, (ch, res, res), lo, hi,
                     description=f"EDM network {Path(path).name} ({type(net).__name__}{label})",
                     bottleneck=bottleneck_of(net), num_classes=den.label_dim if per_sample else 0,
                     cond_denoiser=den if per_sample else None, device=str(device))


def from_env() -> ModelInfo:
    """The `--model fewstep.integrations.edm:from_env` factory: $FEWSTEP_EDM_PKL (path or URL), optional
    $FEWSTEP_EDM_CLASS (class label of a conditional network) and $FEWSTEP_EDM_DEVICE."""
    path = os.environ.get("FEWSTEP_EDM_PKL")
    if not path:
        raise ModelError("set FEWSTEP_EDM_PKL to an EDM network-snapshot .pkl (path or URL)")
    label = os.environ.get("FEWSTEP_EDM_CLASS")
    return load_edm(path, int(label) if label else None, os.environ.get("FEWSTEP_EDM_DEVICE"))
