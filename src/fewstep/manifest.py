"""`manifest.json`: an output folder records what made it, and a job resumes only into a folder it made.

`sample_manifest` builds the record (a plain dict); `claim_folder` writes it into a new folder, or checks it
against the one already there and refuses a mismatch (or, with `overwrite`, removes the old samples first).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import FewstepError
from .io import create_exclusive

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# recorded for people, not compared on resume (a job may resume on another device: its samples agree to rounding)
INFO_KEYS = frozenset({"fewstep_version", "predictor_path", "device"})
SAMPLE_FILE = re.compile(r"^\d{6,}\.(png|npy)$")  # what `fewstep sample` writes: a PNG per seed (latents)


class ManifestError(FewstepError):
    """An output folder was made with other settings, or its manifest is unreadable."""


def file_fingerprint(*paths: str | os.PathLike) -> str:
    """The first 12 hex digits of the SHA-1 of the files' bytes, in order (identifies weights and settings)."""
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:12]


def sample_manifest(model: Any, solver: str, options: dict[str, Any], sigmas: Sequence[float], afs: bool, nfe: int,
                    dtype: str, **extra: Any) -> dict[str, Any]:
    """The record of a sampling job: everything that changes its output images.

    `model` is a ModelInfo (name, weights fingerprint, shape, σ range); `options` the solver's options with
    their defaults filled in; `sigmas` the exact grid (it pins down schedule, ρ and num_steps). Every other
    setting that changes the samples goes in as a keyword: e.g. `schedule={"name", "rho"}`, `predictor=
    {...}` (fingerprint and settings), `conditions=…`, `guidance=…`, `card=…` (a learned solver's fingerprint).
    Values must be JSON-serialisable. Every key but INFO_KEYS takes part in the resume check, so a setting that
    affects the output must be a key here, and a key that does not affect it belongs in INFO_KEYS.
    """
    from .version import __version__

    return {
        "format": FORMAT_VERSION,
        "model": {"name": model.name, "fingerprint": model.fingerprint, "shape": list(model.shape),
                  "sigma_min": model.sigma_min, "sigma_max": model.sigma_max},
        "solver": solver, "options": dict(sorted(options.items())), "afs": bool(afs), "nfe": int(nfe),
        "num_steps": len(sigmas), "sigmas": [float(s) for s in sigmas], "dtype": dtype,
        "fewstep_version": __version__, **extra,
    }


def _normalised(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(manifest)).items() if k not in INFO_KEYS}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            short = len(json.dumps(a)) + len(json.dumps(b)) <= 60
            out.append(f"{key}: {json.dumps(a)} → {json.dumps(b)}" if short else key)
    return out


def sample_files(out: str | os.PathLike) -> list[Path]:
    """The per-seed sample PNGs in a folder."""
    folder = Path(out)
    return sorted(p for p in folder.iterdir() if SAMPLE_FILE.match(p.name)) if folder.is_dir() else []


def claim_folder(out: str | os.PathLike, manifest: dict[str, Any], overwrite: bool = False,
                 option: str = "--out") -> None:
    """Make `out` a folder of this job: write `manifest` there, or check that the one there matches.

    A folder made with other settings (or holding samples but no manifest) raises ManifestError, unless
    `overwrite`, which first removes its samples and manifest. The manifest is created exclusively, so of two
    different jobs started into one new folder at once, one refuses.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ManifestError(f"{option} {folder}: exists and is not a folder")
    path = folder / MANIFEST
    if overwrite:
        for p in [*sample_files(folder), path]:
            p.unlink(missing_ok=True)
    elif not path.exists() and sample_files(folder):
        raise ManifestError(f"{option} {folder}: holds samples but no {MANIFEST}, so how they were made is unknown;"
                            " use another folder, or --overwrite to remove them")
    if create_exclusive(path, json.dumps(manifest, indent=2) + "\n"):
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ManifestError(f"{option} {folder}: unreadable {MANIFEST} ({e}); use --overwrite to start afresh") from e
    diff = _differences(_normalised(old), _normalised(manifest))
    if diff:
        n = len(sample_files(folder))
        raise ManifestError(f"{option} {folder}: its {n} sample(s) were made with other settings (folder → this run: "
                            + "; ".join(diff) + "); use another folder, or --overwrite to remove them")
