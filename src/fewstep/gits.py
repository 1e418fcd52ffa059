"""GITS — geometry-inspired time scheduling (Chen et al., arXiv 2405.11326; docs/maths.md §10).

Sampling trajectories of the probability-flow ODE are regular (nearly 2-D, smooth), so a schedule that is good
for a few hundred warm-up trajectories is good for all of them. GITS

1. runs a *teacher* solver on a fine grid t_0 = σ_max > … > t_{N−1} = σ_min (default 61 points of polynomial
   ρ = 7) from `warmup` noise seeds (2 000 000, 2 000 001, …: `fewstep.seeds.GITS_WARMUP`, disjoint from the
   evaluation seeds 0, 1, … and from every training seed) and records the states x_i and the directions
   d_i = (x_i − D(x_i, t_i))/t_i at the grid points;
2. builds the cost matrix C[i][j] (i < j) = the mean over samples of the error of one Euler jump
   x̂_ij = x_i + (t_j − t_i)·d_i against the teacher's x_j (`cost_sums`, metrics below);
3. picks the K-interval path 0 = p_0 < p_1 < … < p_K = N−1 through the fine grid that minimises the discounted
   cost Σ_k γ^k·C[p_k][p_{k+1}] by an exact dynamic programme (`dp_path`):
       V[j][1] = C[j][N−1],   V[j][k] = min_{j<i<N−1} C[j][i] + γ·V[i][k−1],   answer V[0][K],
   exactly the recursion of the authors' code (zju-pi/diff-sampler, gits-main/gits_utils.py, function `dp`,
   `coeff` = γ). The discount multiplies the *remaining* path, so interval k carries weight γ^k: with γ > 1 the
   late, low-σ intervals (where errors are no longer damped by later steps) count more.
4. returns t_{p_0} > … > t_{p_K}: a schedule of K + 1 points that every solver can use.

K = num_steps − 1 intervals of the student solver (num_steps = `num_steps_for_nfe(solver, nfe, afs)`).

AFS (`afs=True`, the student's first direction is the free analytic d_0 = x_0/√(1 + t_0²)): by default
(`afs_mode="insert"`, the authors' procedure) the DP picks K − 1 intervals and one extra point is inserted in the
first interval, the one that minimises the student's final RMSE to the teacher on the warm-up samples;
`afs_mode="cost"` instead recomputes row 0 of C with AFS's direction and runs the DP with K intervals.

Defaults (teacher iPNDM, 61-point polynomial ρ = 7 grid, 256 warm-up samples, metric l2, γ = 1.0) were chosen on
held-out validation seeds (benchmarks/gits_bench.py --sweep; the README's GITS section): γ near 1 is safe where
the paper's 1.15 is borderline for some warm-up seed sets.

Metrics (per sample, then averaged over the warm-up samples; D = number of entries of x):
  * ``l2``:  ‖x̂_ij − x_j‖₂/√D  — the per-sample RMSE (the authors use the unnormalised norm: same argmin);
  * ``l1``:  ‖x̂_ij − x_j‖₁/D   — the per-sample mean absolute error;
  * ``dev``: |dev(x̂_ij) − dev(x_j)|/√D, where dev(y) = ‖(y − x_end) − ⟨y − x_end, u⟩u‖₂ is the distance of y
    from the straight line through the trajectory's start x_0 = x_T and end x_end = x_{N−1}
    (u = (x_end − x_0)/‖x_end − x_0‖): how much the jump changes the trajectory's deviation from its
    start–end chord. (The authors' code takes the signed difference of the sample means, which can be
    negative; we take the mean absolute per-sample difference, a proper non-negative cost.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import FewstepError, ScheduleError, SolverError
from .noise import seeded_noise
from .schedules import check_schedule, get_schedule
from .seeds import GITS_WARMUP
from .solvers import get_solver, num_steps_for_nfe, sample, sample_with_directions

METRICS = ("l2", "l1", "dev")
DEFAULT_TEACHER = "ipndm"
DEFAULT_GRID = 61
DEFAULT_WARMUP = 256
DEFAULT_GAMMA = 1.0  # tuned on held-out seeds (benchmarks/gits_bench.py --sweep); the paper uses 1.15
DEFAULT_METRIC = "l2"


# ---------------------------------------------------------------------------------------------------------------
# Dynamic programme


def dp_path(cost: torch.Tensor, num_intervals: int, gamma: float = DEFAULT_GAMMA) -> tuple[list[int], float]:
    """The exact minimiser of Σ_k γ^k·C[p_k][p_{k+1}] over paths 0 = p_0 < … < p_K = N−1 (K = num_intervals).

    `cost` is [N, N] with C[i][j] for i < j (entries with i ≥ j are ignored). Returns the path (K + 1 indices)
    and its discounted cost V[0][K]. Vectorised over the start index: O(K·N²).
    """
    c = torch.as_tensor(cost, dtype=torch.float64).detach().cpu().numpy().copy()  # small: numpy, no thread pool
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise FewstepError(f"cost must be a square matrix [N, N] with N >= 2, got shape {tuple(c.shape)}")
    n, k_max = c.shape[0], int(num_intervals)
    if not 1 <= k_max <= n - 1:
        raise FewstepError(f"cannot choose {k_max} intervals from a grid of {n} points (need 1 <= K <= {n - 1})")
    if not (math.isfinite(gamma) and gamma > 0):
        raise FewstepError(f"gamma must be positive and finite, got {gamma!r}")
    c[np.tril_indices(n)] = np.inf  # only forward jumps i < j
    if np.isnan(c).any():
        raise FewstepError("the cost matrix contains NaN")
    value = np.full((n, k_max + 1), np.inf)
    choice = np.full((n, k_max + 1), n - 1, dtype=np.int64)
    value[:, 1] = c[:, n - 1]
    for k in range(2, k_max + 1):
        cand = c[:, : n - 1] + gamma * value[None, : n - 1, k - 1]  # [j, i]: C[j][i] + γ·V[i][k−1]
        choice[:, k] = cand.argmin(axis=1)
        value[:, k] = cand[np.arange(n), choice[:, k]]
    path, j = [0], 0
    for k in range(k_max, 0, -1):
        j = int(choice[j, k])
        path.append(j)
    return path, float(value[0, k_max])


def path_cost(cost: torch.Tensor, path: Sequence[int], gamma: float = DEFAULT_GAMMA) -> float:
    """Σ_k γ^k·C[p_k][p_{k+1}] of an index path (what `dp_path` minimises)."""
    return float(sum(gamma**k * float(cost[a, b]) for k, (a, b) in enumerate(zip(path[:-1], path[1:]))))


# ---------------------------------------------------------------------------------------------------------------
# Warm-up trajectories and the cost matrix


def _teacher_run(model: Any, noise: torch.Tensor, grid: torch.Tensor, teacher: str,
                 options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """States x_i [N, B, …] and directions d_i [N−1, B, …] at the grid points of one teacher run: d_i comes
    from the teacher's own evaluation of x_i where there is one (every solver without a corrector), otherwise
    from one batched call (`fewstep.solvers.sample_with_directions`)."""
    return sample_with_directions(model.denoiser, noise, teacher, grid, **options)


def cost_sums(grid: torch.Tensor, traj: torch.Tensor, dirs: torch.Tensor, metric: str = DEFAULT_METRIC,
              rows: Sequence[int] | None = None, budget: int = 1 << 24) -> torch.Tensor:
    """Σ over the samples of the per-sample error of the jump x_i + (t_j − t_i)·d_i against x_j: [N, N].

    `traj` [N, B, …] and `dirs` [N−1, B, …] (d_i at the grid points); `rows` limits the start indices i
    (default: all); entries with i ≥ j and rows not computed are +inf. Metrics: see the module doc.
    Vectorised over (i, j) and the samples, in sample chunks of at most `budget` elements of [rows, N, chunk, D].
    """
    if metric not in METRICS:
        raise FewstepError(f"unknown GITS metric {metric!r}; choose one of {', '.join(METRICS)}")
    n, b = traj.shape[0], traj.shape[1]
    idx = torch.arange(n - 1) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    x = traj.reshape(n, b, -1).to(torch.float64)
    d = dirs.reshape(n - 1, b, -1).to(torch.float64)[idx]
    dim = x.shape[-1]
    t = grid.to(torch.float64)
    h = (t[None, :] - t[idx, None])[..., None, None]  # [R, N, 1, 1]: t_j − t_i
    total = torch.zeros(len(idx), n, dtype=torch.float64)
    chunk = max(1, budget // max(1, len(idx) * n * dim))
    for s in range(0, b, chunk):
        xs, ds = x[:, s : s + chunk], d[:, s : s + chunk]
        pred = xs[idx, None] + h * ds[:, None]  # [R, N, c, D]: x̂_ij
        if metric == "l2":
            per = (pred - xs[None]).pow(2).mean(-1).sqrt()
        elif metric == "l1":
            per = (pred - xs[None]).abs().mean(-1)
        else:
            end = xs[-1]
            u = end - xs[0]
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)

            def dev(y: torch.Tensor) -> torch.Tensor:  # distance from the chord through x_0 and x_end
                r = y - end
                return (r.pow(2).sum(-1) - (r * u).sum(-1).pow(2)).clamp_min(0).sqrt()

            per = (dev(pred) - dev(xs)[None]).abs() / math.sqrt(dim)
        total += per.sum(-1)
    full = torch.full((n, n), math.inf, dtype=torch.float64)
    full[idx] = total
    return full.masked_fill(~torch.ones(n, n, dtype=torch.bool).triu(1), math.inf)


# ---------------------------------------------------------------------------------------------------------------
# The search


@dataclass
class GitsSearch:
    """The warm-up statistics of one (model, teacher, grid, metric): schedules for any K come from `schedule`."""

    model: str
    grid: torch.Tensor  # the fine grid, float64 [N]
    cost: torch.Tensor  # [N, N] mean cost with the model's d_0
    cost_afs: torch.Tensor  # [N, N] the same with AFS's analytic first direction
    teacher: str
    teacher_options: dict[str, Any]
    warmup: int
    metric: str
    seconds: float
    grid_spec: dict[str, Any] = field(default_factory=dict)
    final: torch.Tensor | None = field(default=None, repr=False)  # the teacher's end states (for afs_mode="insert")
    first_seed: int = GITS_WARMUP.first()
    model_info: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def run(cls, model: Any, teacher: str = DEFAULT_TEACHER, grid: int | torch.Tensor = DEFAULT_GRID,
            warmup: int = DEFAULT_WARMUP, metric: str = DEFAULT_METRIC, teacher_options: dict[str, Any] | None = None,
            batch: int = 64, first_seed: int = GITS_WARMUP.first(), grid_schedule: str = "polynomial",
            grid_rho: float | None = 7.0, progress: bool = True) -> GitsSearch:
        """Run the teacher on `warmup` seeds (in batches, with a progress bar) and accumulate the cost matrix.

        `grid` is a number of points of `grid_schedule` (polynomial ρ = 7 by default) or an explicit σ grid.
        """
        if metric not in METRICS:
            raise FewstepError(f"unknown GITS metric {metric!r}; choose one of {', '.join(METRICS)}")
        if warmup < 1 or batch < 1:
            raise FewstepError(f"warmup and batch must be >= 1, got warmup={warmup}, batch={batch}")
        GITS_WARMUP.check_span(first_seed, warmup, "the warm-up seeds")
        options = dict(teacher_options or {})
        get_solver(teacher, **options)  # unknown teacher / option: fail before any work
        start = time.perf_counter()
        if isinstance(grid, int):
            if grid < 3:
                raise FewstepError(f"the GITS grid needs at least 3 points, got {grid}")
            fine = get_schedule(grid_schedule, grid, model.sigma_min, model.sigma_max, rho=grid_rho)
            fine[0], fine[-1] = float(model.sigma_max), float(model.sigma_min)  # exact ends (no round-off)
            spec = {"schedule": grid_schedule, "rho": grid_rho, "points": grid}
        else:
            fine = check_schedule(grid, "GITS grid")
            spec = {"schedule": "custom", "points": len(fine)}
        n = len(fine)
        total = torch.zeros(n, n, dtype=torch.float64)
        total_afs = torch.zeros(n, dtype=torch.float64)  # row 0 only differs
        finals = []
        for s in tqdm(range(0, warmup, batch), desc="GITS warm-up", disable=not progress, leave=False,
                      unit="batch"):
            seeds = range(first_seed + s, first_seed + min(s + batch, warmup))
            noise = seeded_noise(seeds, model.shape)
            traj, dirs = _teacher_run(model, noise, fine, teacher, options)
            total += cost_sums(fine, traj, dirs, metric)
            dirs[0] = traj[0] / math.sqrt(1 + float(fine[0]) ** 2)  # AFS's analytic d_0 (docs/maths.md §7)
            total_afs += cost_sums(fine, traj, dirs, metric, rows=[0])[0]
            finals.append(traj[-1])
        cost = total / warmup
        cost_afs = cost.clone()
        cost_afs[0] = total_afs / warmup
        return cls(getattr(model, "name", "?"), fine, cost, cost_afs, teacher, options, warmup, metric,
                   time.perf_counter() - start, spec, torch.cat(finals), first_seed, model)

    def schedule(self, num_steps: int, gamma: float = DEFAULT_GAMMA, afs: bool = False, afs_mode: str = "insert",
                 solver: str = "ipndm", solver_options: dict[str, Any] | None = None) -> tuple[torch.Tensor, list[int]]:
        """The GITS schedule of `num_steps` points (K = num_steps − 1 intervals) and its fine-grid indices.

        With `afs`, `afs_mode="cost"` runs the DP on the costs with AFS's first direction; `"insert"` (the
        authors' procedure) runs it with K − 1 intervals and inserts one point in the first interval, the one
        that minimises the final RMSE of `solver` (with AFS) to the teacher on the warm-up samples.
        """
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ScheduleError(f"num_steps must be an integer >= 2, got {num_steps!r}")
        if num_steps > len(self.grid):
            raise ScheduleError(f"cannot pick {num_steps} points from a GITS grid of {len(self.grid)}; use a "
                                f"finer --grid")
        if afs_mode not in ("cost", "insert"):
            raise FewstepError(f"afs_mode must be 'cost' or 'insert', got {afs_mode!r}")
        if afs and afs_mode == "insert" and num_steps >= 3:
            path, _ = dp_path(self.cost, num_steps - 2, gamma)
            best = self._insert_first(path, solver, dict(solver_options or {}))
            if best is not None:
                return self.grid[best].clone(), best
        path, _ = dp_path(self.cost_afs if afs else self.cost, num_steps - 1, gamma)
        return self.grid[path].clone(), path

    def _insert_first(self, path: list[int], solver: str, options: dict[str, Any]) -> list[int] | None:
        if self.model_info is None or self.final is None:
            raise FewstepError("afs_mode='insert' needs the model and warm-up states of a search made by run()")
        if path[1] < 2:
            return None
        from .reference import rmse

        noise = seeded_noise(range(self.first_seed, self.first_seed + self.warmup), self.model_info.shape)
        best, best_err = None, math.inf
        for k in range(1, path[1]):
            cand = [0, k, *path[1:]]
            with torch.no_grad():
                x = sample(self.model_info.denoiser, noise, solver, self.grid[cand], afs=True, **options)
            err = rmse(x, self.final)
            if err < best_err:
                best, best_err = cand, err
        return best

    def metadata(self, num_steps: int, gamma: float, afs: bool, path: list[int], solver: str | None = None,
                 nfe: int | None = None) -> dict[str, Any]:
        return {
            "model": self.model, "num_steps": num_steps, "nfe": nfe, "solver": solver, "afs": afs,
            "teacher": self.teacher, "teacher_options": self.teacher_options, "grid": self.grid_spec,
            "warmup": self.warmup, "gamma": gamma, "metric": self.metric, "seconds": round(self.seconds, 3),
            "indices": path, "warmup_seeds": f"{self.first_seed}-{self.first_seed + self.warmup - 1}",
            "seed_range": GITS_WARMUP.name,
        }


_SEARCHES: dict[str, GitsSearch] = {}


def cached_search(model: Any) -> GitsSearch:
    """The default-settings GitsSearch of a model, run once per process (bench cells and AMED training share it)."""
    if model.name not in _SEARCHES:
        _SEARCHES[model.name] = GitsSearch.run(model, progress=False)
    return _SEARCHES[model.name]


def gits_schedule(model: Any, num_steps: int, gamma: float = DEFAULT_GAMMA, afs: bool = False,
                  afs_mode: str = "insert", solver: str = "ipndm", solver_options: dict[str, Any] | None = None,
                  **search: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """One GITS schedule of `num_steps` points for `model` (a float64 decreasing tensor) and its metadata.

    `search` goes to `GitsSearch.run` (teacher, grid, warmup, metric, …); `solver` is the student that AFS's
    inserted point is tuned for. To cut schedules for several step counts, run one `GitsSearch` and call its
    `schedule` for each: the warm-up and the cost matrix do not depend on num_steps.
    """
    start = time.perf_counter()
    gs = GitsSearch.run(model, **search)
    sigmas, path = gs.schedule(num_steps, gamma, afs, afs_mode, solver, solver_options)
    meta = gs.metadata(num_steps, gamma, afs, path, solver)
    meta.update(afs_mode=afs_mode if afs else None, seconds=round(time.perf_counter() - start, 3))
    return sigmas, meta


def refine_schedule(sigmas: torch.Tensor, m: int, rho: float = 7.0) -> torch.Tensor:
    """Insert `m` points in every interval, uniformly in σ^{1/ρ} (refining polynomial-ρ grids exactly).

    Gives a teacher grid of m·(N−1) + N points for any schedule, e.g. for AMED distillation on a GITS schedule.
    """
    t = check_schedule(sigmas)
    if m < 0:
        raise ScheduleError(f"m must be >= 0, got {m}")
    a, b = t[:-1] ** (1 / rho), t[1:] ** (1 / rho)
    u = torch.linspace(0, 1, m + 2, dtype=torch.float64)[:-1]
    inner = ((a[:, None] + u[None, :] * (b - a)[:, None]) ** rho).reshape(-1)
    return check_schedule(torch.cat([inner, t[-1:]]), "refined schedule")


# ---------------------------------------------------------------------------------------------------------------
# Grid size for an NFE budget


def nfe_to_num_steps(solver: str, nfe: int, afs: bool = False, **options: Any) -> int:
    """num_steps (points) giving exactly `nfe` calls of `solver`, or a SolverError saying why not."""
    steps = num_steps_for_nfe(solver, nfe, afs=afs, **options)
    if steps is None:
        raise SolverError(f"{solver} cannot use exactly {nfe} NFE" + ("" if afs else "; try --afs"))
    return steps
