"""A small EDM-preconditioned U-Net for the built-in `digits` model (docs/maths.md §2).

    D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)),
    c_skip = σ_d²/(σ²+σ_d²),  c_out = σ·σ_d/√(σ²+σ_d²),  c_in = 1/√(σ²+σ_d²),  c_noise = ¼·ln σ,  σ_d = 0.5.

F is a U-Net: a stem convolution, one encoder level per entry of `channels` (residual blocks, average-pool
down-sampling), a **bottleneck** residual block at the lowest resolution (the module attribute `bottleneck`,
whose output AMED's predictor reads through a forward hook), and a mirrored decoder (nearest up-sampling,
skip connections concatenated from the encoder). The noise level enters every residual block: c_noise →
sinusoidal embedding → MLP → per-block scale and shift of the second group norm (as in EDM's U-Nets).

Class-conditional variant (`num_classes` = K > 0, the `digits-cond` model): a learned embedding of K + 1 entries
(index K = the null label ∅, used for unconditional evaluations and condition dropout) is added to the noise
embedding; it is initialised to zero, so a fine-tune from unconditional weights starts at the unconditional model.
`net(x, sigma, class_labels)` takes int64 labels [B] (None = all ∅).

Rectified-flow variant (`parameterization` = "flow", the `digits-flow` model): the same U-Net is the bare
velocity network v(x_t, t) of x_t = (1 − t)·x₀ + t·ε (docs/maths.md, flow-matching models): no preconditioning,
its time t ∈ [0, 1] enters the embedding as c_noise = 2.6·t − 1.5, an affine map onto the range that EDM's
¼·ln σ spans over σ ∈ [0.002, 80], so a fine-tune from EDM weights starts with a familiar embedding.
`fewstep.models.flow.FlowDenoiser` turns it into a denoiser.

All arithmetic runs in float32; the output has the dtype of the input x.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

SIGMA_DATA = 0.5

DEFAULT_CONFIG: dict[str, Any] = {
    "resolution": 16,
    "in_channels": 1,
    "patch": 2,  # pixel-unshuffle factor of the stem: 16×16×1 → 8×8×4 (and pixel-shuffle back at the output)
    "channels": [64, 96],  # one entry per level below the patch level: 8×8, 4×4
    "blocks_per_level": 1,
    "emb_dim": 128,
    "num_freqs": 16,
    "groups": 8,
    "dropout": 0.0,
    "sigma_data": SIGMA_DATA,
    "num_classes": 0,  # > 0: class-conditional with a null label at index num_classes
    "parameterization": "edm",  # "edm": net(x, σ) = D(x, σ); "flow": net(x_t, t) = velocity v(x_t, t)
}
PARAMETERIZATIONS = ("edm", "flow")


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of EDM preconditioning at σ (docs/maths.md §2), same shape and dtype as σ."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class NoiseEmbedding(nn.Module):
    """c_noise → [sin(f_k·c), cos(f_k·c)] with fixed geometric frequencies f_k ∈ [0.5, 64] → MLP → emb_dim."""

    def __init__(self, num_freqs: int, emb_dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(math.log10(0.5), math.log10(64.0), num_freqs), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU())

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        a = c_noise[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([a.sin(), a.cos()], dim=1))


class ResBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN·(1+scale)+shift (from the noise embedding) → SiLU → dropout → conv3×3, plus a
    (1×1 when the width changes) skip path; the sum is scaled by 1/√2."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), scale + 1))
        h = self.conv2(self.dropout(h))
        return (h + self.skip(x)) * (1 / math.sqrt(2))


class Bottleneck(nn.Module):
    """The lowest-resolution block; its output [B, C, r, r] is what AMED's bottleneck hook reads."""

    def __init__(self, ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.block = ResBlock(ch, ch, emb_dim, groups, dropout)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block(x, emb)


class DigitsUNet(nn.Module):
    """EDM-preconditioned U-Net: `net(x, sigma)` with x [B, C, H, W] and σ [B] (or a scalar) returns D(x, σ);
    with `parameterization="flow"`, `net(x_t, t)` returns the velocity v(x_t, t)."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **(config or {})}
        unknown = set(cfg) - set(DEFAULT_CONFIG)
        if unknown:
            raise ModelError(f"unknown U-Net config keys: {sorted(unknown)}")
        cfg["channels"] = [int(c) for c in cfg["channels"]]
        if cfg["parameterization"] not in PARAMETERIZATIONS:
            raise ModelError(f"U-Net parameterization {cfg['parameterization']!r} not in {list(PARAMETERIZATIONS)}")
        self.config = cfg
        self.flow = cfg["parameterization"] == "flow"
        chs, nb, emb_dim = cfg["channels"], int(cfg["blocks_per_level"]), int(cfg["emb_dim"])
        groups, dropout = int(cfg["groups"]), float(cfg["dropout"])
        self.patch = int(cfg["patch"])
        if cfg["resolution"] % (self.patch * 2 ** (len(chs) - 1)):
            raise ModelError(f"resolution {cfg['resolution']} is not divisible by {self.patch}·2^{len(chs) - 1}")
        self.sigma_data = float(cfg["sigma_data"])
        self.embed = NoiseEmbedding(int(cfg["num_freqs"]), emb_dim)
        self.num_classes = int(cfg["num_classes"])
        if self.num_classes > 0:
            self.class_embed = nn.Embedding(self.num_classes + 1, emb_dim)
            nn.init.zeros_(self.class_embed.weight)
        patch_ch = int(cfg["in_channels"]) * self.patch**2
        self.stem = nn.Conv2d(patch_ch, chs[0], 3, padding=1)
        self.enc = nn.ModuleList()
        skips, prev = [], chs[0]
        for ch in chs:
            level = nn.ModuleList()
            for _ in range(nb):
                level.append(ResBlock(prev, ch, emb_dim, groups, dropout))
                prev = ch
                skips.append(ch)
            self.enc.append(level)
        self.bottleneck = Bottleneck(prev, emb_dim, groups, dropout)
        self.dec = nn.ModuleList()
        for ch in reversed(chs):
            level = nn.ModuleList()
            for _ in range(nb):
                level.append(ResBlock(prev + skips.pop(), ch, emb_dim, groups, dropout))
                prev = ch
            self.dec.append(level)
        self.out_norm = nn.GroupNorm(min(groups, prev), prev)
        self.out_conv = nn.Conv2d(prev, patch_ch, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DigitsUNet:
        return cls(config)

    @property
    def shape(self) -> tuple[int, int, int]:
        r = int(self.config["resolution"])
        return (int(self.config["in_channels"]), r, r)

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """F(c_in·x, c_noise[, class]): the bare network (float32 inputs)."""
        emb = self.embed(c_noise)
        if self.num_classes > 0:
            if class_labels is None:
                class_labels = torch.full((x_in.shape[0],), self.num_classes, dtype=torch.long, device=x_in.device)
            emb = emb + self.class_embed(class_labels.to(device=x_in.device, dtype=torch.long).reshape(-1))
        h = self.stem(F.pixel_unshuffle(x_in, self.patch) if self.patch > 1 else x_in)
        skips = []
        for i, level in enumerate(self.enc):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            for block in level:
                h = block(h, emb)
                skips.append(h)
        h = self.bottleneck(h, emb)
        for i, level in enumerate(self.dec):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            for block in level:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x, σ) (or D(x, σ, c) for a class-conditional net; labels [B], value num_classes = ∅); for a flow net
        `sigma` is the flow time t and the result the velocity v(x_t, t)."""
        if class_labels is not None:
            if self.num_classes == 0:
                raise ModelError("class labels given to an unconditional U-Net")
            if class_labels.shape != (x.shape[0],):
                raise ModelError(f"class labels of shape {tuple(class_labels.shape)} for a batch of {x.shape[0]}")
        if x.shape[0] == 0:  # an empty batch: nothing to denoise
            return x.clone()
        dtype = x.dtype
        xf = x.float()
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(x.shape[0])
        if s.numel() != x.shape[0]:
            raise ModelError(f"sigma has {s.numel()} entries for a batch of {x.shape[0]}")
        if self.flow:
            c_noise = 2.6 * s - 1.5
            v = self.raw(xf, c_noise) if class_labels is None else self.raw(xf, c_noise, class_labels)
            return v.to(dtype)
        c_skip, c_out, c_in, c_noise = edm_coefficients(s, self.sigma_data)
        bc = (-1,) + (1,) * (x.ndim - 1)
        x_in = xf * c_in.reshape(bc)
        f = self.raw(x_in, c_noise) if class_labels is None else self.raw(x_in, c_noise, class_labels)
        return (c_skip.reshape(bc) * xf + c_out.reshape(bc) * f).to(dtype)


def num_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------- I/O

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DIGITS_WEIGHTS = DATA_DIR / "digits_unet.safetensors"
DIGITS_CARD = DATA_DIR / "digits_unet.json"
DIGITS_COND_WEIGHTS = DATA_DIR / "digits_cond_unet.safetensors"
DIGITS_COND_CARD = DATA_DIR / "digits_cond_unet.json"
DIGITS_FLOW_WEIGHTS = DATA_DIR / "digits_flow_unet.safetensors"
DIGITS_FLOW_CARD = DATA_DIR / "digits_flow_unet.json"


def save_unet(path: str | os.PathLike, net: DigitsUNet, state: dict[str, torch.Tensor] | None = None,
              extra: dict[str, str] | None = None) -> Path:
    """Write weights (default: the net's own; pass the EMA state to export it) as safetensors, atomically,
    with the architecture config in the metadata."""
    from safetensors.torch import save_file

    from ..io import atomic_write

    tensors = {k: v.detach().float().contiguous().clone() for k, v in (state or net.state_dict()).items()}
    meta = {"format": "fewstep-digits-unet-v1", "config": json.dumps(net.config), **(extra or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_unet(path: str | os.PathLike | None = None) -> DigitsUNet:
    """The network stored at `path` (default: the shipped `digits` weights), in eval mode with frozen
    parameters (inputs can still be differentiated). Raises ModelError on a missing, corrupt or mismatched file."""
    from safetensors import safe_open

    path = Path(path) if path is not None else DIGITS_WEIGHTS
    hint = "reinstall fewstep or retrain with `fewstep train-model --out DIR`"
    if not path.is_file():
        raise ModelError(f"U-Net weights not found: {path} ({hint})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise ModelError(f"U-Net weights file is corrupt or not a fewstep U-Net: {path} ({e}); {hint}") from e
    try:
        net = DigitsUNet.from_config(config)
        net.load_state_dict(state, strict=True)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"U-Net weights in {path} do not match their architecture config: {e}") from e
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
