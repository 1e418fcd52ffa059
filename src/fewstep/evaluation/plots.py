"""Matplotlib figures a person would rather look at than read (written atomically as PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..io import atomic_write

METRIC_LABELS = {"rmse": "RMSE to reference", "fd_digits": "FD-digits (vs training digits)", "fid": "FID"}


def plot_error_vs_nfe(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "",
                      metric: str | Sequence[str] = "rmse") -> None:
    """One line per solver: `metric` against NFE, log scale; several metrics give side-by-side panels
    (records lacking a metric are left out of its panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [metric] if isinstance(metric, str) else list(metric)
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.5), dpi=120, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            if r.get(m) is not None:
                lines.setdefault(r["solver"], []).append((r["nfe"], r[m]))
        for i, (name, pts) in enumerate(lines.items()):
            pts.sort()
            style = "-" if i < 10 else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        ax.set_title(title if len(metrics) == 1 else f"{title} — {METRIC_LABELS.get(m, m)}" if title else "")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
