"""FID-style metrics (docs/maths.md §11): streamed float64 feature statistics, Fréchet distance, KID, feature
networks.

The implementation lives in `fewstep.evaluation.fid`; this module is its public face::

    from fewstep.metrics import compute_stats, frechet_distance, reference_stats
    fd = frechet_distance(compute_stats("samples/", "digits"), reference_stats("digits"))
"""

from .evaluation.fid import *
from .evaluation.fid import __all__  # noqa: F401
