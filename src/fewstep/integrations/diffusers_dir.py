"""`--model diffusers:DIR`: a local diffusers pipeline folder (written by `pipe.save_pretrained(DIR)`) as a fewstep
model, for every command (docs/integrations.md, "Pipeline folders on the command line").

Supported pipeline classes (model_index.json's `_class_name`, `SUPPORTED`): Stable Diffusion 1.x / 2.x (ε and v
prediction), SDXL (pooled text embeddings and time ids) — VP models in fewstep's σ-space, σ range of the
scheduler's ᾱ table — and SD3 / Flux — flow models (frame FLOW, flow time t ∈ [t_min, 1], default schedule the
pipeline's own shift: `flow:shift=s`, or `flow:mu=μ` of the image's token count for a dynamic shift).

The spec is `diffusers:DIR`, optionally followed by `?key=value&…` (URL-quoted; the command line's flags fold
into it, `pipeline_spec`): `height`, `width` (pixels; default the pipeline's own size), `dtype` (fp32 | fp16 |
bf16: the network's dtype; the solver state stays float32), `negative_prompt` (the null condition ∅ of guidance
and the prompt of unconditional sampling; default the pipeline's: "", or zeros for SDXL's
`force_zeros_for_empty_prompt`) and `embedded_guidance` (Flux-dev's guidance embedding, default 3.5).

The folder's fingerprint (`folder_fingerprint`) hashes every file's relative path and size, with the full
contents of files up to 1 MiB (configs, tokenizers) and 16 evenly spaced 64 KiB blocks of larger files (weights):
no modification times, so a copied folder keeps its fingerprint; fine-tuned weights differ in nearly every block.
This module imports diffusers only inside `load_pipeline_model`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from ..errors import ModelError

PREFIX = "diffusers:"
# pipeline class → the family fewstep treats it as (fewstep.integrations.diffusers_pipes)
SUPPORTED = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
             "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
DTYPES = ("fp32", "fp16", "bf16")
SMALL_FILE = 1 << 20  # hashed in full up to this size
BLOCKS, BLOCK = 16, 1 << 16  # larger files: this many blocks of this size, evenly spaced


@dataclass(frozen=True)
class PipelineOptions:
    """The settings of `diffusers:DIR?…` (module docstring); None / "" = the pipeline's default."""

    height: int | None = None
    width: int | None = None
    dtype: str = "fp32"
    negative_prompt: str = ""
    embedded_guidance: float | None = None

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ModelError(f"--{name} must be a positive number of pixels, got {value!r}")
        if self.dtype not in DTYPES:
            raise ModelError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        g = self.embedded_guidance
        if g is not None and not (isinstance(g, (int, float)) and math.isfinite(g)):
            raise ModelError(f"embedded_guidance must be a finite number, got {g!r}")

    def query(self) -> str:
        """The non-default settings as a URL query ('' when all are defaults)."""
        fields = {k: v for k, v in asdict(self).items() if v not in (None, "") and not (k == "dtype" and v == "fp32")}
        return urlencode(fields, quote_via=quote)


def pipeline_spec(folder: str, **options: Any) -> str:
    """`diffusers:FOLDER?…` with `options` (PipelineOptions fields; None = default) folded into the query, on top
    of any the spec already has (the command line's --height/--width/--dtype/--negative-prompt)."""
    path, current = parse_spec(folder if folder.startswith(PREFIX) else PREFIX + folder)
    merged = {**asdict(current), **{k: v for k, v in options.items() if v is not None}}
    query = PipelineOptions(**merged).query()
    return PREFIX + path + (f"?{query}" if query else "")


def parse_spec(spec: str) -> tuple[str, PipelineOptions]:
    """`diffusers:DIR[?key=value&…]` → (DIR, options); an unknown key or a bad value raises ModelError."""
    if not spec.startswith(PREFIX):
        raise ModelError(f"--model {spec!r}: expected diffusers:DIR")
    rest = spec[len(PREFIX):]
    path, mark, query = rest.rpartition("?")
    if not mark:
        path, query = rest, ""
    if not path.strip():
        raise ModelError(f"--model {spec!r}: give the pipeline folder after 'diffusers:'")
    raw: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in PipelineOptions.__dataclass_fields__:
            raise ModelError(f"--model {spec!r}: unknown setting {key!r} (known: "
                             f"{', '.join(PipelineOptions.__dataclass_fields__)})")
        raw[key] = value
    try:
        for key in ("height", "width"):
            if key in raw:
                raw[key] = int(raw[key])
        if "embedded_guidance" in raw:
            raw["embedded_guidance"] = float(raw["embedded_guidance"])
    except ValueError as e:
        raise ModelError(f"--model {spec!r}: {e}") from e
    return path, PipelineOptions(**raw)


def folder_fingerprint(folder: str | Path) -> str:
    """12 hex digits identifying a pipeline folder's files (module docstring: contents of small files, size and
    sampled blocks of large ones; hidden files and folders are skipped)."""
    root = Path(folder)
    h = hashlib.sha1()
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            if size <= SMALL_FILE:
                h.update(f.read())
                continue
            for i in range(BLOCKS):
                f.seek((size - BLOCK) * i // (BLOCKS - 1))
                h.update(f.read(BLOCK))
    return h.hexdigest()[:12]


def read_index(folder: Path, spec: str) -> tuple[str, dict[str, Any]]:
    """(pipeline class, model_index.json) of a pipeline folder; a missing folder, a folder that is not a pipeline
    and an unsupported class raise ModelError naming the supported ones."""
    if not folder.exists():
        raise ModelError(f"--model {spec!r}: folder {folder} not found")
    if not folder.is_dir():
        raise ModelError(f"--model {spec!r}: {folder} is a file, not a pipeline folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"--model {spec!r}: {folder} is not a diffusers pipeline folder (no model_index.json; "
                         "write one with pipe.save_pretrained(DIR))")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        name = str(index["_class_name"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"--model {spec!r}: unreadable {index_file} ({type(e).__name__}: {e})") from e
    if name not in SUPPORTED:
        raise ModelError(f"--model {spec!r}: {folder} holds a {name}, which fewstep does not support; supported "
                         f"pipelines: {', '.join(SUPPORTED)}")
    return name, index


def load_pipeline_model(spec: str) -> Any:
    """The ModelInfo of `diffusers:DIR[?…]` (the registry's loader for the `diffusers:` prefix): the pipeline
    loaded from local files only, in the requested dtype, with its networks frozen."""
    path, options = parse_spec(spec)
    folder = Path(path).expanduser()
    class_name, index = read_index(folder, spec)
    fingerprint = folder_fingerprint(folder)
    from .diffusers_pipes import build_model, load_pipeline  # diffusers and transformers: imported here only

    pipe = load_pipeline(folder, class_name, index, options.dtype, spec)
    return build_model(pipe, SUPPORTED[class_name], options, name=PREFIX + str(Path(path)),  # 'dir/', './dir': 'dir'
                       folder_fingerprint=fingerprint)


__all__ = ["DTYPES", "PREFIX", "PipelineOptions", "SUPPORTED", "folder_fingerprint", "load_pipeline_model",
           "parse_spec", "pipeline_spec"]
