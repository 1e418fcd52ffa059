"""Trajectory geometry (docs/maths.md §9, the AMED paper's key observation): how close to a 2-D subspace does each
sampling trajectory stay?

For each trajectory {x_i} (i = 0 … N−1, x_0 at σ_max here, x_{N−1} the result): centre it, PCA it, and measure

* the relative reconstruction error ‖x_i − x̂_{k,i}‖/‖x_i‖ from the top-k principal components (k = 1…4),
* the cumulative explained variance of the top-k components (1 − ‖X_c − X̂_{c,k}‖²_F/‖X_c‖²_F),
* the distance of x_i from the straight line through x_T and the result (absolute and relative to ‖x_T − x_end‖),
* the angle between the direction d_i = (x_i − D(x_i, t_i))/t_i and x_i − x_end (i < N−1).

A trajectory is an N×D matrix with N ≈ 41 ≪ D, so its principal directions come from the N×N Gram matrix of
the centred rows (eigh), then residuals are formed explicitly in D-space against an orthonormalised (QR) basis,
which keeps tiny errors accurate. Trajectories are processed in batches so memory stays bounded for any n.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..io import atomic_write, write_json

MAX_K = 4
DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes of float64 trajectory data per batch (~6× that in use at peak)


@dataclass
class Geometry:
    """Per-trajectory measurements, numpy arrays with a leading batch axis B."""

    rel_error: np.ndarray  # [B, N, K]: ‖x_i − x̂_{k,i}‖/‖x_i‖, k = 1…K
    explained: np.ndarray  # [B, K]: cumulative explained variance of the top-k components
    line_dev: np.ndarray  # [B, N]: distance of x_i from the line through x_T and x_end
    line_dev_rel: np.ndarray  # [B, N]: the same divided by ‖x_T − x_end‖
    angle: np.ndarray | None  # [B, N−1]: angle (degrees) between d_i and x_i − x_end, or None without d
    proj3: np.ndarray  # [B, N, 3]: coordinates of the centred x_i on the top-3 principal directions

    @staticmethod
    def concat(parts: Sequence[Geometry]) -> Geometry:
        def cat(name: str) -> np.ndarray | None:
            vals = [getattr(p, name) for p in parts]
            return None if any(v is None for v in vals) else np.concatenate(vals)

        return Geometry(*(cat(f) for f in ("rel_error", "explained", "line_dev", "line_dev_rel", "angle", "proj3")))


def trajectory_geometry(traj: torch.Tensor, d: torch.Tensor | None = None, max_k: int = MAX_K) -> Geometry:
    """Measurements of trajectories `traj` [B, N, …] (float64 arithmetic); `d` [B, N−1, …] the ODE directions
    at the first N−1 points (optional). Needs N ≥ 2. Peak memory ≈ 4 float64 copies of `traj`."""
    if traj.ndim < 3:
        raise FewstepError(f"trajectories must be [batch, steps, …], got shape {tuple(traj.shape)}")
    b, n = traj.shape[:2]
    if n < 2:
        raise FewstepError("a trajectory needs at least 2 points")
    tiny = torch.finfo(torch.float64).tiny
    x = traj.reshape(b, n, -1).to(torch.float64, copy=True)  # modified in place below
    k_max = min(max_k, n, x.shape[2])
    xc = x - x.mean(1, keepdim=True)
    _, u = torch.linalg.eigh(xc @ xc.transpose(1, 2))  # N×N Gram matrix, eigenvalues ascending
    u = u.flip(-1)[..., : max(k_max, min(3, n, x.shape[2]))]  # top components (≥ 3 for the 3-D view)
    q, _ = torch.linalg.qr(xc.transpose(1, 2) @ u)  # [B, D, k]: orthonormal, nested spans = top-k directions
    coef = xc @ q  # [B, N, k]
    x_norm = x.norm(dim=2).clamp_min(tiny)
    total = xc.pow(2).sum((1, 2)).clamp_min(tiny)
    rel, expl = [], []
    resid = xc  # residuals formed explicitly in D-space (in place): accurate even when tiny
    for j in range(k_max):
        resid.sub_(coef[..., j : j + 1] * q[:, None, :, j])
        rel.append(resid.norm(dim=2) / x_norm)
        expl.append(1 - resid.pow(2).sum((1, 2)) / total)
    del resid, xc, q
    proj3 = torch.zeros(b, n, 3, dtype=torch.float64)
    proj3[..., : min(3, coef.shape[-1])] = coef[..., :3]
    end = x[:, -1:].clone()
    a = x.sub_(end)  # x_i − x_end, in place
    angle = None
    if d is not None:
        dd = d.reshape(b, n - 1, -1).to(torch.float64)
        dd = dd / dd.norm(dim=2, keepdim=True).clamp_min(tiny)
        an = a[:, : n - 1] / a[:, : n - 1].norm(dim=2, keepdim=True).clamp_min(tiny)
        cos = (dd * an).sum(2)
        sin = dd.sub_(cos[..., None] * an).norm(dim=2)  # explicit: accurate for small angles, unlike arccos
        angle = torch.rad2deg(torch.atan2(sin, cos)).numpy()
        del dd, an
    line = a[:, :1].clone()  # x_T − x_end
    line_n2 = line.pow(2).sum(2, keepdim=True).clamp_min(tiny)
    dev = a.sub_((a * line).sum(2, keepdim=True) / line_n2 * line).norm(dim=2)  # distance to the line
    dev_rel = dev / line_n2[..., 0].sqrt()
    return Geometry(
        rel_error=torch.stack(rel, -1).numpy(), explained=torch.stack(expl, -1).numpy(), line_dev=dev.numpy(),
        line_dev_rel=dev_rel.numpy(), angle=angle, proj3=proj3.numpy(),
    )


def directions_along(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], states: torch.Tensor,
                     sigmas: torch.Tensor) -> torch.Tensor:
    """d_i = (x_i − D(x_i, t_i))/t_i for states [N', B, …] at sigmas [N'], one denoiser call per point.
    (`analyze` takes them from the sampler's own calls instead: `fewstep.solvers.sample_with_directions`.)"""
    from ..solvers import Node

    out = torch.empty_like(states)
    for i in range(states.shape[0]):
        xi, t = states[i], sigmas[i : i + 1].to(torch.float64)
        out[i] = Node(t, xi, denoiser(xi, t.to(xi.dtype).expand(xi.shape[0])).to(xi.dtype)).d
    return out


@dataclass
class AnalysisResult:
    geometry: Geometry
    sigmas: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        g = self.geometry
        k_max = g.explained.shape[1]
        ev = {}
        for k in range(k_max):
            e = g.explained[:, k]
            ev[str(k + 1)] = {
                "mean": float(e.mean()), "median": float(np.median(e)), "min": float(e.min()),
                "p01": float(np.quantile(e, 0.01)), "frac_above_0.99": float((e > 0.99).mean()),
            }
        err = {}
        for k in range(k_max):
            e = g.rel_error[..., k]
            err[str(k + 1)] = {"mean": float(e.mean()), "max": float(e.max()),
                               "per_step_mean": e.mean(0).tolist(), "per_step_max": e.max(0).tolist()}
        out: dict[str, Any] = {
            **self.settings, "n": int(g.explained.shape[0]), "num_steps": int(len(self.sigmas)),
            "sigmas": self.sigmas.tolist(), "seconds": self.seconds,
            "explained_variance": ev, "relative_reconstruction_error": err,
            "line_deviation": {"per_step_mean": g.line_dev.mean(0).tolist(),
                               "per_step_rel_mean": g.line_dev_rel.mean(0).tolist(),
                               "max_rel": float(g.line_dev_rel.max()), "mean_rel": float(g.line_dev_rel.mean())},
        }
        if g.angle is not None:
            out["angle_d_vs_x_minus_end_deg"] = {"per_step_mean": g.angle.mean(0).tolist(),
                                                 "per_step_max": g.angle.max(0).tolist(),
                                                 "mean": float(g.angle.mean()), "max": float(g.angle.max())}
        return out


def auto_batch(n: int, num_steps: int, dim: int, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Trajectories per batch so one batch's float64 trajectory data stays within `budget` bytes (~6× in use)."""
    return max(1, min(n, budget // (num_steps * dim * 8)))


def analyze(model: Any, solver: str = "heun", num_steps: int = 41, n: int = 1000, first_seed: int = 0,
            schedule: str | None = None, rho: float | None = None, batch: int | None = None,
            options: dict[str, Any] | None = None, progress: bool = False, max_k: int = MAX_K) -> AnalysisResult:
    """Sample n trajectories of a built-in model (`ModelInfo`) with per-seed noise and measure them in batches."""
    from ..noise import seeded_noise
    from ..schedules import get_schedule
    from ..solvers import get_solver, nfe, sample_with_directions

    options = dict(options or {})
    if n < 1:
        raise FewstepError("--n must be >= 1")
    default_name, default_rho = get_solver(solver, **options).recommended_schedule
    name = schedule or default_name
    sched = get_schedule(name, num_steps, model.sigma_min, model.sigma_max,
                        rho=rho if rho is not None else (default_rho if name == default_name else None))
    dim = math.prod(model.shape)
    batch = batch or auto_batch(n, num_steps, dim)
    seeds = list(range(first_seed, first_seed + n))
    start = time.perf_counter()
    parts = []
    for i in tqdm(range(0, n, batch), desc="analyze", disable=not progress, leave=False):
        noise = seeded_noise(seeds[i : i + batch], model.shape)
        # states [N, B, …] and directions [N−1, B, …]
        traj, d = sample_with_directions(model.denoiser, noise, solver, sched, **options)
        parts.append(trajectory_geometry(traj.transpose(0, 1), d.transpose(0, 1), max_k))
        del traj, d
    settings = {"model": model.name, "solver": solver, "schedule": name, "rho": rho, "options": options,
                "nfe": nfe(solver, num_steps, **options), "first_seed": first_seed, "batch": batch}
    return AnalysisResult(Geometry.concat(parts), sched.numpy(), settings, time.perf_counter() - start)


# -------------------------------------------------------------------------------------------------- reports


def _savefig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_reconstruction_error(result: AnalysisResult, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result.geometry
    steps = np.arange(g.rel_error.shape[1])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for k in range(g.rel_error.shape[2]):
        e = g.rel_error[..., k]
        floor = 1e-12
        lo, hi = np.quantile(e, 0.05, axis=0), np.quantile(e, 0.95, axis=0)
        line = ax.plot(steps, np.maximum(e.mean(0), floor), marker="o", ms=2.5, label=f"k = {k + 1}")[0]
        ax.fill_between(steps, np.maximum(lo, floor), np.maximum(hi, floor), color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("step i (0 = x_T at σ_max)")
    ax.set_ylabel("‖x_i − x̂_i‖ / ‖x_i‖")
    ax.set_title(_title(result, "PCA reconstruction error (mean, 5–95 % band)"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, Path(path))


def plot_explained_variance(result: AnalysisResult, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = result.geometry.explained
    ks = np.arange(1, ev.shape[1] + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    unexpl = np.clip(1 - ev, 1e-16, None)
    ax1.bar(ks, unexpl.mean(0), color="tab:blue", alpha=0.8, label="mean over trajectories")
    spread = [np.maximum(unexpl.mean(0) - unexpl.min(0), 0), np.maximum(unexpl.max(0) - unexpl.mean(0), 0)]
    ax1.errorbar(ks, unexpl.mean(0), yerr=spread,
                 fmt="none", ecolor="k", capsize=4, label="min–max")
    for k, v in zip(ks, ev.mean(0)):
        ax1.text(k, unexpl[:, k - 1].max() * 1.3, f"EV {v * 100:.4f} %", ha="center", va="bottom", fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylim(unexpl.min() / 3, unexpl.max() * 10)
    ax1.set_xticks(ks)
    ax1.set_xlabel("principal components k")
    ax1.set_ylabel("unexplained variance 1 − EV_k")
    ax1.legend(fontsize=8, loc="lower left")
    bins = np.logspace(np.log10(unexpl.min()), np.log10(max(unexpl.max(), unexpl.min() * 10)), 40)
    for k in range(ev.shape[1]):
        ax2.hist(unexpl[:, k], bins=bins, alpha=0.5, label=f"k = {k + 1}")
    ax2.set_xscale("log")
    ax2.set_xlabel("unexplained variance 1 − EV_k (per trajectory)")
    ax2.set_ylabel("trajectories")
    ax2.legend(fontsize=8)
    fig.suptitle(_title(result, "explained variance of each trajectory's PCA"), fontsize=9)
    fig.tight_layout()
    _savefig(fig, Path(path))


def plot_trajectories_3d(result: AnalysisResult, path: str | os.PathLike, count: int = 4) -> None:
    """A few trajectories on their own top-3 principal directions, with their shadow on the PC1–PC2 plane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result.geometry
    count = min(count, g.proj3.shape[0])
    cols = min(count, 2)
    rows = math.ceil(count / cols)
    fig = plt.figure(figsize=(5 * cols, 4.4 * rows), dpi=120)
    for j in range(count):
        p = g.proj3[j]
        ax = fig.add_subplot(rows, cols, j + 1, projection="3d")
        floor = p[:, 2].min() - 0.1 * (np.ptp(p[:, 2]) + 1e-12)
        ax.plot(p[:, 0], p[:, 1], np.full(len(p), floor), color="0.6", lw=1, ls="--", label="shadow on PC1–PC2")
        ax.plot(p[:, 0], p[:, 1], p[:, 2], color="tab:blue", lw=1.2)
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=np.arange(len(p)), cmap="viridis", s=8)
        ax.scatter(*p[0], color="tab:red", s=30, label="x_T")
        ax.scatter(*p[-1], color="k", s=30, label="result")
        ax.set_xlabel("PC1", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
        ax.set_zlabel("PC3", fontsize=8)
        ax.tick_params(labelsize=6)
        ev2 = g.explained[j, min(1, g.explained.shape[1] - 1)]
        ax.set_title(f"trajectory {j}: 2-PC explained variance {ev2 * 100:.4f} %", fontsize=8)
        if j == 0:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(_title(result, "sampling trajectories on their top-3 principal directions"), fontsize=9)
    fig.tight_layout()
    _savefig(fig, Path(path))


def plot_line_geometry(result: AnalysisResult, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result.geometry
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    steps = np.arange(g.line_dev_rel.shape[1])
    ax1.plot(steps, g.line_dev_rel.mean(0), marker="o", ms=2.5, label="mean")
    ax1.plot(steps, g.line_dev_rel.max(0), ls="--", label="max")
    ax1.set_xlabel("step i")
    ax1.set_ylabel("distance to line x_T → x_end / ‖x_T − x_end‖")
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    if g.angle is not None:
        s = np.arange(g.angle.shape[1])
        ax2.plot(s, g.angle.mean(0), marker="o", ms=2.5, label="mean")
        ax2.plot(s, g.angle.max(0), ls="--", label="max")
        ax2.set_ylabel("angle(d_i, x_i − x_end) (degrees)")
        ax2.legend(fontsize=8)
    ax2.set_xlabel("step i")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(_title(result, "deviation from the straight line, and the direction's angle"), fontsize=9)
    fig.tight_layout()
    _savefig(fig, Path(path))


def _title(result: AnalysisResult, what: str) -> str:
    s = result.settings
    return (f"{what}\n{s.get('model', '?')}, {s.get('solver', '?')}, {len(result.sigmas)} points "
            f"(NFE {s.get('nfe', '?')}), {result.geometry.explained.shape[0]} trajectories")


def write_report(result: AnalysisResult, out: str | os.PathLike) -> list[Path]:
    """summary.json, per_trajectory.npz and four PNG plots in `out` (all written atomically)."""
    out = Path(out)
    g = result.geometry
    files = [write_json(out / "summary.json", result.summary())]
    arrays = {"rel_error": g.rel_error, "explained": g.explained, "line_dev": g.line_dev,
              "line_dev_rel": g.line_dev_rel, "proj3": g.proj3, "sigmas": result.sigmas}
    if g.angle is not None:
        arrays["angle"] = g.angle

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    files.append(atomic_write(out / "per_trajectory.npz", _write))
    for name, fn in (("reconstruction_error.png", plot_reconstruction_error),
                     ("explained_variance.png", plot_explained_variance),
                     ("trajectories_3d.png", plot_trajectories_3d), ("line_geometry.png", plot_line_geometry)):
        fn(result, out / name)
        files.append(out / name)
    return files


__all__ = ["Geometry", "AnalysisResult", "analyze", "auto_batch", "directions_along", "trajectory_geometry",
           "write_report", "plot_explained_variance", "plot_line_geometry", "plot_reconstruction_error",
           "plot_trajectories_3d"]
