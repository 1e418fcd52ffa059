"""Reproduce the shipped networks: `fewstep train-model` (the `digits` / `digits-cond` U-Net),
`fewstep train-classifier` (the digit classifier behind FD-digits) and `fewstep train-noisy-classifier` (the
noise-aware classifier of classifier guidance). Each prints its training record as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..io import check_output_dir, check_output_file, write_json
from ..models.classifier import CLASSIFIER_WEIGHTS, save_classifier, train_classifier
from ..models.noisy_classifier import NOISY_CLASSIFIER_WEIGHTS, save_noisy_classifier, train_noisy_classifier
from ..models.train_unet import UNetTrainConfig, train_unet
from ..models.unet import DEFAULT_CONFIG
from ..validate import float_in, int_list, nonnegative_int, positive_float, positive_int, seed_int, threads_int

TRAIN_THREADS_HELP = "torch CPU threads (default 1)"  # training sets the thread count itself


def cmd_train_model(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    arch = dict(DEFAULT_CONFIG)
    if args.channels:
        arch["channels"] = args.channels
    if args.resolution:
        arch["resolution"] = args.resolution
    if args.blocks:
        arch["blocks_per_level"] = args.blocks
    if args.conditional:
        arch["num_classes"] = 10
    if args.flow:
        arch["parameterization"] = "flow"
    cfg = UNetTrainConfig(iters=args.iters, batch=args.batch, lr=args.lr, warmup=args.warmup, lr_decay=args.lr_decay,
                          ema_decay=args.ema, augment_shift=args.augment_shift, seed=args.seed,
                          ckpt_every=args.ckpt_every, threads=args.threads, p_uncond=args.p_uncond,
                          class_lr_mult=args.class_lr_mult, p_mean=args.p_mean, p_std=args.p_std,
                          init_from=args.init_from or "", arch=arch)
    info = train_unet(args.out, cfg, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in info.items() if k != "losses"}, indent=2))
    if info["finished"]:
        print(f"EMA weights: {Path(args.out) / 'digits_unet.safetensors'}")
    return 0


def _save_with_card(out: str, net: nn.Module, info: dict[str, Any], save: Callable[[Path, Any], Path]) -> int:
    """Write the weights with `save(path, net)`, their training record as a .json beside them, and print it."""
    path = Path(out)
    save(path, net)
    write_json(path.with_suffix(".json"), info)
    print(json.dumps(info, indent=2))
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    net, info = train_classifier(epochs=args.epochs, seed=args.seed, threads=args.threads)
    return _save_with_card(args.out, net, info, save_classifier)


def cmd_train_noisy_classifier(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    net, info = train_noisy_classifier(iters=args.iters, seed=args.seed, threads=args.threads)
    return _save_with_card(args.out, net, info, save_noisy_classifier)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `train-model`, `train-classifier` and `train-noisy-classifier`."""
    p = sub.add_parser(
        "train-model", help="train the built-in `digits` U-Net (or fine-tune `digits-cond`; resumable)",
        description="Train the EDM-preconditioned digits U-Net with the EDM loss and EMA weights. Checkpoints go to "
                    "OUT/checkpoint.pt; running the same command again resumes from it. At the end the EMA weights "
                    "are written to OUT/digits_unet.safetensors (load with fewstep.models.unet.load_unet(path)). "
                    "digits-flow: --conditional --flow --init-from digits-cond --p-mean 0 --p-std 1 --iters 2000 --lr 1e-3 "
                    "--warmup 100 --lr-decay 1000; "
                    "digits-cond: --conditional --init-from digits --iters 2000 --lr 1e-3 --warmup 100 --lr-decay 1000 "
                    "--p-mean -0.2 --p-std 1.4 (data/digits_cond_unet.json).")
    d = UNetTrainConfig()
    p.add_argument("--out", required=True, help="output folder (checkpoint, exported weights, train_info.json)")
    p.add_argument("--iters", type=positive_int, default=d.iters, help=f"total training iterations (default {d.iters})")
    p.add_argument("--batch", type=positive_int, default=d.batch, help=f"batch size (default {d.batch})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"Adam learning rate after warm-up (default {d.lr})")
    p.add_argument("--warmup", type=nonnegative_int, default=d.warmup,
                   help=f"linear warm-up iterations (default {d.warmup})")
    p.add_argument("--lr-decay", type=nonnegative_int, default=d.lr_decay,
                   help=f"iterations after which the rate decays as 1/sqrt(it/N) (default {d.lr_decay}; 0 = off)")
    p.add_argument("--ema", type=float_in(0, 1, high_open=True), default=d.ema_decay,
                   help=f"EMA decay (default {d.ema_decay})")
    p.add_argument("--augment-shift", type=nonnegative_int, default=d.augment_shift,
                   help="random integer shifts up to this many pixels (default 0 = off)")
    p.add_argument("--channels", type=int_list, help="comma-separated widths per level (default "
                   + ",".join(map(str, DEFAULT_CONFIG["channels"])) + ")")
    p.add_argument("--blocks", type=positive_int,
                   help=f"residual blocks per level (default {DEFAULT_CONFIG['blocks_per_level']})")
    p.add_argument("--resolution", type=positive_int, help=f"image size (default {DEFAULT_CONFIG['resolution']})")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional U-Net (10 classes + null label 10; the digits-cond model)")
    p.add_argument("--flow", action="store_true",
                   help="rectified-flow velocity network trained by flow matching with logit-normal t "
                        "(the digits-flow model; --p-mean/--p-std then set the logit-normal's mean and std)")
    p.add_argument("--p-uncond", type=float_in(0, 1), default=d.p_uncond,
                   help=f"condition dropout probability with --conditional (default {d.p_uncond})")
    p.add_argument("--p-mean", type=float, default=d.p_mean,
                   help=f"mean of ln sigma in the loss (default {d.p_mean}; higher stresses the noisy end, where "
                        "the class is decided)")
    p.add_argument("--p-std", type=positive_float, default=d.p_std,
                   help=f"std of ln sigma in the loss (default {d.p_std})")
    p.add_argument("--class-lr-mult", type=float_in(0), default=d.class_lr_mult,
                   help=f"learning-rate factor of the class embedding with --conditional (default {d.class_lr_mult})")
    p.add_argument("--init-from", help="start from these weights ('digits' / 'digits-cond' = the shipped U-Nets); "
                   "a new class embedding starts at zero")
    p.add_argument("--seed", type=seed_int, default=d.seed, help="random seed (default 0)")
    p.add_argument("--ckpt-every", type=positive_int, default=d.ckpt_every,
                   help=f"checkpoint period (default {d.ckpt_every})")
    p.add_argument("--threads", type=threads_int, default=d.threads, help=TRAIN_THREADS_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train_model)

    p = sub.add_parser("train-classifier", help="train the shipped digit classifier on the held-out split",
                       description="Train the digit classifier (the FD-digits feature network and the acceptance "
                                   "check of the digits U-Net) on the held-out split; writes the weights and a "
                                   ".json card beside them.")
    p.add_argument("--out", default=str(CLASSIFIER_WEIGHTS), help="weights file (a .json card is written beside it)")
    p.add_argument("--epochs", type=positive_int, default=120, help="training epochs (default 120)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=threads_int, default=1, help=TRAIN_THREADS_HELP)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("train-noisy-classifier", help="train the noise-aware digit classifier (classifier guidance)",
                       description="Train the noise-aware classifier p(c | x, σ) of digits-cond on the diffusion "
                                   "model's training split; writes the weights and a .json card beside them.")
    p.add_argument("--out", default=str(NOISY_CLASSIFIER_WEIGHTS), help="weights file (a .json card beside it)")
    p.add_argument("--iters", type=positive_int, default=1500, help="training iterations (default 1500)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=threads_int, default=1, help=TRAIN_THREADS_HELP)
    p.set_defaults(func=cmd_train_noisy_classifier)
