"""Solver overhead: per-step time spent outside the denoiser.

fewstep (dpmpp = DPM-Solver++(2M) with max_order=2, unipc, and `FewstepScheduler` running dpmpp in diffusers'
loop) vs diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler step loops and k-diffusion's
sample_dpmpp_2m, interleaved (one run of each in turn), with a near-free denoiser
(D(x, σ) = 0.5·x; its own time, measured alone, is subtracted) at batch 1 and 64 of 3×64×64 float32 on one
CPU thread; then `fewstep sample` on `digits` with the wall time split into model, solver and file writing.

    python benchmarks/overhead.py            # < 3 min; prints a markdown table, writes results/overhead.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

NFE = 10
SHAPE = (3, 64, 64)


def free(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * 0.5


def per_call(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` timed runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def runners(batch: int) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.Tensor]:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
    from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

    import fewstep
    from fewstep.integrations.diffusers import FewstepScheduler

    noise = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(0))
    sched = fewstep.get_schedule("logsnr", NFE + 1)

    def fewstep_run(solver: str):
        return lambda: fewstep.sample(free, noise, solver, sched, max_order=2)

    def diffusers_run(s):
        def run():  # a pipeline's loop: scale_model_input, the model, step
            s.set_timesteps(NFE)
            x = noise * s.init_noise_sigma
            for t in s.timesteps:
                x = s.step(free(s.scale_model_input(x, t), t), t, x).prev_sample
            return x
        return run

    k_sigmas = get_sigmas_karras(NFE, 0.002, 80.0)  # NFE points + a final 0: NFE model calls
    return {
        "fewstep dpmpp (2M)": fewstep_run("dpmpp"),
        "fewstep unipc (bh2, order 2)": fewstep_run("unipc"),
        "fewstep FewstepScheduler (dpmpp 2M) in diffusers' loop": diffusers_run(
            FewstepScheduler(num_train_timesteps=1000, solver="dpmpp", solver_options={"max_order": 2})),
        "diffusers DPMSolverMultistep": diffusers_run(DPMSolverMultistepScheduler(num_train_timesteps=1000,
                                                                                  solver_order=2)),
        "diffusers UniPCMultistep": diffusers_run(UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2)),
        "k-diffusion sample_dpmpp_2m": lambda: sample_dpmpp_2m(lambda x, s: free(x, s), noise * 80.0, k_sigmas,
                                                               disable=True),
    }, noise


def overhead_table(repeats: int) -> tuple[list[str], dict[tuple[str, int], float]]:
    results: dict[tuple[str, int], float] = {}
    names: list[str] = []
    for batch in (1, 64):
        runs, noise = runners(batch)
        names = list(runs)
        model = per_call(lambda: free(noise, None), repeats * NFE)
        times = {name: [] for name in runs}
        with torch.no_grad():
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(repeats):  # interleaved: machine load hits every sampler alike
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        for name in runs:
            results[name, batch] = (statistics.median(times[name]) - NFE * model) / NFE  # s per step, model excluded
    return names, results


def digits_throughput(n: int, nfe: int) -> dict[str, float]:
    import fewstep.sampling as sampling
    from fewstep.models import load_model

    info = load_model("digits")
    clock = {"model": 0.0, "sample": 0.0}
    net, solve = info.denoiser, sampling.sample

    def timed_model(x, s):
        t0 = time.perf_counter()
        try:
            return net(x, s)
        finally:
            clock["model"] += time.perf_counter() - t0

    def timed_sample(*a, **k):
        t0 = time.perf_counter()
        try:
            return solve(*a, **k)
        finally:
            clock["sample"] += time.perf_counter() - t0

    info.denoiser, sampling.sample = timed_model, timed_sample
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            sampling.run_sample_job(sampling.SampleJob(model="digits", out=tmp, solver="ipndm", nfe=nfe,
                                                       seeds=f"0-{n - 1}", batch=64, progress=False))
            total = time.perf_counter() - t0
    finally:
        info.denoiser, sampling.sample = net, solve
    return {"n": n, "nfe": nfe, "total": total, "model": clock["model"],
            "solver": clock["sample"] - clock["model"], "io": total - clock["sample"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--digits", type=int, default=256, help="samples of the digits throughput run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fewstep.models import load_model

    load_model("digits")  # load outside the timings
    began = time.perf_counter()
    names, res = overhead_table(args.repeats)
    ref = {b: (res["diffusers DPMSolverMultistep", b], res["k-diffusion sample_dpmpp_2m", b]) for b in (1, 64)}
    lines = [f"Per-step time outside the denoiser ({NFE} steps, 3×64×64 float32, 1 CPU thread, median of "
             f"{args.repeats}; the near-free denoiser's own time subtracted)", "",
             "| sampler | µs/step, batch 1 | × diffusers DPM | × k-diff | µs/step, batch 64 | × diffusers DPM "
             "| × k-diff |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        cells = []
        for b in (1, 64):
            v = res[name, b]
            cells += [f"{v * 1e6:.0f}", f"{v / ref[b][0]:.2f}", f"{v / ref[b][1]:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    targets = [  # (what, ours, theirs, goal: the largest acceptable time ratio ours / theirs)
        ("dpmpp vs k-diffusion 2M", "fewstep dpmpp (2M)", "k-diffusion sample_dpmpp_2m", 1.0),
        ("dpmpp vs diffusers DPM-Solver++", "fewstep dpmpp (2M)", "diffusers DPMSolverMultistep", 0.5),
        ("unipc vs diffusers UniPC", "fewstep unipc (bh2, order 2)", "diffusers UniPCMultistep", 0.5),
        ("FewstepScheduler vs diffusers' own", "fewstep FewstepScheduler (dpmpp 2M) in diffusers' loop",
         "diffusers DPMSolverMultistep", 1.0),
    ]
    lines += ["", "| ratio | batch 1 | batch 64 | goal |", "|---|---:|---:|---:|"]
    for what, ours, theirs, goal in targets:
        lines.append(f"| {what} | " + " | ".join(f"{res[ours, b] / res[theirs, b]:.2f}" for b in (1, 64))
                     + f" | ≤ {goal:g} |")
    d = digits_throughput(args.digits, 5)
    lines += ["", f"`fewstep sample` on digits (U-Net 16×16), ipndm NFE {d['nfe']}, {d['n']} seeds, batch 64, "
              "1 thread:", "",
              "| samples/s | model | solver (outside the model) | PNG writing | total |", "|---:|---:|---:|---:|---:|",
              f"| {d['n'] / d['total']:.1f} | {d['model']:.2f} s ({d['model'] / d['total']:.0%}) | "
              f"{d['solver']:.3f} s ({d['solver'] / d['total']:.1%}) | {d['io']:.2f} s ({d['io'] / d['total']:.0%}) "
              f"| {d['total']:.2f} s |", "", f"(benchmark wall time {time.perf_counter() - began:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
