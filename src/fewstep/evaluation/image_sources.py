"""Image sources for feature statistics: a folder of images, an `.npz` array, a tensor from a sampler, any
iterable of batches, or a built-in digit set — all read as float batches [B, C, H, W] in [−1, 1]. Part of
`fewstep.evaluation.fid`, which re-exports everything here."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import FewstepError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


ImageSource = str | os.PathLike | torch.Tensor | np.ndarray | Iterable[torch.Tensor]


def _digits_split(part: str) -> torch.Tensor:
    from ..models.digits import digits_split

    return digits_split(16)[f"{part}_x"]


# Built-in image sets usable wherever a source is named (unless a file or folder of that name exists):
# the 16×16 digits the `digits` U-Net trained on, and the held-out split (the classifier's training data).
BUILTIN_IMAGE_SETS: dict[str, Callable[[], torch.Tensor]] = {
    "digits-train": lambda: _digits_split("train"),
    "digits-held": lambda: _digits_split("held"),
}


def _to_unit(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 batch [B, H, W, C] / [B, H, W] or a float batch [B, C, H, W] / [B, H, W, C] → float [B, C, H, W]
    in [−1, 1] (uint8 v ↦ v/127.5 − 1)."""
    t = torch.as_tensor(np.asarray(arr)) if isinstance(arr, np.ndarray) else arr
    if t.ndim == 3:
        t = t.unsqueeze(-1) if t.dtype == torch.uint8 else t.unsqueeze(1)
    if t.ndim != 4:
        raise FewstepError(f"images must be [N, H, W, C] (uint8) or [N, C, H, W] (float), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    if not t.is_floating_point():
        raise FewstepError(f"images must be uint8 or float, got {t.dtype}")
    if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [−1, 1] images to the 256 levels a PNG stores (as `fewstep sample` writes them)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FewstepError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
            arr = np.asarray(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for bad files
        raise FewstepError(f"{path}: not a readable image ({e})") from e
    return arr[..., None] if arr.ndim == 2 else arr


def iter_image_batches(source: ImageSource, batch: int = 256, quantize_floats: bool = True) -> Iterator[torch.Tensor]:
    """Batches float [B, C, H, W] in [−1, 1] from a folder of images, an `.npz` file (key 'images', else its
    only array), an array/tensor of images, or an iterable of such batches. Float input is rounded to PNG
    levels unless `quantize_floats=False`, so a sampler's tensor scores like the PNGs it would write."""
    if batch < 1:
        raise FewstepError("batch must be >= 1")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists() and str(source) in BUILTIN_IMAGE_SETS:
            yield from iter_image_batches(BUILTIN_IMAGE_SETS[str(source)](), batch, quantize_floats)
            return
        if path.is_dir():
            files = list_images(path)
            for i in range(0, len(files), batch):
                arrs = [_read_image(p) for p in files[i : i + batch]]
                shapes = {a.shape for a in arrs}
                if len(shapes) > 1:
                    raise FewstepError(f"images in {path} differ in size/channels: {sorted(shapes)}")
                yield _to_unit(np.stack(arrs))
            return
        if path.suffix == ".npz" and path.is_file():
            try:
                z = np.load(path, allow_pickle=False)
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("a single .npy array, not an .npz archive")
                with z:
                    key = "images" if "images" in z.files else (z.files[0] if len(z.files) == 1 else None)

                    if key is None:
                        raise FewstepError(f"{path} has no 'images' array (arrays: {', '.join(z.files)})")
                    arr = z[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise FewstepError(f"{path}: not a readable .npz file ({e})") from e
            yield from iter_image_batches(arr, batch, quantize_floats)
            return
        raise FewstepError(f"{path}: not a folder of images nor an .npz file (built-in sets: "
                           f"{', '.join(BUILTIN_IMAGE_SETS)})")
    if isinstance(source, (torch.Tensor, np.ndarray)):
        for i in range(0, len(source), batch):
            x = _to_unit(source[i : i + batch])
            is_uint8 = source.dtype == torch.uint8 if isinstance(source, torch.Tensor) else source.dtype == np.uint8
            yield x if is_uint8 or not quantize_floats else quantize(x)
        return
    for chunk in source:
        yield from iter_image_batches(chunk, batch, quantize_floats)
