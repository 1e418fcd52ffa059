"""Matplotlib figures a person would rather look at than read (written atomically as PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..io import atomic_write


def plot_error_vs_nfe(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "",
                      metric: str = "rmse") -> None:
    """One line per solver: `metric` against NFE, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        lines.setdefault(r["solver"], []).append((r["nfe"], r[metric]))
    for i, (name, pts) in enumerate(lines.items()):
        pts.sort()
        style = "-" if i < 10 else "--"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("RMSE to reference" if metric == "rmse" else metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
