"""fewstep's solvers with k-diffusion's sampler convention (k-diffusion loops, ComfyUI's KSAMPLER, …).

Every registered solver NAME has `sample_NAME(model, x, sigmas, extra_args=None, callback=None, disable=None,
**options)`, exactly like `k_diffusion.sampling.sample_*`:

* `model(x, sigma * s_in, **extra_args)` returns the denoised D(x, σ) (a k-diffusion / ComfyUI model wrapper);
  σ is a [B] tensor in x's dtype;
* `x` is already scaled to σ_0 (x = σ_0·noise): fewstep does not rescale it;
* `sigmas` is the decreasing grid; a trailing σ = 0 is handled like k-diffusion's Euler/Heun/DPM-Solver++ handle
  it: the step to 0 returns D(x, σ_last) (fewstep's `denoise_to_zero` on the grid without the 0). A grid without
  a trailing zero ends at its last positive σ. (k-diffusion's LMS instead extrapolates its polynomial to σ = 0.)
* `callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'})` once per step, at the start of step i with the node
  evaluated there (sigma_hat = sigma: these are ODE solvers, no churn); with a trailing zero the last call
  carries D(x, σ_last). For UniPC, 'x' is the state at which D was evaluated (before its corrector).
* `disable` switches the progress bar off (None: on at a terminal).

**Flow models** (ComfyUI's "CONST" model sampling: SD3, Flux, Wan, …) use the same functions with `flow=True`, or
automatically when the model declares it: a `model_sampling` whose class (or a base class) is named `CONST` on the
model or on an `inner_model` below it (ComfyUI's wrappers), or a fewstep `frame` attribute (`fewstep.frames.FLOW`
or "flow"). Then `sigmas` are flow times t (they may start at exactly 1; a trailing 0 is the final step to t = 0,
x₀ = D(x, t_last)), `x` is x_t (x_1 = noise) and `model(x, t)` returns x₀; the run integrates in fewstep's flow
frame (docs/maths.md §15), so DPM-Solver++ and UniPC step in the flow half-log-SNR log((1 − t)/t) — not in −log t
as k-diffusion's own multistep samplers do on these sigmas (Euler and Heun step identically in both readings;
AFS's first node and the valid times, t ≤ 1, differ too).

`options` are the solver's own (`fewstep solvers` lists them, e.g. `max_order=3`) plus fewstep's `afs=True`,
`thresholding=True` / `threshold_ratio`, and `predictor=` (an AMEDPredictor: the AMED-Plugin of that solver; for
`sample_amed`, AMED-Solver) with `bottleneck=` (the network module whose output feeds the predictor; without
one the predictor reads the denoised estimate). The result is returned in x's dtype; the arithmetic runs in
float32 at least. `run_solver(method, model, x, sigmas, …)` takes any method spec of `fewstep.methods` without a
schedule: 'dpmpp:max_order=2+afs', 'learned:DIR' (a card), 'amed:DIR' (an AMED checkpoint).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..amed.solver import AMEDPlugin
from ..errors import SolverError
from ..frames import EDM, FLOW, Frame, frame_of, get_frame
from ..methods import SolverSpec, load_solver_spec
from ..schedules import check_schedule
from ..solvers import SOLVERS, Evaluator, GridPoint, ModelRequest, Node, Solver, answer, get_solver, run, solver_dtype

_DRIVER_OPTIONS = ("afs", "thresholding", "threshold_ratio", "predictor", "bottleneck", "flow")


def model_frame(model: Any, flow: bool | None = None) -> Frame:
    """The frame of a k-diffusion-style model: `flow` when given, else what the model or an `inner_model` below
    it declares (a fewstep `frame`, or ComfyUI's `model_sampling` of a class derived from one named CONST), else
    EDM."""
    if flow is not None:
        return FLOW if flow else EDM
    obj = model
    for _ in range(8):  # ComfyUI nests KSamplerX0Inpaint → CFGGuider → BaseModel
        if obj is None:
            break
        frame = getattr(obj, "frame", None)
        if isinstance(frame, Frame) or (isinstance(frame, str) and frame in ("edm", "flow")):
            return get_frame(frame)
        sampling = getattr(obj, "model_sampling", None)
        if sampling is not None:
            return FLOW if any(c.__name__ == "CONST" for c in type(sampling).__mro__) else EDM
        obj = getattr(obj, "inner_model", None)
    return EDM


def run_solver(solver: str | Solver, model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
               extra_args: dict[str, Any] | None = None, callback: Callable[[dict[str, Any]], Any] | None = None,
               disable: bool | None = None, **options: Any) -> torch.Tensor:
    """Run `solver` with k-diffusion's calling convention (see the module docstring): a Solver instance, or a
    method spec without a schedule (k-diffusion gives the grid): a name or 'name:opt=val,...[+afs]',
    'learned:DIR' (a card: `sigmas` must be its grid) or 'amed:DIR' (an AMED checkpoint). `flow=True` (or a model
    that declares it, see `model_frame`) reads `sigmas` as flow times and `x` as x_t."""
    extra_args = {} if extra_args is None else extra_args
    driver = {k: options.pop(k) for k in _DRIVER_OPTIONS if k in options}
    frame = model_frame(model, driver.get("flow"))
    if isinstance(solver, Solver):
        algo = solver
    else:
        loaded = load_solver_spec(_spec(solver, options), bottleneck=driver.get("bottleneck"))
        algo = loaded.solver
        driver.setdefault("afs", loaded.afs)
    if driver.get("predictor") is not None:
        algo = AMEDPlugin(algo, driver["predictor"], driver.get("bottleneck"))
    user_sigmas = sigmas
    grid = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
    denoise_to_zero = bool(grid.numel() >= 2 and grid[-1] == 0)
    if denoise_to_zero:
        grid = grid[:-1]
    if not (denoise_to_zero and grid.numel() == 1):  # [σ, 0] is a single denoising call
        grid = check_schedule(grid, "sigmas")
    threshold = driver.get("threshold_ratio", 0.995) if driver.get("thresholding", False) else None
    progress = disable is False or (disable is None and sys.stderr.isatty())

    def denoiser(x_: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(x_, sigma, **extra_args)

    def report(i: int, node: Node) -> None:  # k-diffusion's callback at the start of step i
        if callback is not None:
            callback({"x": node.x, "i": i, "sigma": user_sigmas[i], "sigma_hat": user_sigmas[i],
                      "denoised": node.denoised})

    def on_grid_point(point: GridPoint) -> None:
        bar.update(int(point.index > 0))
        if point.node is not None:
            report(point.index, point.node)

    last = len(grid) - 1

    def evaluate(req: ModelRequest) -> Node:
        node = ev.answer(req)
        if req.grid_point and req.index == last:  # the final denoising step to σ = 0
            report(last, node)
        return node

    state = x.to(solver_dtype(x))
    with (algo.node_features() as features, torch.no_grad(),
          tqdm(total=last, disable=not progress, desc=algo.name, leave=False) as bar):
        ev = Evaluator(denoiser, threshold, features)
        if len(grid) > 1:
            steps = run(algo, state, grid, afs=algo.resolve_afs(driver.get("afs")), denoise_to_zero=denoise_to_zero,
                        frame=frame)
            state = answer(steps, evaluate, on_grid_point)
        else:  # [σ, 0]: a single denoising call
            state = evaluate(ModelRequest(state, grid, grid, 0, grid_point=True)).denoised
    return state.to(x.dtype)


def _spec(text: str, options: dict[str, Any]) -> SolverSpec:
    """A method spec for a k-diffusion grid: options from the spec or the keywords, no schedule."""
    spec = SolverSpec.parse(text)
    if "@" in text and not spec.path:
        raise SolverError(f"{text!r}: k-diffusion gives the grid (sigmas); drop '@schedule'")
    if options:
        if spec.path or spec.options:
            raise SolverError(f"{text!r} takes no further options, got {sorted(options)}")
        spec = dataclasses.replace(spec, options=options)
        get_solver(spec.solver, **options)  # unknown options: an error now
    return spec


def _make(name: str) -> Callable[..., torch.Tensor]:
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return run_solver(name, model, x, sigmas, extra_args, callback, disable, **options)

    cls = SOLVERS[name]
    opts = ", ".join(f"{k}={o.default!r}" for k, o in cls.options.items()) or "none"
    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = (f"fewstep's `{name}` ({cls.summary}) with k-diffusion's sampler signature.\n\n"
                       f"Solver options (defaults): {opts}; plus afs, thresholding, threshold_ratio, predictor, "
                       f"bottleneck, flow (ComfyUI's flow / CONST convention). See `fewstep.integrations.kdiffusion`.")
    sampler.__module__ = __name__
    return sampler


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {}
for _name in SOLVERS:
    SAMPLERS[_name] = globals()[f"sample_{_name}"] = _make(_name)


def sample_amed(model, x, sigmas, extra_args=None, callback=None, disable=None, predictor=None, solver="amed",
                **options):
    """AMED with k-diffusion's sampler signature: AMED-Solver (`solver="amed"`, r = ½ without a predictor) or,
    with another `solver`, the AMED-Plugin of that solver. `predictor` is a trained AMEDPredictor
    (`fewstep.amed.checkpoint.load_checkpoint(path)[0]`); give `bottleneck=` when it was trained on a network's
    bottleneck features."""
    return run_solver(solver, model, x, sigmas, extra_args, callback, disable, predictor=predictor, **options)


SAMPLERS["amed"] = sample_amed


def sample_learned(model, x, sigmas=None, extra_args=None, callback=None, disable=None, card=None, flow=None):
    """A learned solver card (`fewstep learn`; a folder or `fewstep.load_solver(DIR)`) with k-diffusion's sampler
    signature. The card runs on its own grid: `sigmas` may be omitted (then x = σ_0·noise with the card's σ_0),
    or must be that grid, optionally with a trailing 0 (a final denoising call, one NFE more). A card folder
    learned on a flow model runs in the flow convention (`flow`, default: the card's, else the model's)."""
    if card is None:
        raise SolverError("sample_learned needs card= (a card folder or fewstep.load_solver(DIR))")
    from ..learned import LearnedSolver, load_card, load_solver

    solver = card if isinstance(card, LearnedSolver) else load_solver(card)
    if flow is None and not isinstance(card, LearnedSolver) and frame_of(load_card(card)) is FLOW:
        flow = True
    grid = solver.grid.detach().to(torch.float64)
    if sigmas is None:
        sigmas = grid
    given = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
    positive = given[:-1] if len(given) and given[-1] == 0 else given
    if positive.shape != grid.shape or not torch.allclose(positive, grid, rtol=1e-6, atol=0):
        raise SolverError(f"this card runs on its own {len(grid)}-point grid (fewstep learn export DIR --sigmas); "
                          f"got sigmas {given.tolist()}")
    return run_solver(solver, model, x, torch.cat([grid, given[len(grid):]]), extra_args, callback, disable,
                      flow=flow)


SAMPLERS["learned"] = sample_learned

__all__ = ["SAMPLERS", "model_frame", "run_solver", "sample_amed", "sample_learned"] + [
    f"sample_{n}" for n in SOLVERS if n != "amed"]
