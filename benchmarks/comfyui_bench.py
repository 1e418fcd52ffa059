"""ComfyUI's samplers × schedulers vs fewstep through its ComfyUI nodes, inside ComfyUI's own sampling code.

    bash ../shared/tools/setup-comfyui.sh MIRROR /work/comfyui .venv       # once: a real (pip-installable) ComfyUI
    fewstep tune --model benchmarks/comfyui_bench.py:digits_sd --nfe 4,7 --families unipc --budget 100000 \
        --out runs/comfyui_bench/digits     # the EPS model's cards (its σ range; + ComfyUI's final step = 5, 8)
    PYTHONPATH=/work/comfyui/src:src /work/comfyui/venv/bin/python benchmarks/comfyui_bench.py \
        --models gmm-flow,digits-flow,digits --nfe 5,8 --cards runs/comfyui_bench

Each built-in model becomes a ComfyUI MODEL (fewstep.comfyui.analytic: ComfyUI's real model_sampling class
around the model's denoiser): `gmm-flow` and `digits-flow` as CONST (flow) models with ComfyUI's discrete flow
sampling, shift 3 (SD3's); `digits` as an EPS model with SD 1.x's discrete σ table (σ ∈ [0.0292, 14.61]). The
class-conditional digits-flow samples each seed's class as its shipped card set does (drawn uniformly from a hash
of the seed, guidance 1: the labels are bound into the model, as ComfyUI's conditioning would give them). Every
run goes through `comfy.samplers.KSAMPLER.sample` from the same noise (ComfyUI's own noise scaling), and every
model call counts (NFE ≤ the budget; ComfyUI's two-call samplers get fewer steps, as many as fit).

* ComfyUI: its deterministic k-diffusion samplers × all its schedulers, with sigmas as its KSampler node makes
  them (dpm_2 / uni_pc drop the penultimate sigma).
* fewstep: the Fewstep Sampler (solvers × options × AFS) on the Fewstep Sigmas (schedules from the model's range)
  or on ComfyUI's schedulers' sigmas (the Sampler takes any SIGMAS); fewer combinations on the networks (CPU).
* Each side's best is chosen on validation seeds 1000–1063 and reported on the test seeds; the table also shows
  ComfyUI's best on the test seeds themselves (an oracle choice, in ComfyUI's favour).
* A learned card through the Fewstep Card node: `DIR/<model>/nfe<N>/best/card.json` (as `fewstep tune … --out
  DIR/<model>` writes it) or `DIR/<model>/nfe<N>/card.json` (`fewstep learn … --out DIR/<model>/nfe<N>`) with
  `--cards DIR`, else the shipped card of the model's set (`fewstep cards`: gmm-flow, digits-flow; the shipped
  digits cards are on σ ∈ [0.002, 80], outside this EPS model's range, which the Card node refuses).

Error: the mean over test samples of ‖x − x_ref‖ / ‖x_ref‖, x_ref a fine fewstep Heun solve of the same start
(1 000 points, 300 for networks; flow: shift-3 flow grid from t = 1, EPS: Karras ρ = 7 from σ_max), then the final
step to 0. (The JSON also has ‖x − x_ref‖ / ‖x_ref‖ over the whole batch, which the one or two samples that land
in another mode of the sharp mixture dominate.) Writes benchmarks/results/comfyui.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.comfyui import NODE_CLASS_MAPPINGS
from fewstep.comfyui.analytic import comfy_model, ksample
from fewstep.comfyui.bridge import NodeError, frame_of_sampling
from fewstep.conditioning import conditioned_model
from fewstep.frames import FLOW
from fewstep.integrations.kdiffusion import run_solver
from fewstep.io import write_json, write_text
from fewstep.learned import load_card
from fewstep.models import load_model
from fewstep.noise import seeded_noise
from fewstep.schedules import get_schedule
from fewstep.shipped import SHIPPED_DIR, set_model
from fewstep.solvers import num_steps_for_nfe

RESULTS = Path(__file__).parent / "results"
# model → (ComfyUI model type, its sampling settings, the shipped card set whose conditions it samples and whose
# cards fit it, or None: the model's own, unconditional)
MODELS = {"gmm-flow": ("FLOW", {"shift": 3.0}, "gmm-flow"), "digits-flow": ("FLOW", {"shift": 3.0}, "digits-flow"),
          "digits": ("EPS", {}, None)}
COMFY_SAMPLERS = ("euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "deis", "ipndm", "ipndm_v",
                  "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2")
SOLVERS = [("euler", 0, ""), ("heun", 0, ""), ("dpm2", 0, ""), ("ipndm", 0, ""), ("ipndm_v", 0, ""),
           ("deis", 0, ""), ("deis", 0, "deis_mode=rhoab"), ("dpmpp", 2, ""), ("dpmpp", 3, ""), ("unipc", 0, ""),
           ("unipc", 2, ""), ("unipc", 0, "variant=bh1"), ("gradient_estimation", 0, "")]
NETWORK_SOLVERS = [s for s in SOLVERS if s[0] not in ("heun", "dpm2") and s[2] != "variant=bh1"]  # CPU time
SCHEDULES = [("polynomial", 0.0, ""), ("polynomial", 3.0, ""), ("logsnr", 0.0, ""), ("time_uniform", 0.0, ""),
             ("time_uniform", 2.0, ""), ("kl_optimal", 0.0, ""), ("discrete", 0.0, "")]
FLOW_SCHEDULES = [("flow", 0.0, ""), ("flow", 0.0, "spacing=karras"), ("oss", 0.0, "flux")]
NETWORK_COMFY_SCHEDULERS = ("beta", "simple", "karras")  # ComfyUI's schedulers that win on gmm (and kl_optimal,
# which the Fewstep Sigmas node makes too)
VAL_SEEDS = range(1000, 1064)
SD_RANGE = (0.0291675, 14.614642)  # SD 1.x's discrete σ table: the EPS model's range


def digits_sd() -> Any:
    """`digits` on SD 1.x's σ range, the range of the ComfyUI EPS model here: a `--model` factory for the card,
    `fewstep learn --model benchmarks/comfyui_bench.py:digits_sd …`."""
    import dataclasses

    return dataclasses.replace(load_model("digits"), name="digits-sd", sigma_min=SD_RANGE[0], sigma_max=SD_RANGE[1])


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of ‖x_i − ref_i‖/‖ref_i‖ (the benchmark's error)."""
    b = ref.shape[0]
    diff = (x.double() - ref).reshape(b, -1).norm(dim=1)
    return float((diff / ref.reshape(b, -1).norm(dim=1)).mean())


