"""sklearn's bundled digits as the built-in models use them: the 8×8 originals (`digits-opt`), the 16×16
up-sampled images and the fixed split between the `digits` U-Net (train) and the digit classifier (held out).

The data sit below the registry, the U-Net training and the classifiers, which all read them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def digits_data() -> torch.Tensor:
    """sklearn's bundled digits (1 797 images of 8×8), scaled from [0, 16] to [−1, 1], shape [1797, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float64)
    return (images / 8.0 - 1.0).reshape(-1, 1, 8, 8)


def digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().target, dtype=torch.long)


def digits_images(resolution: int = 16) -> torch.Tensor:
    """All 1 797 digits in [−1, 1] as float32 [1797, 1, r, r] (bilinear up-sampling from 8×8, no corner alignment)."""
    x = digits_data().float()
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x


def split_indices(n: int = 1797, holdout: float = HOLDOUT_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) index sets: a fixed random permutation; the last `holdout` fraction is held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * holdout))
    return perm[: n - k].sort().values, perm[n - k:].sort().values


def digits_split(resolution: int = 16) -> dict[str, torch.Tensor]:
    """{'train_x', 'train_y', 'held_x', 'held_y'}: the diffusion model trains on `train`, the classifier on `held`."""
    x, y = digits_images(resolution), digits_labels()
    tr, ho = split_indices(len(x))
    return {"train_x": x[tr], "train_y": y[tr], "held_x": x[ho], "held_y": y[ho]}


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [−max_shift, max_shift]² (background −1 fills the border)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    off = torch.randint(0, 2 * p + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, off[i, 0]: off[i, 0] + h, off[i, 1]: off[i, 1] + w] for i in range(b)])
