"""Atomic file writes (a file is either absent or complete, never half-written), output-path checks, and the
disk cache of computed tensors (reference solutions, teacher pairs)."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import FewstepError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, _write)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create `path` with `text` atomically unless it exists; True when this call created it.

    The content is complete before the name appears (hard link of a finished temporary file), so a reader
    never sees a half-written file and of two concurrent callers exactly one wins.
    """
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def check_output_file(path: str | os.PathLike | None, option: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: a folder, or under a file.

    Raises FewstepError naming `option` (e.g. '--grid')."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise FewstepError(f"{option} {p}: is a folder; give a file name")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FewstepError(f"{option} {p}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise FewstepError(f"{option} {p}: folder {parent} is not writable")
            break


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """Refuse, before any work, an output folder that is a file, lies under a file or cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FewstepError(f"{option} {p}: is a file, not a folder")
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                raise FewstepError(f"{option} {p}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise FewstepError(f"{option} {p}: {parent} is not writable")
            break


def cache_dir() -> Path:
    """$FEWSTEP_CACHE, else ~/.cache/fewstep."""
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))


def cached_tensor(path: Path, compute: Callable[[], torch.Tensor], write: bool = True) -> torch.Tensor:
    """The tensor cached at `path` (a safetensors file under `cache_dir()`), else `compute()`, written atomically
    (when `write`: under torchrun only rank 0 writes). An unreadable cache file is recomputed, not trusted."""
    if path.exists():
        try:
            return load_file(path)["x"]
        except Exception as e:  # a corrupt or foreign file: recompute rather than trust it
            warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=3)
    x = compute().contiguous()
    if write:
        try:
            atomic_write(path, lambda tmp: save_file({"x": x}, tmp))
        except OSError as e:
            raise FewstepError(f"cannot write the cache {path.parent} ({e.strerror or e}); set $FEWSTEP_CACHE to a "
                               "writable folder") from e
    return x