def batch_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖/‖ref‖ over the whole batch (dominated by the few samples that change mode)."""
    return float((x.double() - ref).norm() / ref.norm())


@dataclass
class Split:
    """One seed set (validation or test): the ComfyUI model with the seeds' conditions bound, the noise and the
    reference solutions."""

    model: Any
    noise: torch.Tensor
    ref: torch.Tensor


def calls(model: Any) -> int:
    return model.model.calls


def comfy_sigmas(ms: Any, sampler: str, scheduler: str, steps: int) -> torch.Tensor:
    """Sigmas as ComfyUI's KSampler node makes them."""
    import comfy.samplers

    discard = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    s = comfy.samplers.calculate_sigmas(ms, scheduler, steps + int(discard)).cpu()
    return torch.cat([s[:-2], s[-1:]]) if discard else s


def nfe_of(sampler: Any, model: Any, sigmas: torch.Tensor, shape: tuple[int, ...]) -> int:
    before = calls(model)
    ksample(sampler, model, sigmas, torch.randn(1, *shape))
    return calls(model) - before


def reference(key: str, model: Any, noise: torch.Tensor, points: int, cache: Path, exact: bool) -> torch.Tensor:
    """A fine Heun solve (float64 for an analytic model) from ComfyUI's own start, then the step to 0; cached
    under `key` (the model and its conditions) and the noise."""
    path = cache / f"ref-{key}-{len(noise)}-{int(noise.abs().sum() * 1000)}-{points}.pt"
    if path.is_file():
        return torch.load(path)
    ms = model.get_model_object("model_sampling")
    flow = frame_of_sampling(ms) is FLOW
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    grid = get_schedule("flow:shift=3" if flow else "polynomial", points, lo, hi)
    x = ms.noise_scaling(ms.sigma_max, noise, torch.zeros_like(noise), max_denoise=True)
    den = model.model.denoiser
    out = run_solver("heun", lambda x_, s: den(x_ if exact else x_.float(), s).to(x_.dtype),
                     x.double() if exact else x, torch.cat([grid, grid.new_zeros(1)]), disable=True, flow=flow)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out.double(), path)
    return out.double()


