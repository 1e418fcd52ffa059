"""Train the built-in `digits` U-Net from scratch: `fewstep train-model --out DIR`.

EDM training (arXiv 2206.00364): ln σ ~ N(P_mean = −1.2, P_std = 1.2), loss weight λ(σ) = (σ²+σ_d²)/(σ·σ_d)²,
σ_d = 0.5; Adam with a linear learning-rate warm-up; an exponential moving average (EMA) of the weights is what
gets exported. Data: sklearn's bundled digits, bilinearly up-sampled to the model resolution, minus a fixed
held-out split reserved for the digit classifier (`fewstep.models.digits`).

The output folder gets `checkpoint.pt` every `--ckpt-every` iterations and at the end (model, EMA, optimizer,
iteration, RNG states, wall time so far; written atomically), so an interrupted run continues where it stopped
when started again with the same folder. At the end the EMA weights are exported as `digits_unet.safetensors`
with a `train_info.json` beside them.

`--conditional` trains the class-conditional variant (`digits-cond`): labels of the training split, each replaced
by the null label with probability `--p-uncond` (condition dropout, default 0.1), so one network gives D(x, σ, c)
and D(x, σ, ∅). `--init-from digits` (or a weights file) fine-tunes from unconditional weights: every tensor of
the file is loaded and the new class embedding starts at zero, i.e. training starts at the unconditional model.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..io import atomic_write, write_json
from .digits import digits_split, random_shift
from .unet import DEFAULT_CONFIG, DIGITS_COND_WEIGHTS, DIGITS_WEIGHTS, DigitsUNet, load_unet, num_parameters, save_unet

# ----------------------------------------------------------------------------------------------------- training

@dataclass
class UNetTrainConfig:
    iters: int = 10000
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 300
    lr_decay: int = 2000  # after this many iterations the rate falls as 1/√(it/lr_decay); 0 = constant
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    augment_shift: int = 0  # max pixel shift (at model resolution); 0 = off
    seed: int = 0
    ckpt_every: int = 500
    threads: int = 1
    p_uncond: float = 0.1  # condition dropout (class-conditional nets only)
    class_lr_mult: float = 10.0  # learning-rate factor of the class embedding (class-conditional nets only)
    init_from: str = ""  # weights file to start from ('digits' = the shipped unconditional weights)
    arch: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONFIG))

    def resume_key(self) -> dict[str, Any]:
        """Settings a resumed run must share with the checkpoint (iters/ckpt_every/threads may change)."""
        d = asdict(self)
        for k in ("iters", "ckpt_every", "threads"):
            d.pop(k)
        return d


def edm_loss(net: DigitsUNet, x0: torch.Tensor, gen: torch.Generator, p_mean: float, p_std: float,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    sigma_data = net.sigma_data
    sigma = (torch.randn(x0.shape[0], generator=gen) * p_std + p_mean).exp()
    noise = torch.randn(x0.shape, generator=gen)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    denoised = net(x0 + sigma[:, None, None, None] * noise, sigma, labels)
    return (weight[:, None, None, None] * (denoised - x0) ** 2).mean()


def flow_loss(net: DigitsUNet, x0: torch.Tensor, gen: torch.Generator, p_mean: float, p_std: float,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """Conditional flow matching (rectified flow, as SD3 trains): x_t = (1 − t)·x₀ + t·ε with logit-normal
    t = sigmoid(N(p_mean, p_std²)), loss ‖v(x_t, t) − (ε − x₀)‖²."""
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen) * p_std + p_mean)
    noise = torch.randn(x0.shape, generator=gen)
    tb = t[:, None, None, None]
    v = net((1 - tb) * x0 + tb * noise, t, labels)
    return ((v - (noise - x0)) ** 2).mean()


def _lr_at(cfg: UNetTrainConfig, it: int) -> float:
    """Linear warm-up, then constant, then inverse-square-root decay (independent of the total, so a run can be
    extended by resuming with a larger --iters)."""
    lr = cfg.lr * min(1.0, (it + 1) / max(1, cfg.warmup))
    if cfg.lr_decay > 0 and it > cfg.lr_decay:
        lr /= (it / cfg.lr_decay) ** 0.5
    return lr


def _ema_decay_at(cfg: UNetTrainConfig, it: int) -> float:
    return min(cfg.ema_decay, (1 + it) / (10 + it))


def _init_weights(net: DigitsUNet, source: str) -> None:
    """Load every tensor of the weights file `source` ('digits' = shipped) into `net`; only a class embedding
    the source lacks may stay as initialised (zero)."""
    src = load_unet(DIGITS_WEIGHTS if source == "digits" else DIGITS_COND_WEIGHTS if source == "digits-cond"
                    else source)
    missing, unexpected = net.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embed.") for k in missing):
        raise FewstepError(f"--init-from {source}: architecture differs (missing {missing}, unexpected {unexpected})")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train_unet(out: str | Path, cfg: UNetTrainConfig, progress: bool = True, log_every: int = 250,
               stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) into `out`; returns the info dict also written to `out/train_info.json`.

    `stop_after` ends the session after that many iterations of this call (a checkpoint is written), to
    simulate an interruption; the run can then be resumed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    split = digits_split(int(cfg.arch["resolution"]))
    data, labels = split["train_x"], split["train_y"]
    torch.manual_seed(cfg.seed)
    net = DigitsUNet.from_config(cfg.arch)
    if cfg.init_from:
        _init_weights(net, cfg.init_from)
    ema = copy.deepcopy(net).requires_grad_(False)
    named = list(net.named_parameters())
    groups = [{"params": [p for n, p in named if not n.startswith("class_embed.")], "lr_mult": 1.0}]
    if net.num_classes > 0:  # the new embedding learns faster than the pretrained body it steers
        groups.append({"params": [p for n, p in named if n.startswith("class_embed.")], "lr_mult": cfg.class_lr_mult})
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_it, wall, losses = 0, 0.0, []
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise FewstepError(f"cannot read checkpoint {ckpt_path}: {e}") from e
        if ck["config"] != cfg.resume_key():
            raise FewstepError(f"{ckpt_path} was written with different settings; use a new --out folder\n"
                               f"  checkpoint: {ck['config']}\n  now:        {cfg.resume_key()}")
        net.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        start_it, wall, losses = ck["iteration"], ck["wall_s"], ck["losses"]

    def checkpoint(it: int) -> None:
        _save_checkpoint(ckpt_path, {
            "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "iteration": it,
            "wall_s": wall, "losses": losses, "config": cfg.resume_key(),
        })

    end_it = cfg.iters if stop_after is None else min(cfg.iters, start_it + stop_after)
    net.train()
    t_last = time.perf_counter()
    run_loss, run_n = 0.0, 0
    bar = tqdm(range(start_it, end_it), initial=start_it, total=cfg.iters, desc="train-model",
               disable=not progress, mininterval=2.0)
    for it in bar:
        idx = torch.randint(0, len(data), (cfg.batch,), generator=gen)
        x0 = random_shift(data[idx], cfg.augment_shift, gen)
        y = None
        if net.num_classes > 0:
            drop = torch.rand(cfg.batch, generator=gen) < cfg.p_uncond
            y = torch.where(drop, torch.full_like(labels[idx], net.num_classes), labels[idx])
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, it) * g["lr_mult"]
        loss = (flow_loss if net.flow else edm_loss)(net, x0, gen, cfg.p_mean, cfg.p_std, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        beta = _ema_decay_at(cfg, it)
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - beta)
        run_loss += float(loss.detach())
        run_n += 1
        done = it + 1
        if done % log_every == 0 or done == end_it:
            now = time.perf_counter()
            wall += now - t_last
            t_last = now
            losses.append([done, run_loss / run_n])
            bar.set_postfix(loss=f"{run_loss / run_n:.4f}")
            tqdm.write(f"iter {done}  loss {run_loss / run_n:.4f}  wall {wall:.0f} s")
            run_loss, run_n = 0.0, 0
        if done % cfg.ckpt_every == 0 or done == end_it:
            now = time.perf_counter()
            wall += now - t_last
            t_last = now
            checkpoint(done)
    bar.close()
    info = {
        "iterations": end_it, "finished": end_it >= cfg.iters, "wall_s": round(wall, 1),
        "s_per_iter": round(wall / max(1, end_it), 4), "parameters": num_parameters(net),
        "train_images": len(data), "settings": asdict(cfg), "losses": losses, "conditional": net.num_classes > 0,
        "torch": torch.__version__,
    }
    if end_it >= cfg.iters:
        save_unet(out / "digits_unet.safetensors", ema.eval(),
                  extra={"iterations": str(end_it), "wall_s": f"{wall:.1f}"})
    write_json(out / "train_info.json", info)
    return info
