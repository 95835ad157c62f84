"""PNG figures: small multiples per modality (one panel per dataset x probe x strategy), every point
with its interval, every fitted curve with its bootstrap band."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.analysis.curves import AXIS_LABELS, Curve, fitted_error
from dinoscale.headline import AUROC, Headline


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, curves: list[Curve]) -> None:
    from matplotlib.ticker import NullFormatter

    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        yerr = np.vstack([c.metric - c.low, c.high - c.metric])
        ax.errorbar(
            c.x, c.metric, yerr=np.clip(yerr, 0, None), fmt="o-", color=color, capsize=3, ms=4, lw=0.8, label=c.at
        )
        ax.fill_between(c.x, c.low, c.high, color=color, alpha=0.12, lw=0)  # the measured points' band
        f = c.fit
        if f.band is not None and f.trend != "peaks":  # a saturating law cannot draw a peak
            ax.plot(f.band["x"], f.band["metric"], "--", color=color, lw=1.4)
            ax.plot(f.band["x"], f.band["low"], ":", color=color, lw=0.9)
            ax.plot(f.band["x"], f.band["high"], ":", color=color, lw=0.9)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on ranges under a decade
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="best")


def plot_axis(
    curves: list[Curve], axis: str, path: Path, title: str, provenance: str, headline: Headline = AUROC
) -> Path | None:
    """One figure for one modality and axis (y: the headline); None when there is nothing on that axis."""
    curves = [c for c in curves if c.axis == axis]
    if not curves:
        return None
    panels: dict[tuple, list[Curve]] = {}
    for c in curves:
        panels.setdefault((c.group["dataset"], c.group["probe"], c.group["strategy"]), []).append(c)
    n = len(panels)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.9 * rows + 0.6), squeeze=False, sharey=True)
    for ax, ((dataset, probe, strategy), cs) in zip(axes.flat, sorted(panels.items())):
        _panel(ax, cs)
        ax.set_title(f"{dataset} | probe: {probe} | {strategy}", fontsize=9)
        ax.set_xlabel(AXIS_LABELS[axis], fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(headline.label, fontsize=8)
    notes = sorted({note for c in curves for note in c.notes if "GFLOPs" in note})
    legend = (
        f"shaded: measured 95% bootstrap CI; dashed: saturating power law fit on E = {fitted_error(headline)}, "
        "dotted: its 95% CI"
    )
    width = 60 * cols  # characters that fit across the figure at this font size
    head = [textwrap.fill(line, width) for line in [title, provenance, *notes, legend]]
    fig.suptitle("\n".join(head), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_strategies(comparisons: pd.DataFrame, path: Path, title: str, headline: Headline = AUROC) -> Path | None:
    """Forest plot of strategy differences; None when only one strategy was run."""
    if comparisons.empty:
        return None
    plt = _pyplot()
    labels = [f"{r.other} - {r.baseline} | {r.probe} | {r.backbone}@{r.resolution}" for r in comparisons.itertuples()]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
    y = np.arange(len(labels))
    d = comparisons["delta"].to_numpy()
    err = np.vstack([d - comparisons["delta_low"], comparisons["delta_high"] - d])
    ax.errorbar(d, y, xerr=np.clip(err, 0, None), fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    better = "right" if headline.goal == "max" else "left"
    ax.set_xlabel(f"difference in {headline.test} (95% CI; other better to the {better} of 0)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
