"""FID-style scores from streamed feature statistics (docs/maths.md §11): Fréchet distance and KID.

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

The code is split along these lines: `feature_stats` (statistics, Fréchet distance, KID), `feature_networks`
(the networks and the shipped references), `image_sources` (reading images); this module scores sources and
serves the benchmark, and re-exports all of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import FewstepError
from .feature_networks import (  # noqa: F401  (re-exported)
    DATA_DIR,
    FEATURE_NETWORKS,
    INCEPTION_WEIGHTS_ENV,
    MODEL_FEATURES,
    REFERENCE_FILES,
    DigitsFeatures,
    FeatureNetwork,
    FeatureNetworkError,
    InceptionFeatures,
    _inception_file_name,
    check_network,
    get_feature_network,
    inception_weight_candidates,
    network_fingerprint,
    reference_stats,
    resize,
    undo_nearest_upscale,
)
from .feature_stats import (  # noqa: F401  (re-exported)
    DEFAULT_KID_SUBSET,
    DEFAULT_KID_SUBSETS,
    DEFAULT_RESERVOIR,
    KID,
    STATS_FORMAT,
    FeatureStats,
    frechet_distance,
    kernel_inception_distance,
)
from .image_sources import (  # noqa: F401  (re-exported)
    BUILTIN_IMAGE_SETS,
    IMAGE_SUFFIXES,
    ImageSource,
    iter_image_batches,
    list_images,
    quantize,
)

# ------------------------------------------------------------------------------------------------------ scores


def make_reference_stats(dest: str | os.PathLike | None = None, features: str = "digits") -> Path:
    """(Re)build the shipped reference statistics: the `digits` U-Net's training split (1 438 digits at 16×16,
    PNG-quantised) through the digit classifier; every row kept for KID."""
    if features != "digits":
        raise FeatureNetworkError("only the 'digits' reference statistics are built in")
    stats = compute_stats("digits-train", "digits", reservoir=DEFAULT_RESERVOIR)
    return stats.save(dest or DATA_DIR / REFERENCE_FILES[features],
                      source="digits-train: sklearn digits, 16x16 bilinear, fixed 80% training split of the "
                             "digits U-Net (fewstep.models.digits.digits_split)")


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
    from ..solvers import get_solver, sample

    name, rho = get_solver(solver).recommended_schedule
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
        stats = compute_stats(x.cpu(), net, batch=batch, reservoir=0)
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
