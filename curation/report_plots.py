"""The report's plots: matplotlib figures (Agg, no display) returned as PNG data URIs, so the page
holds them and needs no network or files beside it."""
from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 100
KEPT, POOL, CUT = "#1f77b4", "#b0b0b0", "#d62728"
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False})


def _uri(fig, tight: bool = True) -> str:
    """The figure as a PNG data URI. `tight`: crop to what is drawn (it lays the figure out twice:
    the grid of histograms places its panels itself instead)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bars(items: list[tuple[str, float]], title: str, xlabel: str = "samples", width: float = 4.6) -> str:
    """Horizontal bars, the first item on top, each labelled with its value."""
    labels, values = [str(k) for k, _ in items], [v for _, v in items]
    fig, ax = plt.subplots(figsize=(width, 0.6 + 0.24 * max(len(items), 1)))
    y = np.arange(len(items))
    ax.barh(y, values, color=KEPT)
    ax.set_yticks(y, [lab if len(lab) <= 32 else lab[:31] + "…" for lab in labels])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_title(title, loc="left")
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:,.0f}", va="center", fontsize=8)
    ax.margins(x=0.15)
    return _uri(fig)


def coverage(counts: dict[str, int], classes: list[str] | None, title: str) -> str:
    """Samples per pseudo-class of a selection (vertical bars, one per class, zero ones too)."""
    keys = sorted(counts, key=lambda k: (not k.lstrip("-").isdigit(), int(k) if k.lstrip("-").isdigit() else 0, k))
    names = [classes[int(k)] if classes and k.isdigit() and int(k) < len(classes) else k for k in keys]
    fig, ax = plt.subplots(figsize=(min(9.0, 1.5 + 0.4 * len(keys)), 2.6))
    x = np.arange(len(keys))
    values = [counts[k] for k in keys]
    ax.bar(x, values, color=KEPT)
    ax.set_xticks(x, [n if len(n) <= 12 else n[:11] + "…" for n in names], rotation=45 if len(keys) > 12 else 0,
                  ha="right" if len(keys) > 12 else "center")
    ax.set_ylabel("samples")
    ax.set_title(title, loc="left")
    for xi, v in zip(x, values):
        ax.text(xi, v, f"{v}", ha="center", va="bottom", fontsize=7)
    return _uri(fig)


def score_histograms(pool: dict[str, np.ndarray], kept: dict[str, np.ndarray], cuts: dict[str, float],
                     title: str) -> str:
    """One panel per score: the pool's histogram, the selection's on the same bins, and the cut
    (the lowest kept value of the score the policy ranks by) as a vertical line."""
    names = list(pool)
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.1 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = pool[name][np.isfinite(pool[name])]
        bins = np.histogram_bin_edges(values, bins=40) if len(values) else 10
        ax.hist(values, bins=bins, color=POOL, label="pool")
        chosen = kept.get(name)
        if chosen is not None and len(chosen):
            ax.hist(chosen[np.isfinite(chosen)], bins=bins, color=KEPT, label="kept")
        if name in cuts:
            ax.axvline(cuts[name], color=CUT, lw=1.2, ls="--", label=f"cut {cuts[name]:.3g}")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.set_title(name, loc="left")
        ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, x=0.01, y=1 - 0.12 / rows, ha="left")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.1 / rows * 2, top=1 - 0.5 / rows, hspace=0.55, wspace=0.22)
    return _uri(fig, tight=False)


def roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], aurocs: dict[str, float], title: str) -> str:
    """ROC curves, the best scores first in the legend."""
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for name in sorted(curves, key=lambda n: -aurocs.get(n, 0))[:10]:
        fpr, tpr = curves[name]
        ax.plot(fpr, tpr, lw=1.3, label=f"{name} ({aurocs[name]:.3f})")
    ax.plot([0, 1], [0, 1], color=POOL, lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, loc="left")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _uri(fig)


def lines(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str,
          ylim: tuple[float, float] | None = None) -> str:
    """One line per named series of (x, y)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, lw=1.3, marker="o" if len(x) <= 30 else None, ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, loc="left")
    if series:
        ax.legend(fontsize=7, frameon=False)
    return _uri(fig)