def split(name: str, seeds: range, cache: Path) -> Split:
    """The ComfyUI model of `name` for `seeds` (their conditions bound), their noise and references."""
    kind, settings, card_set = MODELS[name]
    info = load_model(name)
    tag = name
    if card_set is not None:
        model, spec = set_model(card_set)
        info = conditioned_model(model, spec, list(seeds))
        tag = f"{name}-{info.condition_key}" if info.condition_key else name
    model = comfy_model(info.denoiser, kind, **settings)
    noise = seeded_noise(seeds, info.shape).float()
    points = 1000 if info.exact else 300
    return Split(model, noise, reference(tag, model, noise, points, cache, info.exact))


def comfyui_grid(counter: Any, budget: int, val: Split, test: Split) -> list[dict]:
    """Every ComfyUI sampler × scheduler at the budget, on the validation and the test seeds (`counter`: a model
    of the same sampling that counts the calls of one sample)."""
    import comfy.samplers

    ms, rows = counter.get_model_object("model_sampling"), []
    for sampler_name in COMFY_SAMPLERS:
        sampler = comfy.samplers.sampler_object(sampler_name)
        for scheduler in comfy.samplers.SCHEDULER_NAMES:
            for steps in range(budget, 0, -1):
                sigmas = comfy_sigmas(ms, sampler_name, scheduler, steps)
                nfe = nfe_of(sampler, counter, sigmas, test.noise.shape[1:])
                if nfe <= budget:
                    break
            row = {"sampler": sampler_name, "scheduler": scheduler, "steps": steps, "nfe": nfe}
            for key, data in (("val_", val), ("", test)):
                try:
                    x = ksample(sampler, data.model, sigmas, data.noise)
                    err, batch = rel(x, data.ref), batch_rel(x, data.ref)
                except Exception as e:  # a sampler that fails on a grid counts as diverged
                    print(f"  {sampler_name} × {scheduler}: {type(e).__name__}: {e}", file=sys.stderr)
                    err = batch = float("inf")
                row[f"{key}rel_error"] = err if err == err else float("inf")
                row[f"{key}batch_rel_error"] = batch if batch == batch else float("inf")
            rows.append(row)
    return rows


def node_sigmas(model: Any, schedule: str, steps: int, rho: float, argument: str) -> torch.Tensor:
    """The Fewstep Sigmas node's SIGMAS, or (schedule 'comfyui') ComfyUI's BasicScheduler's with `argument` as
    its scheduler: the Fewstep Sampler takes any SIGMAS."""
    if schedule == "comfyui":
        import comfy.samplers

        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), argument, steps).cpu()
        if len(sigmas) != steps + 1:  # ddim_uniform may add a point
            raise NodeError("ComfyUI", f"{argument} gave {len(sigmas)} sigmas for {steps} steps")
        return sigmas
    return NODE_CLASS_MAPPINGS["FewstepSigmas"]().get_sigmas(model, schedule, steps, 1.0, rho, argument)[0]


def fewstep_best(name: str, budget: int, val: Split, test: Split) -> dict:
    """The Fewstep Sampler × Sigmas chosen on the validation seeds, measured on the test seeds."""
    import comfy.samplers

    schedules = SCHEDULES + (FLOW_SCHEDULES if MODELS[name][0] == "FLOW" else [])
    exact = load_model(name).exact
    schedules += [("comfyui", 0.0, scheduler) for scheduler in comfy.samplers.SCHEDULER_NAMES
                  if exact or scheduler in NETWORK_COMFY_SCHEDULERS]
    best: dict | None = None
    for solver, order, options in SOLVERS if exact else NETWORK_SOLVERS:
        for afs in (False, True):
            sampler = NODE_CLASS_MAPPINGS["FewstepSampler"]().get_sampler(solver, order, afs, options)[0]
            opts = {k: v for k, v in (o.split("=") for o in options.split(",") if o)}
            steps = num_steps_for_nfe(solver, budget, afs=afs, denoise_to_zero=True,
                                      **({"max_order": order} if order else {}), **opts)
            if steps is None:
                continue
            for schedule, rho, argument in schedules:
                try:
                    sigmas = node_sigmas(val.model, schedule, steps, rho, argument)
                except NodeError as e:  # e.g. time_uniform cannot fit a narrow flow range
                    print(f"  {e}", file=sys.stderr)
                    continue
                before = calls(val.model)
                err = rel(ksample(sampler, val.model, sigmas, val.noise), val.ref)
                nfe = calls(val.model) - before
                assert nfe == budget, (solver, afs, schedule, nfe)
                if best is None or err < best["val_rel_error"]:
                    best = {"solver": solver, "max_order": order, "options": options, "afs": afs,
                            "schedule": schedule, "rho": rho, "argument": argument, "steps": steps,
                            "nfe": nfe, "val_rel_error": err, "sampler": sampler, "sigmas": sigmas}
    assert best is not None
    x = ksample(best.pop("sampler"), test.model, best.pop("sigmas"), test.noise)
    best["rel_error"], best["batch_rel_error"] = rel(x, test.ref), batch_rel(x, test.ref)
    return best


