"""The shipped digit classifier: a small CNN trained on the held-out split of sklearn digits.

It is the project's own feature network for FID-style scores (`penultimate(x)`: 128 post-ReLU features) and the
judge of the `digits` U-Net's acceptance check (`fewstep.evaluation.quality`: the fraction of samples it
recognises with confidence ≥ 0.5). It never saw
the images the diffusion model was trained on, and vice versa (fixed split, `digits.split_indices`).

Inputs are images in [−1, 1], [B, 1, H, W]; other sizes than the classifier's resolution are resized bilinearly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .digits import digits_split, random_shift

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
CLASSIFIER_WEIGHTS = DATA_DIR / "digits_classifier.safetensors"
CLASSIFIER_CARD = DATA_DIR / "digits_classifier.json"
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """conv3×3(32) → conv3×3(32) → maxpool → conv3×3(64) → maxpool → linear(128) [penultimate] → linear(10)."""

    def __init__(self, resolution: int = 16):
        super().__init__()
        self.resolution = int(resolution)
        r = self.resolution // 4
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * r * r, FEATURE_DIM), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return x

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] in [−1, 1] → [B, 128] features (float32)."""
        return self.features(self._prep(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, 10]."""
        return self.head(self.dropout(self.penultimate(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels [B], confidence = max softmax probability [B]) in eval mode."""
        was = self.training
        self.eval()
        probs = torch.cat([self(x[i:i + batch]).softmax(-1) for i in range(0, len(x), batch)])
        self.train(was)
        conf, labels = probs.max(-1)
        return labels, conf


def recognised_fraction(classifier: DigitClassifier, images: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of images the classifier assigns to some digit with probability ≥ threshold."""
    _, conf = classifier.predict(images)
    return float((conf >= threshold).float().mean())


# ---------------------------------------------------------------------------------------------- train / save

def junk_images(n: int, resolution: int, gen: torch.Generator, digits: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, kinds: tuple[int, ...] | None = None) -> torch.Tensor:
    """Images that are not digits, for outlier exposure and for checking calibration: clamped Gaussian noise,
    smooth random blobs (2×2…5×5 values up-sampled), and — given digits with labels — pixel averages of two
    digits of different classes (kinds 0, 1, 2; default: all available). Values in [−1, 1], [n, 1, r, r]."""
    allowed = torch.tensor(kinds if kinds is not None else ((0, 1, 2) if digits is not None else (0, 1)))
    kind_of = allowed[torch.randint(0, len(allowed), (n,), generator=gen)]
    out = torch.empty(n, 1, resolution, resolution)
    for i in range(n):
        k = int(kind_of[i])
        if k == 0:
            out[i] = (torch.randn(1, resolution, resolution, generator=gen) * (0.3 + 0.7 * torch.rand(1, generator=gen))
                      - torch.rand(1, generator=gen)).clamp(-1, 1)
        elif k == 1:
            m = int(torch.randint(2, 6, (1,), generator=gen))
            low = torch.rand(1, 1, m, m, generator=gen) * 2 - 1
            out[i] = F.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)[0]
        else:
            assert digits is not None and labels is not None
            while True:
                a, b = torch.randint(0, len(digits), (2,), generator=gen).tolist()
                if labels[a] != labels[b]:
                    break
            out[i] = 0.5 * (digits[a] + digits[b])
    return out


def train_classifier(resolution: int = 16, epochs: int = 120, batch: int = 64, lr: float = 1e-3, seed: int = 0,
                     shift: int = 1, noise_std: float = 0.1, junk_weight: float = 0.5,
                     threads: int = 1) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train on the held-out split (with random ±shift-pixel shifts and Gaussian noise of random scale up to
    noise_std as augmentation) plus *outlier exposure*: each batch also holds as many non-digit images
    (`junk_images`) whose target is the uniform distribution, weighted by junk_weight, so that the confidence
    means something (without it a CNN is confident on noise). Reports accuracy on both splits (the diffusion
    model's split is unseen here) and the recognised fraction (confidence ≥ 0.5) of real digits and of junk."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = digits_split(resolution)
    x, y = data["held_x"], data["held_y"]
    net = DigitClassifier(resolution)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(x) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr * 3, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            xb = random_shift(x[idx], shift, gen)
            xb = xb + noise_std * torch.rand(len(idx), 1, 1, 1, generator=gen) * torch.randn(xb.shape, generator=gen)
            junk = junk_images(len(idx), resolution, gen, x, y)
            logits = net(torch.cat([xb, junk]))
            loss = F.cross_entropy(logits[: len(idx)], y[idx])
            loss = loss - junk_weight * logits[len(idx):].log_softmax(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    wall = time.perf_counter() - start
    acc = {k: float((net.predict(data[f"{k}_x"])[0] == data[f"{k}_y"]).float().mean()) for k in ("held", "train")}
    check_gen = torch.Generator().manual_seed(seed + 12345)
    junk_noise_blobs = junk_images(1000, resolution, check_gen)
    junk_mix = junk_images(1000, resolution, check_gen, data["train_x"], data["train_y"], kinds=(2,))
    info = {
        "architecture": "conv3x3(32)-relu-conv3x3(32)-relu-maxpool-conv3x3(64)-relu-maxpool-linear(128)-relu"
                        "[penultimate]-dropout(0.3)-linear(10)",
        "parameters": sum(p.numel() for p in net.parameters()),
        "resolution": resolution,
        "data": "sklearn digits, bilinearly up-sampled 8x8 -> 16x16, values in [-1, 1]; trained on the held-out "
                "20% split (359 images, fixed permutation seed 0) that the diffusion model never saw",
        "training": {"epochs": epochs, "batch": batch, "optimizer": "Adam + one-cycle", "max_lr": lr * 3,
                     "weight_decay": 1e-4, "augmentation": f"random shifts up to {shift} px, Gaussian noise "
                     f"with std uniform in [0, {noise_std}]",
                     "outlier_exposure": f"each batch adds as many non-digits (noise, smooth blobs, averages of two "
                     f"digits of different classes) with a uniform target, weight {junk_weight}",
                     "seed": seed, "threads": threads, "wall_s": round(wall, 1)},
        "accuracy_on_own_training_split_held": acc["held"],
        "accuracy_on_unseen_split_train": acc["train"],
        "recognised_fraction_conf_0.5": {
            "real_digits_unseen_split": recognised_fraction(net, data["train_x"]),
            "noise_and_blobs": recognised_fraction(net, junk_noise_blobs),
            "two_digit_averages_unseen_split": recognised_fraction(net, junk_mix),
        },
    }
    return net, info


def save_weights(path: str | os.PathLike, net: nn.Module, fmt: str) -> Path:
    """Write a small network's weights atomically as safetensors, with its format name and `net.resolution`."""
    from safetensors.torch import save_file

    from ..io import atomic_write

    tensors = {k: v.detach().float().contiguous().clone() for k, v in net.state_dict().items()}
    meta = {"format": fmt, "resolution": str(net.resolution)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: Path, build: Callable[[int], nn.Module], what: str, hint: str) -> nn.Module:
    """A network `build(resolution)` with the weights at `path`, in eval mode with frozen parameters; a missing
    file (the message ends with `hint`) or weights that do not fit give a ModelError naming `what`."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"{what} weights not found: {path} ({hint})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        net = build(int(meta.get("resolution", 16)))
        net.load_state_dict(state, strict=True)
    except Exception as e:
        raise ModelError(f"{what} weights are corrupt or do not match the architecture: {path} ({e})") from e
    return net.eval().requires_grad_(False)


def save_classifier(path: str | os.PathLike, net: DigitClassifier) -> Path:
    return save_weights(path, net, "fewstep-digit-classifier-v1")


def load_classifier(path: str | os.PathLike | None = None) -> DigitClassifier:
    """The shipped digit classifier (or the one at `path`), in eval mode with frozen parameters."""
    return load_weights(Path(path) if path is not None else CLASSIFIER_WEIGHTS, DigitClassifier, "digit classifier",
                        "reinstall fewstep, or run `fewstep train-classifier --out FILE`")
