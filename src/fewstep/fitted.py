"""Fit on a GPU, sample anywhere: what a card or an AMED predictor records of the model it was fitted on, and the
check when it samples a model.

A card or predictor is refused on another model (another name, frame or weights); it is accepted on the same model
in another dtype or on another device, and at another sample size (a pipeline at another height / width) with a
warning, since a grid fitted at one resolution transfers to another only approximately. What names "the same
model": the name without its size and dtype settings (`diffusers:DIR?height=…&width=…&dtype=…` loses those keys)
and the weights' own fingerprint (a pipeline folder's file fingerprint, `record["folder_fingerprint"]`; else the
model's fingerprint).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

SIZE_SETTINGS = ("height", "width", "dtype")  # settings of a model spec that a fitted solver may differ in


def base_name(name: str) -> str:
    """The model name without its size and dtype settings."""
    path, mark, query = name.rpartition("?")
    if not mark:
        return name
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in SIZE_SETTINGS]
    return path + (f"?{urlencode(kept, quote_via=quote)}" if kept else "")


def weights_id(model: Any) -> str:
    """The fingerprint of the weights alone (independent of size and dtype where the model says so)."""
    record = getattr(model, "record", None) or {}
    return str(record.get("folder_fingerprint") or getattr(model, "fingerprint", "") or "")


def fitted_weights(model: Any) -> str:
    """What a card or predictor records as `weights`: the weights-only fingerprint where the model has one
    (a pipeline folder's), else '' (the model's fingerprint is then what identifies its weights)."""
    record = getattr(model, "record", None) or {}
    return str(record.get("folder_fingerprint") or "")


def describe_shape(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


def check_fitted(what: str, error: type[Exception], name: str, shape: Sequence[int] | None, fingerprint: str,
                 weights: str, dtype: str, model: Any, resizable: bool = True, remedy: str = "fit it again") -> None:
    """Refuse `model` unless it is the model `what` was fitted on (module docstring); warn at another sample size.

    `what` reads 'card was learned' or the like; `name`, `shape`, `fingerprint`, `weights` (the weights-only
    fingerprint, '' when not recorded) and `dtype` are what it recorded; `resizable`: whether it can run at another
    size at all; `remedy` ends the message about other weights."""
    same_name = name == model.name or base_name(name) == base_name(model.name)
    same_shape = shape is None or list(shape) == list(model.shape)
    other_size = (not same_shape and len(shape) == len(model.shape) and len(shape) > 1
                  and shape[0] == model.shape[0] and resizable)
    if not same_name or not (same_shape or other_size):
        raise error(f"this {what} for model {name!r} {tuple(shape or ())}, not {model.name!r} {tuple(model.shape)}")
    if weights and weights_id(model):
        differ = weights != weights_id(model)
    else:
        differ = bool(fingerprint and model.fingerprint and fingerprint != model.fingerprint)
    if differ:
        raise error(f"this {what} for other weights of {name!r} (fingerprint {weights or fingerprint}, the loaded "
                    f"model has {weights_id(model) if weights else model.fingerprint}); {remedy}")
    if other_size:
        warnings.warn(f"this {what} at {describe_shape(shape)}{f' ({dtype})' if dtype else ''}; sampling "
                      f"{describe_shape(model.shape)}: a grid fitted at one size transfers to another only "
                      "approximately (fit one at this size for the best results)", UserWarning, stacklevel=3)
