"""Feature networks for FD/KID (docs/maths.md §11): the digit classifier's penultimate layer and Inception-v3 in
the standard FID configuration, their weight fingerprints, and the shipped reference statistics. Part of
`fewstep.evaluation.fid`, which re-exports everything here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import FewstepError, ModelError
from .feature_stats import FeatureStats

INCEPTION_WEIGHTS_ENV = "FEWSTEP_INCEPTION_WEIGHTS"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class FeatureNetworkError(ModelError):
    """A feature network is unknown, not installed, or its weights cannot be found or do not fit."""


class FeatureNetwork(Protocol):
    """images float [B, C, H, W] in [−1, 1] → features [B, D]."""

    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class DigitsFeatures:
    """Penultimate-layer features of the project's digit classifier (`fewstep.models.load_classifier()`).

    Images are made single-channel (channel mean); a nearest-neighbour up-scaling by an integer factor (as in
    the PNGs `fewstep sample` writes) is undone exactly, so a folder of saved samples scores like the tensors
    they came from; larger images are then averaged down to the classifier's resolution, smaller ones are left
    to the classifier's own (bilinear) up-sampling, the one its training data went through.
    """

    name = "digits"

    def __init__(self, device: str | torch.device = "cpu", classifier: Any = None):
        """`classifier`: a module with `penultimate(x)` or a weights path; default the shipped classifier."""
        net = classifier if isinstance(classifier, torch.nn.Module) else self._load(classifier)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.resolution = int(getattr(self.net, "resolution", 16))
        with torch.no_grad():
            probe = self.net.penultimate(torch.zeros(1, 1, self.resolution, self.resolution, device=self.device))
        self.dim = int(probe.reshape(1, -1).shape[1])
        self.fingerprint = network_fingerprint(self.net)

    @staticmethod
    def _load(path: str | os.PathLike | None) -> Any:
        try:
            from ..models import load_classifier  # type: ignore[attr-defined]
        except ImportError:
            try:
                from ..models.classifier import load_classifier
            except ImportError as e:
                raise FeatureNetworkError(
                    "the 'digits' feature network needs the project's digit classifier "
                    "(fewstep.models.load_classifier), which this installation does not provide") from e
        try:
            return load_classifier(path) if path is not None else load_classifier()
        except FewstepError as e:
            raise FeatureNetworkError(f"the 'digits' feature network is unavailable: {e}") from e

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        x = undo_nearest_upscale(x, min_size=4)
        return resize(x, self.resolution) if x.shape[-1] > self.resolution else x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.penultimate(self.prepare(images)).reshape(images.shape[0], -1).float()


def network_fingerprint(net: torch.nn.Module) -> str:
    """A short hash of a network's weights (state dict, sorted keys): ties statistics to the exact network."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def check_network(ref: FeatureStats, net: Any) -> None:
    """Refuse statistics made with other weights of the same feature network (they are incomparable)."""
    made_with, now = ref.meta.get("network"), getattr(net, "fingerprint", None)
    if made_with and now and made_with != now:
        raise FeatureNetworkError(
            f"the reference statistics were made with other {net.name!r} network weights ({made_with}) than the "
            f"installed ones ({now}); recompute them with `fewstep fid ref`"
            + (" (the shipped digits reference: fewstep.evaluation.fid.make_reference_stats())"
               if net.name == "digits" else ""))


