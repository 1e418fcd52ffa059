"""FID-style scores from streamed feature statistics (SPEC §8): Fréchet distance and KID.

Images flow through a pluggable feature network in batches; only float64 running sums (Σf and Σff^T, taken
about a fixed shift for accuracy) and a bounded, batch-size independent random subset of features (for KID)
are kept, never all features. Sources: a folder of PNGs, an `.npz` array (key 'images': uint8 [N, H, W, C] or
float in [−1, 1]), a tensor straight from a sampler ([B, C, H, W] in [−1, 1]) or any iterable of such batches.

Feature networks (`get_feature_network(name)`):

* ``digits`` — the penultimate layer of the project's digit classifier (`fewstep.models.load_classifier()`),
  giving the "FD-digits" score of the built-in digit data; reference statistics ship with the package
  (`reference_stats("digits")`).
* ``inception`` — Inception-v3 in the standard FID configuration (pytorch-fid's `InceptionV3`: the TensorFlow
  FID weights, 2048-d pool3 features, bilinear resize to 299×299, inputs scaled to [−1, 1] as that library
  does). Optional extra ``pip install 'fewstep[fid]'``. Weights are read from `weights=` /
  `--inception-weights`, else $FEWSTEP_INCEPTION_WEIGHTS, else the torch hub cache
  (`<torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-6726825d.pth`); nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FewstepError, ModelError
from ..io import atomic_write

STATS_FORMAT = "fewstep-fid-stats-1"
DEFAULT_KID_SUBSET = 1000
DEFAULT_KID_SUBSETS = 100
DEFAULT_RESERVOIR = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INCEPTION_WEIGHTS_ENV = "FEWSTEP_INCEPTION_WEIGHTS"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class FeatureNetworkError(ModelError):
    """A feature network is unknown, not installed, or its weights cannot be found or do not fit."""


# ----------------------------------------------------------------------------------------------- statistics


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (uint64 → uint64): the random key of a feature row from its global index."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class FeatureStats:
    """Streaming Gaussian statistics of features, accumulated in float64, plus a bounded subset for KID.

    `update(features [B, D])` adds a batch. The mean and covariance (unbiased, as `np.cov`) come from the
    running sum and sum of outer products about a shift (the first batch's mean), so memory is O(D²) however
    many images pass. `reservoir` rows (default 10 000; 0 disables KID) are kept as a uniform random subset by
    bottom-k sampling on a hash of each row's global index: the subset depends on `seed` and the order of rows,
    not on how they were batched.
    """

    def __init__(self, reservoir: int = DEFAULT_RESERVOIR, seed: int = 0, feature_name: str = ""):
        self.reservoir = int(reservoir)
        self.seed = int(seed)
        self.feature_name = feature_name
        self.n = 0
        self.dim: int | None = None
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None
        self._keys = np.zeros(0, dtype=np.uint64)
        self._kept = np.zeros((0, 0), dtype=np.float32)
        self._mu: np.ndarray | None = None  # set instead of sums when loaded from mean/covariance only
        self._sigma: np.ndarray | None = None
        self.meta: dict[str, str] = {}

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        if self._mu is not None:
            raise FewstepError("these statistics were loaded from mean/covariance only and cannot be extended")
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if f.ndim != 2:
            raise FewstepError(f"features must be [batch, dim], got shape {f.shape}")
        if f.shape[0] == 0:
            return self
        f64 = f.astype(np.float64)
        if not np.isfinite(f64).all():
            raise FewstepError("non-finite features (NaN/Inf): check the images and the feature network")
        if self.dim is None:
            self.dim = f.shape[1]
            self._shift = f64.mean(0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
            self._kept = np.zeros((0, self.dim), dtype=np.float32)
        elif f.shape[1] != self.dim:
            raise FewstepError(f"feature dimension changed from {self.dim} to {f.shape[1]}")
        c = f64 - self._shift
        self._sum += c.sum(0)
        self._outer += c.T @ c
        if self.reservoir > 0:
            idx = np.arange(self.n, self.n + f.shape[0], dtype=np.uint64)
            keys = _splitmix64(idx ^ np.uint64(self.seed * 0x632BE59BD9B4E019 % 2**64))
            rows = f
            if len(self._keys) == self.reservoir:  # full: only rows beating the largest kept key can enter
                take = keys < self._keys[-1]
                keys, rows = keys[take], f[take]
            if len(keys):
                self._keep(np.concatenate([self._keys, keys]), np.concatenate([self._kept, rows.astype(np.float32)]))
        self.n += f.shape[0]
        return self

    def _keep(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if len(keys) > self.reservoir:
            sel = np.argpartition(keys, self.reservoir - 1)[: self.reservoir]
            keys, rows = keys[sel], rows[sel]
        order = np.argsort(keys, kind="stable")
        self._keys, self._kept = keys[order], rows[order]

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's rows (as if they had come after these; keys of `other` are kept)."""
        if other.n == 0:
            return self
        if self._mu is not None or other._mu is not None:
            raise FewstepError("statistics loaded from mean/covariance only cannot be merged")
        if self.n == 0:
            self.dim, self._shift = other.dim, other._shift.copy()
            self._sum, self._outer = other._sum.copy(), other._outer.copy()
            self._keys, self._kept, self.n = other._keys.copy(), other._kept.copy(), other.n
            return self
        if other.dim != self.dim:
            raise FewstepError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        delta = other._shift - self._shift  # Σ(f−a)(f−a)ᵀ = Σ(f−b)(f−b)ᵀ + s_b δᵀ + δ s_bᵀ + n δδᵀ, δ = b − a
        self._outer += other._outer + np.outer(other._sum, delta) + np.outer(delta, other._sum)
        self._outer += other.n * np.outer(delta, delta)
        self._sum += other._sum + other.n * delta
        self.n += other.n
        if self.reservoir > 0 and len(other._keys):
            self._keep(np.concatenate([self._keys, other._keys]), np.concatenate([self._kept, other._kept]))
        return self

    @property
    def mu(self) -> np.ndarray:
        if self._mu is not None:
            return self._mu
        if self.n == 0:
            raise FewstepError("no features were accumulated (no images?)")
        return self._shift + self._sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self._sigma is not None:
            return self._sigma
        if self.n < 2:
            raise FewstepError(f"a covariance needs at least 2 images, got {self.n}")
        m = self._sum / self.n
        cov = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return (cov + cov.T) / 2

    @property
    def kid_features(self) -> np.ndarray | None:
        """The kept random subset of feature rows (float32 [≤ reservoir, D]), or None when none were kept."""
        return self._kept if len(self._kept) else None

    # -- persistence -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, **meta: Any) -> Path:
        """Write an `.npz` with `mu`, `sigma` (pytorch-fid compatible keys), `n`, the feature network name,
        the KID subset and any extra string metadata; atomically."""
        arrays: dict[str, Any] = {
            "format": np.array(STATS_FORMAT), "mu": self.mu, "sigma": self.sigma, "n": np.array(self.n),
            "features": np.array(self.feature_name),
        }
        if self.kid_features is not None:
            arrays["kid_features"] = self.kid_features
        for key, value in {**self.meta, **meta}.items():
            arrays[f"meta_{key}"] = np.array(str(value))

        def _write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return atomic_write(path, _write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by `save` (or any `.npz` with `mu` and `sigma`, e.g. pytorch-fid's)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "mu" not in z or "sigma" not in z:
                    raise FewstepError(f"{path} holds no 'mu'/'sigma' arrays: not a statistics file")
                st = cls(reservoir=0, feature_name=str(z["features"]) if "features" in z else "")
                st._mu = z["mu"].astype(np.float64)
                st._sigma = z["sigma"].astype(np.float64)
                st.n = int(z["n"]) if "n" in z else 0
                st.dim = len(st._mu)
                if "kid_features" in z:
                    st._kept = z["kid_features"].astype(np.float32)
                st.meta = {k[5:]: str(z[k]) for k in z.files if k.startswith("meta_")}
        except (OSError, ValueError) as e:
            raise FewstepError(f"cannot read statistics file {path}: {e}") from e
        if st._sigma.shape != (st.dim, st.dim):
            raise FewstepError(f"{path}: sigma has shape {st._sigma.shape}, expected {(st.dim, st.dim)}")
        return st


# ------------------------------------------------------------------------------------------------ distances


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray | FeatureStats, sigma1: np.ndarray | FeatureStats | None = None,
                     mu2: np.ndarray | None = None, sigma2: np.ndarray | None = None) -> float:
    """‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) in float64.

    Call as `frechet_distance(stats1, stats2)` or `frechet_distance(mu1, sigma1, mu2, sigma2)`.
    Tr (Σ₁Σ₂)^½ = Σ √λᵢ(Σ₁^½ Σ₂ Σ₁^½): a symmetric PSD eigenproblem, so singular covariances (fewer images
    than feature dimensions) need no ε-regularisation and no imaginary parts appear.
    """
    if isinstance(mu1, FeatureStats):
        if not isinstance(sigma1, FeatureStats):
            raise TypeError("give two FeatureStats or four arrays")
        mu1, sigma1, mu2, sigma2 = mu1.mu, mu1.sigma, sigma1.mu, sigma1.sigma
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise FewstepError(f"statistics do not match: μ {mu1.shape} vs {mu2.shape}, Σ {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


@dataclass
class KID:
    mean: float
    std: float
    subset_size: int
    subsets: int


def kernel_inception_distance(f1: np.ndarray | FeatureStats, f2: np.ndarray | FeatureStats,
                              subset_size: int = DEFAULT_KID_SUBSET, subsets: int = DEFAULT_KID_SUBSETS,
                              seed: int = 0) -> KID:
    """KID: the unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³, averaged over
    `subsets` random subsets of `subset_size` rows of each set (clipped to the smaller set's size)."""
    a = f1.kid_features if isinstance(f1, FeatureStats) else np.asarray(f1)
    b = f2.kid_features if isinstance(f2, FeatureStats) else np.asarray(f2)
    if a is None or b is None:
        raise FewstepError("KID needs feature rows; these statistics kept none (reference made with no KID "
                           "subset?) — recompute the reference with `fewstep fid ref`")
    a, b = a.astype(np.float64), b.astype(np.float64)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise FewstepError("KID needs at least 2 feature rows in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals[i] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    return KID(float(vals.mean()), float(vals.std()), m, subsets)


# -------------------------------------------------------------------------------------------- feature networks


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
        except Exception as e:  # noqa: BLE001
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


def make_reference_stats(dest: str | os.PathLike | None = None, features: str = "digits") -> Path:
    """(Re)build the shipped reference statistics: the `digits` U-Net's training split (1 438 digits at 16×16,
    PNG-quantised) through the digit classifier; every row kept for KID."""
    if features != "digits":
        raise FeatureNetworkError("only the 'digits' reference statistics are built in")
    stats = compute_stats("digits-train", "digits", reservoir=DEFAULT_RESERVOIR)
    return stats.save(dest or DATA_DIR / REFERENCE_FILES[features],
                      source="digits-train: sklearn digits, 16x16 bilinear, fixed 80% training split of the "
                             "digits U-Net (fewstep.models.train_unet.digits_split)")


def reference_stats(features: str = "digits") -> FeatureStats:
    """The shipped reference statistics of the built-in data for a feature network."""
    if features not in REFERENCE_FILES:
        raise FeatureNetworkError(f"no shipped reference statistics for features {features!r}; make them with "
                                  "`fewstep fid ref --images PATH --dest stats.npz`")
    path = DATA_DIR / REFERENCE_FILES[features]
    if not path.is_file():
        raise FeatureNetworkError(f"shipped reference statistics {path} are missing from this installation")
    return FeatureStats.load(path)


# ---------------------------------------------------------------------------------------------------- sources


ImageSource = str | os.PathLike | torch.Tensor | np.ndarray | Iterable[torch.Tensor]


def _digits_split(part: str) -> torch.Tensor:
    from ..models.train_unet import digits_split

    return digits_split(16)[f"{part}_x"]


# Built-in image sets usable wherever a source is named (unless a file or folder of that name exists):
# the 16×16 digits the `digits` U-Net trained on, and the held-out split (the classifier's training data).
BUILTIN_IMAGE_SETS: dict[str, Callable[[], torch.Tensor]] = {
    "digits-train": lambda: _digits_split("train"),
    "digits-held": lambda: _digits_split("held"),
}


def _to_unit(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 batch [B, H, W, C] / [B, H, W] or a float batch [B, C, H, W] / [B, H, W, C] → float [B, C, H, W]
    in [−1, 1] (uint8 v ↦ v/127.5 − 1)."""
    t = torch.as_tensor(np.asarray(arr)) if isinstance(arr, np.ndarray) else arr
    if t.ndim == 3:
        t = t.unsqueeze(-1) if t.dtype == torch.uint8 else t.unsqueeze(1)
    if t.ndim != 4:
        raise FewstepError(f"images must be [N, H, W, C] (uint8) or [N, C, H, W] (float), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    if not t.is_floating_point():
        raise FewstepError(f"images must be uint8 or float, got {t.dtype}")
    if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [−1, 1] images to the 256 levels a PNG stores (as `fewstep sample` writes them)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FewstepError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("L" if im.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def iter_image_batches(source: ImageSource, batch: int = 256, quantize_floats: bool = True) -> Iterator[torch.Tensor]:
    """Batches float [B, C, H, W] in [−1, 1] from a folder of images, an `.npz` file (key 'images', else its
    only array), an array/tensor of images, or an iterable of such batches. Float input is rounded to PNG
    levels unless `quantize_floats=False`, so a sampler's tensor scores like the PNGs it would write."""
    if batch < 1:
        raise FewstepError("batch must be >= 1")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists() and str(source) in BUILTIN_IMAGE_SETS:
            yield from iter_image_batches(BUILTIN_IMAGE_SETS[str(source)](), batch, quantize_floats)
            return
        if path.is_dir():
            files = list_images(path)
            for i in range(0, len(files), batch):
                arrs = [_read_image(p) for p in files[i : i + batch]]
                shapes = {a.shape for a in arrs}
                if len(shapes) > 1:
                    raise FewstepError(f"images in {path} differ in size/channels: {sorted(shapes)}")
                yield _to_unit(np.stack(arrs))
            return
        if path.suffix == ".npz" and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                key = "images" if "images" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise FewstepError(f"{path} has no 'images' array (arrays: {', '.join(z.files)})")
                arr = z[key]
            yield from iter_image_batches(arr, batch, quantize_floats)
            return
        raise FewstepError(f"{path}: not a folder of images nor an .npz file (built-in sets: "
                           f"{', '.join(BUILTIN_IMAGE_SETS)})")
    if isinstance(source, (torch.Tensor, np.ndarray)):
        for i in range(0, len(source), batch):
            x = _to_unit(source[i : i + batch])
            is_uint8 = source.dtype == torch.uint8 if isinstance(source, torch.Tensor) else source.dtype == np.uint8
            yield x if is_uint8 or not quantize_floats else quantize(x)
        return
    for chunk in source:
        yield from iter_image_batches(chunk, batch, quantize_floats)


def compute_stats(source: ImageSource, features: str | FeatureNetwork = "digits", batch: int = 256,
                  device: str | torch.device = "cpu", reservoir: int = DEFAULT_RESERVOIR, seed: int = 0,
                  quantize_floats: bool = True, progress: bool = False, **network_kwargs: Any) -> FeatureStats:
    """Stream `source` through a feature network (name or instance) into float64 statistics."""
    from tqdm.auto import tqdm

    net = get_feature_network(features, device, **network_kwargs) if isinstance(features, str) else features
    stats = FeatureStats(reservoir=reservoir, seed=seed, feature_name=net.name)
    if getattr(net, "fingerprint", None):
        stats.meta["network"] = net.fingerprint
    for x in tqdm(iter_image_batches(source, batch, quantize_floats), desc=f"features ({net.name})",
                  disable=not progress, leave=False):
        stats.update(net(x))
    return stats


def sampler_batches(model: Any, seeds: Sequence[int], solver: str = "heun", num_steps: int = 18,
                    batch: int = 256, **sample_kwargs: Any) -> Iterator[torch.Tensor]:
    """Samples of a built-in model (`ModelInfo`) batch by batch, with per-seed noise: feed to `compute_stats`
    to score a sampler without holding or writing all its images."""
    from ..noise import seeded_noise
    from ..schedules import get_schedule
    from ..solvers import RECOMMENDED_SCHEDULE, sample

    name, rho = RECOMMENDED_SCHEDULE.get(solver, ("polynomial", 7.0))
    sched = sample_kwargs.pop("schedule", None)
    if sched is None:
        sched = get_schedule(name, num_steps, model.sigma_min, model.sigma_max, rho=rho)
    for i in range(0, len(seeds), batch):
        noise = seeded_noise(list(seeds[i : i + batch]), model.shape)
        yield sample(model.denoiser, noise, solver, sched, **sample_kwargs)


def fid_score(source: ImageSource, ref: FeatureStats | str | os.PathLike, features: str | None = None,
              kid: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Score images against reference statistics: {'fd', 'n', 'features'[, 'kid', 'kid_std']}."""
    ref_stats = ref if isinstance(ref, FeatureStats) else FeatureStats.load(ref)
    name = features or ref_stats.feature_name or ("inception" if ref_stats.dim == InceptionFeatures.dim else "digits")
    if ref_stats.feature_name and name != ref_stats.feature_name:
        raise FewstepError(f"reference statistics were made with {ref_stats.feature_name!r} features, "
                           f"not {name!r}")
    net = get_feature_network(name, kwargs.pop("device", "cpu"), weights=kwargs.pop("weights", None))
    check_network(ref_stats, net)
    stats = compute_stats(source, net, **kwargs)
    out: dict[str, Any] = {"features": name, "n": stats.n, "n_ref": ref_stats.n,
                           "fd": frechet_distance(stats, ref_stats)}
    if kid:
        k = kernel_inception_distance(stats, ref_stats)
        out.update(kid=k.mean, kid_std=k.std, kid_subset_size=k.subset_size, kid_subsets=k.subsets)
    return out


# ----------------------------------------------------------------------------------------- bench integration


def model_feature_network(model_name: str) -> str:
    """The feature network that understands a built-in model's data (raises for models with none)."""
    if model_name not in MODEL_FEATURES:
        raise FeatureNetworkError(f"model {model_name!r} has no feature network; FD scores exist for "
                                  f"{', '.join(MODEL_FEATURES)}")
    return MODEL_FEATURES[model_name]


def bench_fd_metric(model_name: str, device: str | torch.device = "cpu",
                    batch: int = 256) -> Callable[[torch.Tensor], dict[str, float]]:
    """For `run_bench(extra_metrics=…)`: samples [B, C, H, W] → {'fd_<features>': FD against the shipped
    reference statistics}. Loads the network and the reference once."""
    name = model_feature_network(model_name)
    net = get_feature_network(name, device)
    ref = reference_stats(name)
    check_network(ref, net)

    def metric(x: torch.Tensor) -> dict[str, float]:
        stats = compute_stats(x, net, batch=batch, reservoir=0)
        return {f"fd_{name}": frechet_distance(stats, ref)}

    return metric


__all__ = [
    "BUILTIN_IMAGE_SETS", "DEFAULT_KID_SUBSET", "DEFAULT_KID_SUBSETS", "FEATURE_NETWORKS", "INCEPTION_WEIGHTS_ENV",
    "KID", "MODEL_FEATURES", "DigitsFeatures", "FeatureNetwork", "FeatureNetworkError", "FeatureStats",
    "InceptionFeatures", "bench_fd_metric", "check_network", "compute_stats", "fid_score", "frechet_distance",
    "get_feature_network", "inception_weight_candidates", "iter_image_batches", "kernel_inception_distance",
    "list_images", "make_reference_stats", "model_feature_network", "network_fingerprint", "quantize",
    "reference_stats", "resize", "sampler_batches", "undo_nearest_upscale",
]
