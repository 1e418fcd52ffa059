"""Peak memory of one card-training model call of the SD 1.5 and SDXL UNets with fewstep's activation
checkpointing, and what fits on a 24 GB GPU (README, "Memory-bounded training").

    .venv/bin/python benchmarks/memory_sd.py [--threads 2] [--gpu-gib 24]

With `--micro-batch M --activation-checkpointing` a card's rollout keeps no activations of its model calls: in the
backward pass each call is run again (`torch.utils.checkpoint`, fewstep.memory.Checkpointed) with its activations
kept and back-propagated at once, so the peak is one forward + backward of the network at M samples (M rows, 2M
under classifier-free guidance) on top of the weights, whatever the NFE and batch (measured on `digits`:
benchmarks/memory_bench.py). This script measures exactly that step on the full-size UNets: diffusers'
`UNet2DConditionModel` built from the SD 1.5 / SDXL-base configs with random weights (no download), float32, on the
CPU, parameters frozen; fewstep's own `DiffusersDenoiser` (what `--model diffusers:DIR` calls) wrapped in fewstep's
`Checkpointed`, called once on a latent that requires grad with text embeddings of length 77 (SDXL: pooled
embedding and time ids too), an MSE loss, backward. Each setting runs in a fresh process after a warm-up call on a
16×16 latent (kernels, thread pools); peak resident set size (VmHWM, reset through /proc/self/clear_refs just before
the call; ru_maxrss is recorded too but also holds the peak of building the model) minus the RSS before the call =
the activation peak; the RSS growth over building the model = the weights. Attention runs on torch's fused
(flash) SDPA kernel, as on the GPU, so no N×N attention matrix is kept.

SD 1.5 runs at 64×64 (512²), and at 32×32 with 1 and 2 rows to check that the peak grows with the rows of a call.
SDXL runs at 64×64, then 96×96 (80×80 if that would not fit the available RAM), then 128×128 (1024²) only when the
extrapolation from those two leaves room in this machine's available RAM; otherwise the activation peak at 128×128
is extrapolated linearly in the number of latent pixels and marked so. The fp16 GPU estimate halves weights and
activations, adds the parts of the pipeline fewstep keeps on the device (text encoders in fp16, the VAE in fp32:
load_pipeline upcasts a VAE with force_upcast) and a reserve for the CUDA context and allocator slack, and gives the
largest micro-batch under the GPU's memory. Writes
benchmarks/results/memory_sd.json and memory_sd.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
TEXT_LEN = 77

SD15 = {
    "in_channels": 4, "out_channels": 4, "sample_size": 64, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}
SDXL = {
    "in_channels": 4, "out_channels": 4, "sample_size": 128, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 32, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}
MODELS: dict[str, dict[str, Any]] = {
    "sd15": {"name": "SD 1.5", "unet": SD15, "embed": 768, "pooled": 0, "pixels": 512},
    "sdxl": {"name": "SDXL", "unet": SDXL, "embed": 2048, "pooled": 1280, "pixels": 1024},
}
# text encoders and VAE of the pipelines (transformers / diffusers configs of the public checkpoints); their
# parameters are counted on the meta device, nothing is allocated
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
BIG_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
         "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
       "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


def proc_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One setting in this (fresh) process: the memory of one checkpointed model call + backward."""
    import gc
    import resource

    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fewstep.integrations.diffusers import DiffusersDenoiser
    from fewstep.memory import Checkpointed

    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    gc.collect()
    rss_start = proc_mb("VmRSS")
    torch.manual_seed(0)
    began = time.perf_counter()
    unet = UNet2DConditionModel.from_config(spec["unet"]).eval().requires_grad_(False)
    build_s = time.perf_counter() - began
    gc.collect()
    rss_weights = proc_mb("VmRSS")
    params = sum(p.numel() for p in unet.parameters())
    weights_mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    # SD's training ᾱ (scaled-linear β from 0.00085 to 0.012, 1000 steps), ε-prediction: what both pipelines use
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def denoiser(rows: int, size: int) -> Checkpointed:
        emb = torch.randn(rows, TEXT_LEN, spec["embed"])
        kwargs = None
        if spec["pooled"]:
            px = size * 8
            kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(rows, spec["pooled"]),
                                            "time_ids": torch.tensor([[px, px, 0, 0, px, px]],
                                                                     dtype=torch.float32).expand(rows, -1)}}
        return Checkpointed(DiffusersDenoiser(unet, alphas_cumprod, prediction_type="epsilon",
                                              encoder_hidden_states=emb, unet_kwargs=kwargs))

    def step(rows: int, size: int) -> tuple[float, float]:
        """One card-training model call at `rows` × 4 × size × size: forward under checkpointing, MSE loss,
        backward (the call recomputed with its activations, then back-propagated into the latent)."""
        den = denoiser(rows, size)
        x = torch.randn(rows, 4, size, size, requires_grad=True)
        sigma = torch.tensor(2.0)
        target = torch.randn(rows, 4, size, size)
        with torch.enable_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            t0 = time.perf_counter()
            out = den(x, sigma)
            forward_peak = proc_mb("VmHWM")
            loss = (out - target).square().mean()
            loss.backward()
            seconds = time.perf_counter() - t0
        assert x.grad is not None and torch.isfinite(x.grad).all(), "no finite gradient reached the latent"
        return forward_peak, seconds

    step(1, 16)  # warm-up: kernels, thread pools, allocator arenas
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_mb("VmRSS")
    forward_peak, seconds = step(args.rows, args.size)
    peak = proc_mb("VmHWM")
    return {"model": args.model, "latent": args.size, "rows": args.rows, "params": params,
            "weights_mb": weights_mb, "rss_start_mb": rss_start, "rss_after_build_mb": rss_weights,
            "weights_rss_mb": rss_weights - rss_start, "before_mb": before, "peak_mb": peak,
            "activation_peak_mb": peak - before, "forward_peak_mb": forward_peak - before,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": seconds, "build_seconds": build_s, "threads": args.threads,
            "torch": torch.__version__, "sdpa": "flash (forced)"}