def comfy_calls(folder: Path) -> int:
    """Model calls of a card through the Card node: its NFE, plus the final step to 0 of ComfyUI's SIGMAS where
    the card's own run has none (an EDM-frame card; a flow card's NFE counts that call already)."""
    card = load_card(folder)
    return card.nfe + (not card.frame.final_denoise)


def card_folder(name: str, budget: int, cards: Path) -> Path | None:
    """The card for `name` that makes `budget` model calls through the Card node: `cards/<name>/nfe<N>/best`
    (`fewstep tune`'s), `cards/<name>/nfe<N>` (`fewstep learn`'s), else the shipped card of the model's set, for
    N = budget or (an EDM card, ComfyUI's final step to 0 on top) budget − 1; None if there is none."""
    folders = [f for n in (budget, budget - 1) for f in (cards / name / f"nfe{n}" / "best", cards / name / f"nfe{n}")]
    if MODELS[name][2] is not None:
        folders += [SHIPPED_DIR / MODELS[name][2] / f"nfe{n}" for n in (budget, budget - 1)]
    return next((f for f in folders if (f / "card.json").is_file() and comfy_calls(f) == budget), None)


def card_result(folder: Path, test: Split) -> dict:
    """The card in `folder` through the Fewstep Card node, on the test seeds."""
    sampler, sigmas = NODE_CLASS_MAPPINGS["FewstepCard"]().load(test.model, str(folder))
    before = calls(test.model)
    x = ksample(sampler, test.model, sigmas, test.noise)
    shipped = folder.resolve().is_relative_to(SHIPPED_DIR.resolve())
    return {"card": f"shipped {folder.parent.name}/{folder.name}" if shipped else str(folder),
            "nfe": calls(test.model) - before, "rel_error": rel(x, test.ref), "batch_rel_error": batch_rel(x, test.ref)}


def label(r: dict) -> str:
    opts = ",".join(filter(None, [f"max_order={r['max_order']}" if r["max_order"] else "", r["options"]]))
    sched = r["schedule"] + (f"(rho={r['rho']:g})" if r["rho"] else "") + (f":{r['argument']}" if r["argument"] else "")
    sched = f"ComfyUI {r['argument']}" if r["schedule"] == "comfyui" else sched
    return f"{r['solver']}{f'({opts})' if opts else ''} @ {sched}{' +AFS' if r['afs'] else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gmm-flow,digits-flow,digits")
    p.add_argument("--nfe", default="5,8", help="model-call budgets (= steps of a one-call sampler)")
    p.add_argument("--n", type=int, default=128, help="test seeds 0…n−1 (64 for the networks)")
    p.add_argument("--cards", default="runs/comfyui_bench",
                   help="folder with <model>/nfe<N>[/best]/card.json (else the shipped cards); also the cache of "
                        "the reference solutions")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [int(v) for v in args.nfe.split(",")]
    results = []
    cards = Path(args.cards)
    for name in args.models.split(","):
        info = load_model(name)
        kind, settings, _ = MODELS[name]
        n = args.n if info.exact else min(args.n, 64)
        test, val = split(name, range(n), cards), split(name, VAL_SEEDS, cards)
        counter = comfy_model(info.denoiser, kind, **settings)
        for budget in budgets:
            grid = comfyui_grid(counter, budget, val, test)
            theirs = min(grid, key=lambda r: r["val_rel_error"])
            oracle = min(grid, key=lambda r: r["rel_error"])
            euler = min((r for r in grid if r["sampler"] == "euler"), key=lambda r: r["val_rel_error"])
            ours = fewstep_best(name, budget, val, test)
            folder = card_folder(name, budget, cards)
            card = card_result(folder, test) if folder else None
            if card and card["nfe"] != budget:
                print(f"  warning: the card {card['card']} made {card['nfe']} model calls, not {budget}",
                      file=sys.stderr)
            row = {"model": name, "kind": kind, "nfe": budget, "n": n, "comfyui_best": theirs,
                   "comfyui_oracle": oracle, "comfyui_euler": euler, "fewstep_best": ours, "card": card,
                   "comfyui_grid": grid, "ratio": ours["rel_error"] / theirs["rel_error"],
                   "oracle_ratio": ours["rel_error"] / oracle["rel_error"],
                   "card_ratio": card["rel_error"] / theirs["rel_error"] if card else None}
            results.append(row)
            print(f"{name} NFE {budget}: ComfyUI best {theirs['sampler']} × {theirs['scheduler']} "
                  f"{theirs['rel_error']:.4f}; fewstep {label(ours)} {ours['rel_error']:.4f} "
                  f"(×{row['ratio']:.2f})" + (f"; card {card['rel_error']:.4f} (×{row['card_ratio']:.2f})"
                                               if card else ""), flush=True)
    results = merged(results)
    write_json(RESULTS / "comfyui.json", results)
    write_text(RESULTS / "comfyui.md", table(results))
    print(table(results))
    return 0


