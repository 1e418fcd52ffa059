"""Peak memory of one card-training iteration: the whole batch with every activation kept vs micro-batches with
activation checkpointing (README, "Memory-bounded training").

    .venv/bin/python benchmarks/memory_bench.py --model digits --nfe 5 --batch 128 --micro-batch 8 [--device cuda]

Each setting runs `fewstep.learned.learn` for one iteration (batch = training pairs, 8 validation pairs) in a fresh
process, after a first process has cached the teacher pairs and a warm-up iteration at batch 1 (the first calls'
fixed costs: kernels, thread pools, allocator arenas). Measured around the `learn` call only: on the CPU the
peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the call) minus the resident set just
before it; on CUDA `torch.cuda.max_memory_allocated` minus the allocation before it. The per-sample activation
footprint (the increment / batch) is what the README extrapolates from. Writes benchmarks/results/memory.json and
memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def rss_mb(field: str) -> float:
    """VmRSS or VmHWM of this process in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One setting, in this (fresh) process: the memory of `learn` with one iteration."""
    import torch

    from fewstep.device import to_device
    from fewstep.learned.train import LearnConfig, learn
    from fewstep.memory import MemoryPlan
    from fewstep.models import load_model

    torch.set_num_threads(args.threads)
    model = to_device(load_model(args.model), args.device)
    cfg = LearnConfig(base="dpmpp", nfe=args.nfe, afs=True, pairs=args.batch, val_pairs=8, iters=1,
                      batch=args.batch, teacher_steps=args.teacher_steps)
    memory = MemoryPlan(args.micro_batch, args.checkpoint)
    weights = sum(p.numel() * p.element_size() for p in model.denoiser.parameters()) / 2**20
    # warm-up: one iteration at batch 1 (kernels, thread pools and allocator arenas of the first calls: ~190 MB on
    # the CPU, whatever the batch), on 8 of the cached pairs
    learn(model, replace(cfg, pairs=8, batch=1), progress=False, memory=MemoryPlan(0, args.checkpoint))
    cuda = args.device is not None and args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = rss_mb("VmRSS")
    began = time.perf_counter()
    learn(model, cfg, progress=False, memory=memory)
    seconds = time.perf_counter() - began
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mb("VmHWM")
    return {"micro_batch": args.micro_batch or args.batch, "checkpoint": args.checkpoint, "before_mb": before,
            "peak_mb": peak, "increment_mb": peak - before, "per_sample_mb": (peak - before) / args.batch,
            "weights_mb": weights, "seconds": seconds, "measure": "cuda max allocated" if cuda else "peak RSS"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--teacher-steps", type=int, default=20, help="teacher grid (its accuracy does not matter here)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "FEWSTEP_CACHE": os.environ.get("FEWSTEP_CACHE") or tempfile.mkdtemp(prefix="fewstep-mem-")}
    base = [sys.executable, __file__, "--child", "--model", args.model, "--nfe", str(args.nfe), "--batch",
            str(args.batch), "--teacher-steps", str(args.teacher_steps), "--threads", str(args.threads)]
    if args.device:
        base += ["--device", args.device]
    runs = []
    # the first run also caches the teacher pairs: run the kept-activations setting twice, keep the second
    for extra in (["--micro-batch", "0"], ["--micro-batch", "0"], ["--micro-batch", str(args.micro_batch),
                                                                   "--checkpoint"]):
        done = subprocess.run([*base, *extra], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    kept, bounded = runs[1], runs[2]
    result = {"model": args.model, "nfe": args.nfe, "batch": args.batch, "device": args.device or "cpu",
              "kept": kept, "bounded": bounded, "ratio": bounded["increment_mb"] / kept["increment_mb"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Peak memory of one card-training iteration ({args.model}, NFE {args.nfe}, batch {args.batch}, "
             f"{result['device']}: {kept['measure']})", "",
             "| setting | before (MB) | peak (MB) | increment (MB) | per sample (MB) | seconds |",
             "|---|---|---|---|---|---|"]
    for name, r in (("whole batch, activations kept", kept),
                    (f"micro-batch {args.micro_batch} + activation checkpointing", bounded)):
        lines.append(f"| {name} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | {r['increment_mb']:.1f} | "
                     f"{r['per_sample_mb']:.3f} | {r['seconds']:.1f} |")
    lines += ["", f"increment ratio {result['ratio']:.3f}; network weights {kept['weights_mb']:.1f} MB"]
    (RESULTS / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
