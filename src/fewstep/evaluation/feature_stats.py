"""Streaming feature statistics and the distances between them (docs/maths.md §11): `FeatureStats` (float64
running moments plus a bounded, batch-independent subset of rows for KID), the Fréchet distance and KID.
Part of `fewstep.evaluation.fid`, which re-exports everything here."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FewstepError
from ..io import atomic_write

STATS_FORMAT = "fewstep-fid-stats-1"
DEFAULT_KID_SUBSET = 1000
DEFAULT_KID_SUBSETS = 100
DEFAULT_RESERVOIR = 10_000


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
        except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:
            raise FewstepError(f"cannot read statistics file {path}: {e}") from e
        if st._mu.ndim != 1 or st._sigma.shape != (st.dim, st.dim):
            raise FewstepError(f"{path}: mu has shape {st._mu.shape} and sigma {st._sigma.shape}; expected (D,) and "
                               "(D, D)")
        _check_covariance(st._mu, st._sigma, str(path))
        return st


def _check_covariance(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    """Refuse statistics that cannot give a Fréchet distance: NaN/Inf, or a covariance that is not symmetric
    positive semi-definite (up to rounding)."""
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FewstepError(f"{where}: the statistics hold NaN or Inf values; recompute them (fewstep fid ref)")
    scale = max(float(np.abs(sigma).max()), 1e-300) if sigma.size else 1.0
    if sigma.size and float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise FewstepError(f"{where}: sigma is not symmetric, so it is not a covariance matrix")
    if sigma.size and float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min()) < -1e-6 * scale:
        raise FewstepError(f"{where}: sigma is not positive semi-definite, so it is not a covariance matrix")


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
    _check_covariance(mu1, s1, "the first statistics")
    _check_covariance(mu2, s2, "the second statistics")
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
