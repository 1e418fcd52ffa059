"""What AMED's predictor sees at t_n: 64 numbers from the model call D(x_n, t_n), at zero extra NFE.

* Models that declare a bottleneck module (U-Nets): its output, captured by a forward hook during the call,
  averaged over channels and pooled to 8×8 (docs/maths.md §8).
* Models without one (the analytic models): the same reduction applied to the denoised estimate D(x_n, t_n)
  itself — the network's best guess of the final sample, which is what decides the trajectory's curvature.
* Nodes whose call AFS skipped get zeros.
* Under classifier-free guidance (fewstep.conditioning) the network sees the doubled batch [∅; c]: the features
  are those of the conditional rows (the last B).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

FEATURE_DIM = 64


def reduce_to_features(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → channel mean → adaptive average pool to 8×8 → [B, 64]; other shapes are flattened
    and pooled to 64 values. Computed in float32."""
    t = t.detach().float()
    if t.ndim == 4:
        return F.adaptive_avg_pool2d(t.mean(1, keepdim=True), 8).reshape(t.shape[0], FEATURE_DIM)
    flat = t.reshape(t.shape[0], 1, -1)
    return F.adaptive_avg_pool1d(flat, FEATURE_DIM).reshape(t.shape[0], FEATURE_DIM)


class BottleneckHook:
    """A forward hook on `module` that keeps its latest output; `features(x, D)` reduces that output."""

    def __init__(self, module: torch.nn.Module):
        self.latest: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.latest = out

    def features(self, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.latest is None or self.latest.shape[0] not in (b, 2 * b):
            raise RuntimeError("the bottleneck hook saw no output of the expected batch size during the model call")
        feats = reduce_to_features(self.latest[-b:])  # the conditional rows of a guided (doubled) batch
        self.latest = None
        return feats

    def remove(self) -> None:
        self.handle.remove()


def generic_features(x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The documented feature for models without a bottleneck: the reduced denoised estimate."""
    return reduce_to_features(denoised)


FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def feature_source(bottleneck: torch.nn.Module | None) -> Iterator[FeatureFn]:
    """The feature function for a model: a bottleneck hook (removed afterwards) or the generic feature."""
    if bottleneck is None:
        yield generic_features
        return
    hook = BottleneckHook(bottleneck)
    try:
        yield hook.features
    finally:
        hook.remove()
