"""Matplotlib figures a person would rather look at than read (written atomically as PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..io import atomic_write

METRIC_LABELS = {"rmse": "RMSE to reference", "fd_digits": "FD-digits (vs training digits)", "fid": "FID"}


LEARNED_MARKERS = ("*", "D", "^", "v", "P", "X", "s", "p", "h", "<", ">")


def _is_learned(record: dict[str, Any]) -> bool:
    """AMED predictors and learned solver cards (their rows get their own markers)."""
    return bool(record.get("predictor") or record.get("learned") or record.get("card")) or \
        str(record["solver"]).startswith(("AMED", "learned"))


def _base_label(record: dict[str, Any]) -> tuple[str, bool]:
    """(solver without its AFS mark, AFS on): the colour is the solver's, the line style says AFS."""
    label = str(record["solver"])
    afs = bool(record.get("afs")) or label.endswith(" +AFS")
    return label.removesuffix(" +AFS"), afs


def _palette(n: int) -> list[Any]:
    """n distinct colours: tab20's ten saturated colours, then its ten light ones, then evenly spaced hues."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    colours = [tab20[i] for i in range(0, 20, 2)] + [tab20[i] for i in range(1, 20, 2)]
    if n > len(colours):
        hsv = matplotlib.colormaps["hsv"]
        colours += [hsv(i / (n - len(colours) + 1)) for i in range(n - len(colours))]
    return colours[:n]


def plot_error_vs_nfe(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "",
                      metric: str | Sequence[str] = "rmse") -> None:
    """Write `error_vs_nfe_figure(records, title, metric)` as a PNG (atomically)."""
    import matplotlib.pyplot as plt

    fig = error_vs_nfe_figure(records, title, metric)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)


def error_vs_nfe_figure(records: Sequence[dict[str, Any]], title: str = "",
                        metric: str | Sequence[str] = "rmse") -> Any:
    """One line per solver and AFS setting: `metric` against NFE, log scale; several metrics give side-by-side
    panels (records lacking a metric are left out of its panel). Each solver has its own colour in every panel
    (dashed: with AFS), learned rows (AMED, learned cards) distinct markers; the legend sits outside the plot.
    Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [metric] if isinstance(metric, str) else list(metric)
    bases = list(dict.fromkeys(_base_label(r)[0] for r in records))
    colour = dict(zip(bases, _palette(len(bases))))
    learned = list(dict.fromkeys(_base_label(r)[0] for r in records if _is_learned(r)))
    marker = {b: LEARNED_MARKERS[i % len(LEARNED_MARKERS)] for i, b in enumerate(learned)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics) + 2.5, 4.5), dpi=120, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        lines: dict[tuple[str, bool], list[tuple[int, float]]] = {}
        for r in records:
            if r.get(m) is not None:
                lines.setdefault(_base_label(r), []).append((r["nfe"], r[m]))
        for (base, afs), pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if afs else "-", color=colour[base],
                    marker=marker.get(base, "o"), ms=6 if base in marker else 3, lw=1.6 if base in marker else 1.1,
                    label=base + (" +AFS" if afs else ""))
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        ax.set_title(title if len(metrics) == 1 else f"{title} — {METRIC_LABELS.get(m, m)}" if title else "")
        ax.grid(True, which="both", alpha=0.3)
    legend = {}  # label → handle over every panel (a panel may lack some rows)
    for ax in axes[0]:
        legend.update({lab: h for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in legend})
    fig.tight_layout()
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper left", bbox_to_anchor=(1.0, 0.97), fontsize=7,
                   frameon=False)
    return fig
