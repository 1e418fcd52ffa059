"""Per-seed tensors on disk in shards: the teacher pairs of learned cards and the teacher pools of AMED.

A store is one folder under the cache (`$FEWSTEP_CACHE/<kind>/<digest of the key>`) with `key.json`, the readable
key (what the tensors are of: model, weights fingerprint, sample shape, conditions and guidance, teacher, …), and
pieces `<first seed>-<count>.safetensors`, each holding the tensors of `count` consecutive seeds ([count, *item],
under the name "x"). `fill` computes the missing seeds of a request in chunks of the request (chunk k: positions
k·chunk … (k + 1)·chunk − 1, as a single solve of the whole list would batch them) and writes each chunk's piece
atomically as soon as it is computed: a killed run keeps every finished piece and the next one computes only what
is missing; no more than one chunk is held in memory. At the end consecutive pieces are merged into shards of at most
64 MiB (one shard in memory at a time). Under torchrun the chunks are dealt to the ranks (rank r takes chunks r,
r + world, …), which share the cache folder (one node, or a shared file system). Every request of another size or
seed set with the same key reuses the seeds already there. `view` reads rows on demand from the memory-mapped
pieces.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed
from .costs import format_seconds
from .errors import FewstepError
from .io import atomic_write, cache_dir, create_exclusive

PIECE = re.compile(r"^(\d+)-(\d+)\.safetensors$")
KEY_FILE = "key.json"
SHARD_BYTES = 64 << 20  # consecutive pieces are merged into shards of at most this size


def digest(key: dict[str, Any]) -> str:
    """16 hex digits of the key's canonical JSON."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SeedTensors:
    """The tensors of a seed list, read on demand from a store's pieces: `take(positions)` → [len, *item]."""

    def __init__(self, where: dict[int, tuple[Any, int]], seeds: Sequence[int], item_shape: Sequence[int] = ()):
        self.where, self.seeds, self.item_shape = where, list(seeds), tuple(item_shape)

    def __len__(self) -> int:
        return len(self.seeds)

    def take(self, positions: torch.Tensor | Sequence[int] | range) -> torch.Tensor:
        """The rows of the seeds at `positions` of the list (a CPU tensor, the pieces' dtype)."""
        idx = positions.tolist() if isinstance(positions, torch.Tensor) else list(positions)
        rows = [self._row(self.seeds[int(i)]) for i in idx]
        return torch.stack(rows) if rows else torch.zeros(0, *self.item_shape, dtype=torch.float64)

    def all(self) -> torch.Tensor:
        return self.take(range(len(self.seeds)))

    def _row(self, seed: int) -> torch.Tensor:
        piece, row = self.where[seed]
        return piece.get_slice("x")[row : row + 1][0]


