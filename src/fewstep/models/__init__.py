"""Models: analytic denoisers with exact answers and the built-in model registry."""

from .analytic import EmpiricalDenoiser, GaussianMixture
from .classifier import DigitClassifier, load_classifier
from .registry import BUILTIN_MODELS, DEFAULT_MODEL, ModelInfo, load_model
from .unet import DigitsUNet, load_unet

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "DigitClassifier", "DigitsUNet", "EmpiricalDenoiser", "GaussianMixture",
    "ModelInfo", "load_classifier", "load_model", "load_unet",
]