def merged(results: list[dict]) -> list[dict]:
    """This run's rows with the other (model, NFE) rows of an earlier results file, in MODELS order."""
    path = RESULTS / "comfyui.json"
    done = {(r["model"], r["nfe"]) for r in results}
    old = [r for r in json.loads(path.read_text()) if (r["model"], r["nfe"]) not in done] if path.is_file() else []
    order = list(MODELS)
    return sorted(old + results, key=lambda r: (order.index(r["model"]) if r["model"] in order else 99, r["nfe"]))


def table(results: list[dict]) -> str:
    lines = ["# ComfyUI's samplers × schedulers vs fewstep's nodes (inside ComfyUI's KSAMPLER)", "",
             "Mean relative error ‖x − x_ref‖/‖x_ref‖ per test sample (x_ref: a fine fewstep Heun solve from the "
             "same start); every model call counted (NFE = the budget; ComfyUI's two-call samplers get as many "
             "steps as fit). Each side's best is chosen on validation seeds 1000–1063 and measured on the test "
             "seeds; *oracle*: ComfyUI's best on the test seeds themselves. fewstep: the Fewstep Sampler on the "
             "Fewstep Sigmas or on a ComfyUI scheduler's sigmas; card: a learned card through the Fewstep Card "
             "node. Ratios: fewstep / ComfyUI best (fewstep / oracle).", "",
             "| model | NFE | ComfyUI best | oracle | ComfyUI Euler | fewstep best (nodes) | ratio | card | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, q, e, o, c = (r[k] for k in ("comfyui_best", "comfyui_oracle", "comfyui_euler", "fewstep_best", "card"))
        lines.append(f"| {r['model']} ({r['kind']}) | {r['nfe']} | {t['sampler']} × {t['scheduler']} "
                     f"{t['rel_error']:.4f} | {q['sampler']} × {q['scheduler']} {q['rel_error']:.4f} | "
                     f"{e['scheduler']} {e['rel_error']:.4f} | {label(o)} {o['rel_error']:.4f} | "
                     f"**{r['ratio']:.2f}** ({r['oracle_ratio']:.2f}) | "
                     + (f"{c['rel_error']:.4f} | **{r['card_ratio']:.2f}** ({c['rel_error'] / q['rel_error']:.2f}) |"
                        if c else "– | – |"))
    lines += ["", "The same runs, ‖x − x_ref‖/‖x_ref‖ over the whole test batch (the few samples that change mode "
              "dominate it): ComfyUI best / oracle / fewstep best / card", ""]
    for r in results:
        c = r["card"]
        lines.append(f"* {r['model']} NFE {r['nfe']}: {r['comfyui_best']['batch_rel_error']:.4f} / "
                     f"{min(g['batch_rel_error'] for g in r['comfyui_grid']):.4f} / "
                     f"{r['fewstep_best']['batch_rel_error']:.4f} / " + (f"{c['batch_rel_error']:.4f}" if c else "–"))
    lines += ["", "The cards (an EDM card of NFE N − 1 makes N calls with ComfyUI's final step to 0):", ""]
    lines += [f"* {r['model']} NFE {r['nfe']}: {r['card']['card']}" for r in results if r["card"]]
    lines += ["", "ComfyUI's five best sampler × scheduler pairs per row (test seeds):", ""]
    for r in results:
        top = sorted(r["comfyui_grid"], key=lambda g: g["rel_error"])[:5]
        lines.append(f"* {r['model']} NFE {r['nfe']}: " + "; ".join(
            f"{g['sampler']} × {g['scheduler']} {g['rel_error']:.4f}" for g in top))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