class ShardStore:
    """One key's folder of pieces (module docstring)."""

    def __init__(self, kind: str, key: dict[str, Any], item_shape: Sequence[int]):
        self.kind, self.key, self.item_shape = kind, dict(key), tuple(item_shape)
        self.folder = cache_dir() / kind / digest(self.key)

    def pieces(self) -> list[tuple[int, int, Path]]:
        """(first seed, count, path) of every piece file, in name order (none when the folder does not exist)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.iterdir()):
            m = PIECE.match(path.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), path))
        return found

    def index(self) -> dict[int, tuple[Any, int]]:
        """seed → (open piece, row) over the readable pieces; a foreign, truncated or misshapen piece is ignored
        (and deleted where possible) so that it is computed again."""
        where: dict[int, tuple[Any, int]] = {}
        for first, count, path in self.pieces():
            try:
                handle = safe_open(str(path), framework="pt")
                shape = tuple(handle.get_slice("x").get_shape())
                if shape != (count, *self.item_shape):
                    raise ValueError(f"shape {shape}, expected {(count, *self.item_shape)}")
            except FileNotFoundError:  # merged into a shard since it was listed
                continue
            except Exception as e:  # recompute rather than trust it
                warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=2)
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
                continue
            for s in range(first, first + count):
                where.setdefault(s, (handle, s - first))
        return where

    def present(self) -> set[int]:
        """The seeds whose rows are on disk (in readable pieces)."""
        return set(self.index())

    def missing(self, seeds: Sequence[int]) -> list[int]:
        have = self.present()
        return [s for s in seeds if s not in have]

    def check_writable(self) -> None:
        """Create the folder (and key.json); refuse, before any work, a cache that cannot be written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not os.access(self.folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(self.folder))
            create_exclusive(self.folder / KEY_FILE, json.dumps(self.key, indent=2, sort_keys=True, default=str)
                             + "\n")
        except OSError as e:
            raise FewstepError(f"cannot write the cache {self.folder} ({e.strerror or e}); set $FEWSTEP_CACHE to a "
                               "writable folder") from e

    def write(self, seeds: Sequence[int], x: torch.Tensor) -> None:
        """Write the rows of `seeds` (x[i] is seed seeds[i]) as pieces of consecutive seeds."""
        x = x.detach().to("cpu").contiguous()
        start = 0
        for end in range(1, len(seeds) + 1):
            if end == len(seeds) or seeds[end] != seeds[end - 1] + 1:
                part = x[start:end].clone()
                path = self.folder / f"{seeds[start]}-{end - start}.safetensors"
                try:
                    atomic_write(path, lambda tmp, part=part: save_file({"x": part}, tmp))
                except OSError as e:
                    raise FewstepError(f"cannot write the cache {self.folder} ({e.strerror or e}); set "
                                       "$FEWSTEP_CACHE to a writable folder") from e
                start = end

    def fill(self, seeds: Sequence[int], compute: Callable[[list[int]], torch.Tensor], chunk: int,
             desc: str = "teacher", progress: bool = False, log: Callable[[str], None] | None = None) -> None:
        """Compute and write the rows of every seed of `seeds` not on disk yet (module docstring)."""
        seeds = list(seeds)
        rank, world = distributed.world()
        distributed.barrier()  # every rank sees the pieces of earlier runs and none of this one's
        have = self.present()
        distributed.barrier()
        todo = []
        for k in range(0, len(seeds), chunk):
            need = [s for s in seeds[k : k + chunk] if s not in have]
            if need:
                todo.append(need)
        if todo:
            self.check_writable()
        mine = todo[rank::world]
        times: list[float] = []
        with tqdm(total=sum(map(len, mine)), desc=desc, disable=not progress or rank > 0, leave=False) as bar:
            for i, need in enumerate(mine):
                began = time.perf_counter()
                self.write(need, compute(need))
                times.append(time.perf_counter() - began)
                bar.update(len(need))
                left = len(mine) - i - 1
                if i == 2 and left and log is not None and rank == 0:  # the first chunk pays the warm-up: skip it
                    per = sum(times[1:]) / 2
                    log(f"{desc}: {per:.3g} s per chunk of {len(need)} seeds; about {format_seconds(per * left)} "
                        f"for the {left} chunks left")
        distributed.barrier()
        if todo and rank == 0:
            self.consolidate()
        distributed.barrier()

    def consolidate(self, limit: int = SHARD_BYTES) -> None:
        """Merge runs of consecutive pieces into shards of at most `limit` bytes (each read, concatenated and
        written before its pieces are deleted; a piece inside another is deleted)."""
        row = math.prod(self.item_shape) * 8
        rows = max(1, limit // max(row, 1))
        group: list[tuple[int, int, Path]] = []

        def flush() -> None:
            if len(group) > 1:
                x = torch.cat([load_file(p)["x"] for _, _, p in group])
                self.write(list(range(group[0][0], group[0][0] + len(x))), x)
                for _, _, p in group:
                    p.unlink(missing_ok=True)
            group.clear()

        end = -1
        for first, count, path in sorted(self.pieces(), key=lambda t: (t[0], -t[1])):
            if first + count <= end:  # already held by a longer piece (a merge killed before its clean-up)
                path.unlink(missing_ok=True)
                continue
            if group and first == end and sum(c for _, c, _ in group) + count <= rows:
                group.append((first, count, path))
            else:
                flush()
                group.append((first, count, path))
            end = first + count
        flush()

    def view(self, seeds: Sequence[int]) -> SeedTensors:
        """The rows of `seeds`, all of which must be on disk."""
        where = self.index()
        lost = [s for s in seeds if s not in where]
        if lost:
            raise FewstepError(f"{len(lost)} of {len(seeds)} seeds are missing from the cache {self.folder} (first: "
                               f"{lost[0]}); under torchrun the ranks must share $FEWSTEP_CACHE")
        return SeedTensors({s: where[s] for s in seeds}, seeds, self.item_shape)