def run_child(model: str, size: int, rows: int, threads: int) -> dict[str, Any]:
    print(f"  {MODELS[model]['name']} latent {size}x{size}, {rows} row(s) ...", flush=True)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--size", str(size), "--rows",
                           str(rows), "--threads", str(threads)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {model} {size} {rows} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    r["wall_seconds"] = time.perf_counter() - began
    print(f"    weights {r['weights_mb']:.0f} MiB ({r['params'] / 1e6:.1f} M params), activation peak "
          f"{r['activation_peak_mb']:.0f} MiB (forward only {r['forward_peak_mb']:.0f}), step {r['seconds']:.0f} s, "
          f"process {r['wall_seconds']:.0f} s", flush=True)
    return r


def pipeline_parts() -> dict[str, int]:
    """Parameter counts of the text encoders and the VAE, on the meta device."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G))
        vae = AutoencoderKL(**VAE)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"clip_l": count(clip_l), "openclip_bigg": count(big_g), "vae": count(vae)}


def extrapolate(a: dict[str, Any], b: dict[str, Any], size: int) -> float:
    """Activation peak at size×size, linear in latent pixels through the measurements `a` and `b`."""
    pa, pb, p = a["latent"] ** 2, b["latent"] ** 2, size**2
    slope = (b["activation_peak_mb"] - a["activation_peak_mb"]) / (pb - pa)
    return a["activation_peak_mb"] + slope * (p - pa)


def gpu_fit(weights_mb: float, act_row_mb: float, resident_mb: float, gpu_mb: float, reserve_mb: float
            ) -> dict[str, Any]:
    """fp16 estimate: weights and activations halved (from the fp32 measurements); rows per micro-batch that fit."""
    w16, a16 = weights_mb / 2, act_row_mb / 2
    fixed = w16 + resident_mb + reserve_mb
    rows = max(0, math.floor((gpu_mb - fixed) / a16))
    return {"unet_fp16_mb": w16, "activation_per_row_fp16_mb": a16, "resident_other_mb": resident_mb,
            "reserve_mb": reserve_mb, "fixed_mb": fixed, "max_rows": rows, "max_micro_batch_cfg": rows // 2,
            "fixed_if_encoders_off_mb": w16 + reserve_mb,
            "max_rows_if_encoders_off": max(0, math.floor((gpu_mb - w16 - reserve_mb) / a16)),
            "total_at_1_row_mb": fixed + a16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-gib", type=float, default=24.0, help="GPU memory to fit in (GiB)")
    ap.add_argument("--reserve-gib", type=float, default=1.0,
                    help="kept free for the CUDA context, cuBLAS/cuDNN workspaces and allocator slack")
    ap.add_argument("--ram-margin-gib", type=float, default=2.0,
                    help="headroom left in this machine's available RAM before measuring SDXL at 128x128")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    began = time.perf_counter()
    print("pipeline parts (parameter counts) ...", flush=True)
    parts = pipeline_parts()
    print("  " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in parts.items()), flush=True)
    runs: list[dict[str, Any]] = []
    print("SD 1.5 (one checkpointed model call + backward, CPU float32):", flush=True)
    sd64 = run_child("sd15", 64, 1, args.threads)
    # is the activation peak linear in the rows of a call? (what the micro-batch estimate assumes)
    sd32 = [run_child("sd15", 32, rows, args.threads) for rows in (1, 2)]
    runs += [sd64, *sd32]
    print("SDXL:", flush=True)
    xl64 = run_child("sdxl", 64, 1, args.threads)
    runs.append(xl64)
    margin = args.ram_margin_gib * 1024
    # the second size: 96x96 if its peak (the 64x64 activations scaled by the pixels) leaves the margin, else 80x80
    mid = 96 if xl64["before_mb"] + xl64["activation_peak_mb"] * (96 / 64) ** 2 + margin < available_mb() else 80
    xl_mid = run_child("sdxl", mid, 1, args.threads)
    runs.append(xl_mid)
    predicted = extrapolate(xl64, xl_mid, 128)
    need = xl_mid["before_mb"] + predicted  # the process before the call (weights, warm-up) + the activations
    room = available_mb()  # the earlier children have exited
    xl128: dict[str, Any] | None = None
    if need + margin < room:
        xl128 = run_child("sdxl", 128, 1, args.threads)
        runs.append(xl128)
        act128, how128 = xl128["activation_peak_mb"], "measured"
    else:
        act128, how128 = predicted, f"extrapolated linearly in latent pixels from 64x64 and {mid}x{mid}"
        print(f"  SDXL 128x128 not run: it would need ~{need / 1024:.1f} GiB + {margin / 1024:.0f} GiB margin, "
              f"{room / 1024:.1f} GiB available; activation peak extrapolated: {act128:.0f} MiB", flush=True)
    rows_ratio = sd32[1]["activation_peak_mb"] / sd32[0]["activation_peak_mb"]

    gpu_mb, reserve_mb = args.gpu_gib * 1024, args.reserve_gib * 1024
    vae32 = parts["vae"] * 4 / 2**20
    te_sd15 = parts["clip_l"] * 2 / 2**20
    te_sdxl = (parts["clip_l"] + parts["openclip_bigg"]) * 2 / 2**20
    estimates = {
        "sd15_512": {"latent": 64, "activation_fp32_mb": sd64["activation_peak_mb"], "how": "measured",
                     "text_encoders_fp16_mb": te_sd15, "vae_fp32_mb": vae32,
                     **gpu_fit(sd64["weights_mb"], sd64["activation_peak_mb"], te_sd15 + vae32, gpu_mb, reserve_mb)},
        "sdxl_1024": {"latent": 128, "activation_fp32_mb": act128, "how": how128,
                      "text_encoders_fp16_mb": te_sdxl, "vae_fp32_mb": vae32,
                      **gpu_fit(xl64["weights_mb"], act128, te_sdxl + vae32, gpu_mb, reserve_mb)},
        "sdxl_512": {"latent": 64, "activation_fp32_mb": xl64["activation_peak_mb"], "how": "measured",
                     "text_encoders_fp16_mb": te_sdxl, "vae_fp32_mb": vae32,
                     **gpu_fit(xl64["weights_mb"], xl64["activation_peak_mb"], te_sdxl + vae32, gpu_mb,
                               reserve_mb)},
    }
    if xl128 is not None:
        estimates["sdxl_1024"]["extrapolated_fp32_mb"] = predicted
    result = {"device": "cpu", "dtype": "float32", "measure": "peak RSS (VmHWM) over the call minus RSS before it",
              "threads": args.threads, "gpu_gib": args.gpu_gib, "reserve_gib": args.reserve_gib,
              "pipeline_params": parts, "rows_2_over_1_sd15_32": rows_ratio, "runs": runs,
              "gpu_estimates_fp16": estimates,
              "seconds": time.perf_counter() - began}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_sd.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (RESULTS / "memory_sd.md").write_text(md)
    print(md)


def report(result: dict[str, Any]) -> str:
    gib = lambda mb: f"{mb / 1024:.2f}"  # noqa: E731
    lines = ["# Peak memory of one card-training model call, SD 1.5 and SDXL UNets "
             "(CPU float32: peak RSS; fp16 GPU estimate)", "",
             "`python benchmarks/memory_sd.py` — one call of fewstep's `DiffusersDenoiser` under `Checkpointed` "
             "(what `--activation-checkpointing` wraps every model call in) on a latent that requires grad, "
             "MSE loss, backward; diffusers `UNet2DConditionModel` from the SD 1.5 / SDXL-base configs with random "
             "weights, frozen; text embeddings of length 77; fused (flash) SDPA; each in a fresh process after a "
             f"warm-up call; {result['threads']} threads on a shared 2-core machine. With `--micro-batch M "
             "--activation-checkpointing` this is the training peak on top of the weights (M rows per call; "
             "2M under classifier-free guidance), whatever the NFE and batch.", "",
             "| UNet | latent (image) | rows | params | weights fp32 (MiB) | activation peak fp32 (MiB) | "
             "forward only (MiB) | step (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        spec = MODELS[r["model"]]
        lines.append(f"| {spec['name']} | {r['latent']}² ({r['latent'] * 8}²) | {r['rows']} | "
                     f"{r['params'] / 1e6:.1f} M | {r['weights_mb']:.0f} | {r['activation_peak_mb']:.0f} | "
                     f"{r['forward_peak_mb']:.0f} | {r['seconds']:.0f} |")
    est = result["gpu_estimates_fp16"]
    x = est["sdxl_1024"]
    if x["how"] != "measured":
        lines += ["", f"SDXL at 128² (1024²) was not run: its weights and activations in float32 would not fit this "
                      f"machine's RAM; its activation peak, **{x['activation_fp32_mb']:.0f} MiB** fp32, is {x['how']}."]
    elif "extrapolated_fp32_mb" in x:
        lines += ["", f"SDXL at 128² measured {x['activation_fp32_mb']:.0f} MiB; the linear extrapolation in "
                      f"latent pixels from 64² and 96² predicted {x['extrapolated_fp32_mb']:.0f} MiB."]
    lines += ["", f"Rows: SD 1.5 at 32² with 2 rows per call peaks at {result['rows_2_over_1_sd15_32']:.2f}× the "
                  "1-row peak; the estimate below takes activations as rows × the 1-row peak."]
    p = result["pipeline_params"]
    lines += ["", f"## What fits on a {result['gpu_gib']:g} GiB GPU in fp16 (estimate)", "",
              "An estimate from the CPU float32 measurements, not a GPU measurement: UNet weights and activations "
              "halved; plus what fewstep keeps on the device besides the UNet — the text encoders in fp16 (CLIP-L "
              f"{p['clip_l'] / 1e6:.0f} M params for SD 1.5; CLIP-L + OpenCLIP-bigG "
              f"{(p['clip_l'] + p['openclip_bigg']) / 1e6:.0f} M for SDXL: fewstep encodes each prompt list once but "
              "`--device` (`to_device` → `VPPrompts.to`) moves the whole pipeline there, so they stay resident) and "
              f"the VAE ({p['vae'] / 1e6:.1f} M params, float32: `load_pipeline` upcasts a VAE with `force_upcast`) "
              "— and "
              f"{result['reserve_gib']:g} GiB for the CUDA context, workspaces and allocator slack. Activations "
              "are taken as rows × the 1-row peak. Rows per call = micro-batch M without guidance, 2M with "
              "classifier-free guidance.",
              "",
              "| model at | UNet fp16 (GiB) | text enc. fp16 + VAE fp32 (GiB) | + reserve = fixed (GiB) | "
              "activations per row fp16 (GiB) | max rows (= M, no guidance) | max M with CFG | "
              "max rows, encoders + VAE off the GPU |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("sd15_512", "SD 1.5, 512²"), ("sdxl_512", "SDXL, 512²"), ("sdxl_1024", "SDXL, 1024²")):
        e = est[key]
        note = "" if e["how"] == "measured" else " (extrapolated)"
        lines.append(f"| {label}{note} | {gib(e['unet_fp16_mb'])} | {gib(e['resident_other_mb'])} | "
                     f"{gib(e['fixed_mb'])} | {gib(e['activation_per_row_fp16_mb'])} | {e['max_rows']} | "
                     f"{e['max_micro_batch_cfg']} | {e['max_rows_if_encoders_off']} |")
    lines += ["", f"Script total {result['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