def undo_nearest_upscale(x: torch.Tensor, min_size: int = 4) -> torch.Tensor:
    """If every image of the batch is constant on f×f blocks (a nearest-neighbour up-scaling by f), return the
    f-times smaller batch (largest such f keeping ≥ `min_size` pixels a side); else x unchanged."""
    h, w = x.shape[-2:]
    for f in range(min(h, w) // min_size, 1, -1):
        if h % f or w % f:
            continue
        small = x[..., ::f, ::f]
        if torch.equal(small.repeat_interleave(f, -2).repeat_interleave(f, -1), x):
            return small
    return x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] → [B, C, size, size]: block means for integer down-scales, bilinear otherwise."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h % size == 0 and w % size == 0:
        return F.avg_pool2d(x, (h // size, w // size))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=h > size)


def inception_weight_candidates(weights: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Where the Inception weights are looked for, in order: (what, path)."""
    out: list[tuple[str, Path]] = []
    if weights:
        out.append(("--inception-weights / weights=", Path(weights).expanduser()))
    if os.environ.get(INCEPTION_WEIGHTS_ENV):
        out.append((f"${INCEPTION_WEIGHTS_ENV}", Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser()))
    out.append(("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / _inception_file_name()))
    return out


def _inception_file_name() -> str:
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL
    except ImportError:
        return "pt_inception-2015-12-05-6726825d.pth"
    return FID_WEIGHTS_URL.rsplit("/", 1)[-1]


class InceptionFeatures:
    """Inception-v3 pool3 features (2048-d) in the standard FID configuration, through pytorch-fid.

    Input [−1, 1] is mapped to pytorch-fid's [0, 1] convention (so uint8 images become x/255 as in its own
    loader), grey images are repeated to RGB, and the library resizes to 299×299 (bilinear) and rescales.
    """

    name = "inception"
    dim = 2048

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        try:
            from unittest import mock

            import pytorch_fid.inception as pfi
        except ImportError as e:
            raise FeatureNetworkError(
                "the 'inception' feature network needs the optional package pytorch-fid: "
                "pip install 'fewstep[fid]' (or pip install pytorch-fid)") from e
        tried = inception_weight_candidates(weights)
        path = next((p for _, p in tried if p.is_file()), None)
        if path is None:
            where = "\n".join(f"  - {what}: {p}" for what, p in tried)
            raise FeatureNetworkError(
                "Inception-v3 FID weights not found (nothing is downloaded). Looked in:\n" + where + "\n"
                f"Provide the file {_inception_file_name()} (pytorch-fid's FID weights, ported from TensorFlow's "
                f"inception-2015-12-05) with --inception-weights PATH, the environment variable "
                f"{INCEPTION_WEIGHTS_ENV}=PATH, or by placing it in the torch hub cache path above.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FeatureNetworkError(f"cannot read Inception weights {path}: {e}") from e
        try:  # the library's own architecture and load_state_dict (strict), with the weights from our file
            with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
                net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                      normalize_input=True, use_fid_inception=True)
        except (RuntimeError, KeyError, TypeError) as e:
            raise FeatureNetworkError(f"{path} is not a pytorch-fid Inception-v3 state dict: {e}") from e
        self.path = path
        self.fingerprint = network_fingerprint(net)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.device, torch.float32) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise FewstepError(f"Inception needs 1- or 3-channel images, got {x.shape[1]} channels")
        return self.net(x)[0].reshape(x.shape[0], -1).float()


FEATURE_NETWORKS: dict[str, Callable[..., FeatureNetwork]] = {"digits": DigitsFeatures, "inception": InceptionFeatures}


def get_feature_network(name: str, device: str | torch.device = "cpu", **kwargs: Any) -> FeatureNetwork:
    """A feature network by name ('digits' or 'inception'; `weights=` for inception)."""
    if name not in FEATURE_NETWORKS:
        raise FeatureNetworkError(f"unknown feature network {name!r}; choose from {', '.join(FEATURE_NETWORKS)}")
    if name != "inception":
        kwargs.pop("weights", None)
    return FEATURE_NETWORKS[name](device=device, **kwargs)


# Built-in models whose data a feature network understands, and the shipped reference statistics for them.
MODEL_FEATURES: dict[str, str] = {"digits": "digits", "digits-opt": "digits"}
REFERENCE_FILES: dict[str, str] = {"digits": "digits_fd_ref.npz"}


def reference_stats(features: str = "digits") -> FeatureStats:
    """The shipped reference statistics of the built-in data for a feature network."""
    if features not in REFERENCE_FILES:
        raise FeatureNetworkError(f"no shipped reference statistics for features {features!r}; make them with "
                                  "`fewstep fid ref --images PATH --dest stats.npz`")
    path = DATA_DIR / REFERENCE_FILES[features]
    if not path.is_file():
        raise FeatureNetworkError(f"shipped reference statistics {path} are missing from this installation")
    return FeatureStats.load(path)
