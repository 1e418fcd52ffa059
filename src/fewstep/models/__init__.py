"""Models: analytic denoisers with exact answers and the built-in model registry."""

from .analytic import EmpiricalDenoiser, GaussianMixture
from .registry import BUILTIN_MODELS, DEFAULT_MODEL, ModelInfo, load_model

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "EmpiricalDenoiser", "GaussianMixture", "ModelInfo", "load_model"]
