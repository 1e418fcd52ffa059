"""FID-style metrics (SPEC §8): streamed float64 feature statistics, Fréchet distance, KID, feature networks.

The implementation lives in `fewstep.evaluation.fid`; this module is its public face::

    from fewstep.metrics import compute_stats, frechet_distance, reference_stats
    fd = frechet_distance(compute_stats("samples/", "digits"), reference_stats("digits"))
"""

from .evaluation.fid import (
    BUILTIN_IMAGE_SETS,
    DEFAULT_KID_SUBSET,
    DEFAULT_KID_SUBSETS,
    FEATURE_NETWORKS,
    INCEPTION_WEIGHTS_ENV,
    KID,
    MODEL_FEATURES,
    DigitsFeatures,
    FeatureNetwork,
    FeatureNetworkError,
    FeatureStats,
    InceptionFeatures,
    bench_fd_metric,
    check_network,
    compute_stats,
    fid_score,
    frechet_distance,
    get_feature_network,
    inception_weight_candidates,
    iter_image_batches,
    kernel_inception_distance,
    list_images,
    make_reference_stats,
    model_feature_network,
    network_fingerprint,
    quantize,
    reference_stats,
    resize,
    sampler_batches,
    undo_nearest_upscale,
)

__all__ = [
    "BUILTIN_IMAGE_SETS", "DEFAULT_KID_SUBSET", "DEFAULT_KID_SUBSETS", "FEATURE_NETWORKS", "INCEPTION_WEIGHTS_ENV",
    "KID", "MODEL_FEATURES", "DigitsFeatures", "FeatureNetwork", "FeatureNetworkError", "FeatureStats",
    "InceptionFeatures", "bench_fd_metric", "check_network", "compute_stats", "fid_score", "frechet_distance",
    "get_feature_network", "inception_weight_candidates", "iter_image_batches", "kernel_inception_distance",
    "list_images", "make_reference_stats", "model_feature_network", "network_fingerprint", "quantize",
    "reference_stats", "resize", "sampler_batches", "undo_nearest_upscale",
]
