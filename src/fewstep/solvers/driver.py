"""The one sampling loop: `run` walks a solver over a σ grid as a generator of model requests.

`run` yields a `ModelRequest` for every model call (grid-point evaluations, multi-stage steps, a wrapper's
inserted points, the final `denoise_to_zero` call) and receives the answer (a node, or a bare D), and yields a
`GridPoint` each time the state reaches a grid point. Everything that samples is a thin consumer of it:
`integrate` / `sample` answer with an `Evaluator`; the k-diffusion samplers fire their callback at grid points;
training rollouts answer grid requests at a teacher's states and detach between intervals; the diffusers
scheduler answers one request per pipeline step; GITS and the trajectory analysis read the grid-point nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import SolverError
from ..frames import EDM, Frame, frame_of, get_frame
from ..schedules import check_schedule
from .base import Denoiser, Evaluator, ModelRequest, Node, Solver, StepInfo, get_solver, request


@dataclass
class GridPoint:
    """The state reached grid point `index`: `x` (after the corrector and any edit by the consumer), `stepped`
    (the state the step itself reached), `hist` (the nodes the next step reads) and `node` (the evaluation at
    this point; None at the last point). A consumer may reply with a modified copy (`dataclasses.replace`) to
    continue from its `x` and `hist`, e.g. detached ones."""

    index: int
    sigma: torch.Tensor
    x: torch.Tensor
    stepped: torch.Tensor
    hist: list[Node]
    node: Node | None


Run = Generator["ModelRequest | GridPoint", "Node | torch.Tensor | GridPoint | None", torch.Tensor]


def run(algo: Solver, x: torch.Tensor, sigmas: torch.Tensor, afs: bool = False,
        denoise_to_zero: bool = False, frame: Frame = EDM) -> Run:
    """Run `algo` over the grid `sigmas` (float64, validated) from the state x at sigmas[0]; returns the final
    state, or D(x, σ_min) with `denoise_to_zero`. `frame` names the coordinates (fewstep.frames): EDM σ-space,
    or a flow model's (x_t, t), where the grid may start at t = 1 exactly.

    The state arriving at every grid point but the last is evaluated (at `algo.eval_sigma`, or AFS's analytic
    node at the first) and may be refined by the solver's corrector. Yields a `ModelRequest` per model call
    (send back D, or a node) and a `GridPoint` at every grid point (send back None, or a modified copy to
    continue from).
    """
    algo.check_grid(sigmas)
    algo.check_frame(frame)
    frame.check_times(sigmas.detach())
    n_int = len(sigmas) - 1
    t = [sigmas[i : i + 1] for i in range(len(sigmas))]
    lo, hi = float(sigmas[-1].detach()), float(sigmas[0].detach())

    def eval_time(i: int) -> torch.Tensor | None:  # where the model is called for grid point i
        moved = algo.eval_sigma(t[i], i)
        return None if moved is None else frame.clamp_time(moved)

    if afs:
        node = algo.afs_node(x, t[0], frame)
    else:
        node = yield from request(x, t[0], 0, eval_time(0), grid_point=True)
    x, hist = node.x, [node]
    reply = yield GridPoint(0, t[0], x, x, hist, node)
    if reply is not None:
        x, hist = reply.x, reply.hist
    for i in range(n_int):
        info = StepInfo(i, n_int - i, lo, hi, frame, denoise_to_zero)
        sub = yield from algo.advance(x, hist, t[i + 1], info)
        stepped, hist, node = sub.x_next, sub.hist, None
        x = stepped
        if i + 1 < n_int:  # evaluate the arrived state (every point but the last), maybe correct it
            node = yield from request(x, t[i + 1], i + 1, eval_time(i + 1), grid_point=True)
            hist = [*hist[-algo.history :], node]
            x = algo.correct(sub.x_prev, node.x, hist, sub.info, sub.scale)
        reply = yield GridPoint(i + 1, t[i + 1], x, stepped, hist, node)
        if reply is not None:
            x, hist = reply.x, reply.hist
    if denoise_to_zero:
        return (yield from request(x, t[-1], n_int, grid_point=True)).denoised
    return x


def answer(steps: Run, respond: Callable[[ModelRequest], Node | torch.Tensor],
           on_grid_point: Callable[[GridPoint], GridPoint | None] | None = None) -> torch.Tensor:
    """Drive `steps` to its end: every model request is answered by `respond` (e.g. `Evaluator.answer`), every
    grid point handed to `on_grid_point` (whose return value, if any, replaces the state). Returns the result."""
    reply: Any = None
    while True:
        try:
            msg = steps.send(reply)
        except StopIteration as stop:
            return stop.value
        if isinstance(msg, ModelRequest):
            reply = respond(msg)
        else:
            reply = on_grid_point(msg) if on_grid_point is not None else None


def integrate(
    algo: Solver,
    ev: Evaluator,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    afs: bool = False,
    trajectory: list[torch.Tensor] | None = None,
    progress: bool = False,
    denoise_to_zero: bool = False,
    frame: Frame | None = None,
) -> torch.Tensor:
    """`run` answered by `ev`: the final state (autograd flows through it). `trajectory`, when given, receives
    the state at every grid point after the first. The frame defaults to the one the denoiser declares."""
    steps = run(algo, x, sigmas, afs, denoise_to_zero, frame or frame_of(ev.denoiser))
    if not progress and trajectory is None:
        return answer(steps, ev.answer)
    with tqdm(total=len(sigmas) - 1, disable=not progress, desc=algo.name, leave=False) as bar:
        def on_grid_point(point: GridPoint) -> None:
            if point.index > 0:
                bar.update()
                if trajectory is not None:
                    trajectory.append(point.x)

        return answer(steps, ev.answer, on_grid_point)


def solver_dtype(noise: torch.Tensor) -> torch.dtype:
    """Solver arithmetic runs in float32 at least (float64 when the noise is float64)."""
    return torch.promote_types(noise.dtype, torch.float32) if noise.is_floating_point() else torch.float32


def resolve(solver: str | Solver, options: dict[str, Any]) -> Solver:
    """A solver instance from a name and its options, or the instance itself (which takes no options)."""
    if isinstance(solver, Solver):
        if options:
            raise SolverError(f"options {sorted(options)} given with a solver instance; set them on the instance")
        return solver
    return get_solver(solver, **options)


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    solver: str | Solver = "euler",
    schedule: torch.Tensor | None = None,
    *,
    num_steps: int | None = None,
    afs: bool | None = None,
    denoise_to_zero: bool | None = None,
    return_trajectory: bool = False,
    thresholding: bool = False,
    threshold_ratio: float = 0.995,
    progress: bool = False,
    frame: Frame | str | None = None,
    **options: Any,
) -> torch.Tensor:
    """Solve the probability-flow ODE from x_T = schedule[0]·noise down to schedule[-1].

    `denoiser(x, sigma)` returns E[x₀|x] (sigma is a [B] tensor); `noise` is N(0, I) of shape [B, …].
    Without `schedule`, the solver's recommended schedule with `num_steps` points is used. `solver` is a name
    (with `options`) or any Solver instance, e.g. a wrapper such as a learned card from
    `fewstep.load_solver(DIR)`, which brings its own grid and AFS setting.
    Returns the state at σ_min (or D(x, σ_min) with `denoise_to_zero`), or with `return_trajectory` a tensor
    [N, *noise.shape] of the state at every grid point (its last entry is what would be returned otherwise,
    the denoised output when `denoise_to_zero`). `options` are the solver's own (see `fewstep solvers`).
    `frame` ('edm', 'flow'; default: the denoiser's `frame` attribute, else EDM) names the coordinates: a flow
    model's denoiser is D(x_t, t) on a grid of flow times that may start at t = 1 (docs/maths.md §15), and its
    run ends with the step to t = 0 (`denoise_to_zero` defaults to the frame's choice: on for flow models).
    """
    frame = get_frame(frame) if frame is not None else frame_of(denoiser)
    if denoise_to_zero is None:
        denoise_to_zero = frame.final_denoise
    algo = resolve(solver, options)
    afs = algo.resolve_afs(afs)
    if schedule is None:
        schedule = algo.default_schedule(num_steps)
    sigmas = check_schedule(schedule)
    if num_steps is not None and num_steps != len(sigmas):
        raise SolverError(f"num_steps={num_steps} but the schedule has {len(sigmas)} points")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise SolverError("noise must be a tensor [B, …]")
    if not noise.is_floating_point():
        raise SolverError(f"noise must be a real floating-point tensor, got {noise.dtype}")
    if not bool(torch.isfinite(noise).all()):
        raise SolverError("noise holds NaN or Inf values")
    x = noise.to(solver_dtype(noise)) * float(sigmas[0])
    traj = [x] if return_trajectory else None

    threshold = threshold_ratio if thresholding else None
    with algo.node_features() as features:
        x = integrate(algo, Evaluator(denoiser, threshold, features), x, sigmas, afs=afs, trajectory=traj,
                      progress=progress, denoise_to_zero=denoise_to_zero, frame=frame)
    if traj is not None and denoise_to_zero:
        traj[-1] = x
    return torch.stack(traj) if traj is not None else x


def sample_with_directions(denoiser: Denoiser, noise: torch.Tensor, solver: str, sigmas: torch.Tensor,
                           afs: bool = False, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample`'s trajectory [N, B, …] and the directions d_i = (x_i − D(x_i, t_i))/t_i at its first N − 1
    points [N − 1, B, …]: read from the driver's own evaluation where it was made at that very state and σ,
    recomputed in one batched call for the others (AFS's first point, states moved by a corrector)."""
    algo = get_solver(solver, **options)
    sigmas = check_schedule(sigmas)
    x = noise.to(solver_dtype(noise)) * float(sigmas[0])
    traj: list[torch.Tensor] = []
    found: dict[int, torch.Tensor] = {}

    def on_grid_point(point: GridPoint) -> None:
        traj.append(point.x)
        if point.node is not None and point.node.x is point.x and not (afs and point.index == 0):
            found[point.index] = point.node.d

    with torch.no_grad():
        answer(run(algo, x, sigmas, afs, frame=frame_of(denoiser)), Evaluator(denoiser).answer, on_grid_point)
        states = torch.stack(traj)
        missing = [i for i in range(len(sigmas) - 1) if i not in found]
        if missing:
            xs = states[missing].reshape(-1, *states.shape[2:])
            sig = sigmas[missing].to(xs.dtype).repeat_interleave(states.shape[1])
            den = denoiser(xs, sig).to(xs.dtype)
            d = (xs - den) / sig.reshape(-1, *([1] * (xs.ndim - 1)))
            found.update(zip(missing, d.reshape(len(missing), *states.shape[1:])))
    return states, torch.stack([found[i] for i in range(len(sigmas) - 1)])
