"""PNG figures: small multiples per modality (one panel per dataset x every grouping axis of the record:
probe, strategy and any axis added to ``record.AXES``), every point with its interval, every fitted curve
with its bootstrap band."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.analysis.curves import AXIS_LABELS, Curve, axes_words, fitted_error
from dinoscale.headline import AUROC, Headline


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or cluster nodes
    import matplotlib.pyplot as plt

    return plt


# one curve panel per dataset x grouping axis (a modality's figure holds its datasets); one heatmap panel per
# grouping axis (a heatmap is drawn per modality x dataset): two values of any recorded axis never share a panel
CURVE_PANEL_KEYS = (record.DATASET_PARAM, *record.GROUP_AXES)
HEATMAP_PANEL_KEYS = record.GROUP_AXES


def panel_title(keys: dict) -> str:
    """``probe: linear | frozen`` (the dataset first where it is a key; ``| axis: value`` for any further axis)."""
    head = [str(keys[record.DATASET_PARAM])] if record.DATASET_PARAM in keys else []
    return " | ".join([*head, f"probe: {keys['probe']}", str(keys["strategy"])]) + axes_words(keys, " | ")


def curve_panels(curves: list[Curve]) -> list[tuple[dict, list[Curve]]]:
    """The panels of one axis' figure: its curves grouped by dataset and every grouping axis, in order."""
    panels: dict[tuple, list[Curve]] = {}
    for c in curves:
        panels.setdefault(tuple(str(c.group[k]) for k in CURVE_PANEL_KEYS), []).append(c)
    return [(dict(zip(CURVE_PANEL_KEYS, key)), cs) for key, cs in sorted(panels.items())]


def heatmap_panels(cells: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """One dataset's heatmap panels: its cells grouped by every grouping axis (a cell per size x resolution each)."""
    keys = [k for k in HEATMAP_PANEL_KEYS if k in cells.columns]
    return [(dict(zip(keys, key)), g) for key, g in cells.groupby(keys, sort=True, dropna=False)]


def _panel(ax, curves: list[Curve]) -> None:
    from matplotlib.ticker import NullFormatter

    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        known = np.isfinite(c.low).all() and np.isfinite(c.high).all()
        yerr = np.clip(np.vstack([c.metric - c.low, c.high - c.metric]), 0, None) if known else None
        label = c.at if known else f"{c.at} (no intervals)"
        ax.errorbar(
            c.x, c.metric, yerr=yerr, fmt="o-" if known else "o--", color=color, capsize=3, ms=4, lw=0.8, label=label
        )
        if known:
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
    if not any(len(c.x) > 1 for c in curves):  # single points on every curve: nothing to see on this axis
        return None
    panels = curve_panels(curves)
    n = len(panels)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.9 * rows + 0.6), squeeze=False, sharey=True)
    for ax, (keys, cs) in zip(axes.flat, panels):
        _panel(ax, cs)
        ax.set_title(panel_title(keys), fontsize=9)
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
    labels = [
        f"{r['other']} - {r['baseline']} | {r['probe']}{axes_words(r, ' | ')} | {r['backbone']}@{r['resolution']}"
        for _, r in comparisons.iterrows()
    ]
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


def _resolution_label(r) -> str:
    return "not stated" if pd.isna(r) else f"{r:g}"


def _size_label(backbone: str, n_params: float) -> str:
    return f"{backbone}\n{n_params / 1e6:.2f}M" if np.isfinite(n_params) else f"{backbone}\nsize not stated"


def _row_key(backbone: str, n_params: float) -> tuple[str, str]:
    return (str(backbone), f"{n_params:.6g}")


def _interval_text(m: float, lo: float, hi: float) -> str:
    return f"{m:.3f}\n[{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else f"{m:.3f}\nno interval"


def plot_heatmap(
    cells: pd.DataFrame,
    path: Path,
    title: str,
    provenance: str,
    headline: Headline = AUROC,
    best=None,
    cheapest=None,
) -> Path | None:
    """The headline (and its interval) over model size x resolution, one panel per value of the grouping axes
    (probe | strategy | any axis added to the record: ``heatmap_panels``), one colour scale for all (brighter is better, whatever the goal); ``best`` (a cell index) boxed in red,
    ``cheapest`` (the cheapest cell as good) in dashed red.
    None when every panel would hold a single cell."""
    panels = heatmap_panels(cells)
    if all(len(g) < 2 for _, g in panels):
        return None
    sizes = cells.assign(_size=[_row_key(b, n) for b, n in zip(cells["backbone"], cells["n_params"])])
    sizes = sizes.drop_duplicates("_size").sort_values(["n_params", "backbone"], na_position="last")
    rows = list(sizes["_size"])
    res_known = sorted(cells["resolution"].dropna().unique())
    columns = res_known + ([np.nan] if cells["resolution"].isna().any() else [])
    n = len(panels)
    ncols = min(n, 2)
    nrows = int(np.ceil(n / ncols))
    plt = _pyplot()
    width = max(4.8, 1.35 * len(columns) + 2.4)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(width * ncols + 1.0, (0.7 * len(rows) + 1.4) * nrows + 1.3),
        squeeze=False,
        constrained_layout=True,
    )
    values = cells["metric"].to_numpy(float)
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    cmap = plt.get_cmap("viridis" if headline.goal == "max" else "viridis_r")
    image = None
    for ax, (keys, g) in zip(axes.flat, panels):
        grid = np.full((len(rows), len(columns)), np.nan)
        for idx, r in g.iterrows():
            i = rows.index(_row_key(r["backbone"], r["n_params"]))
            j = len(columns) - 1 if pd.isna(r["resolution"]) else res_known.index(r["resolution"])
            grid[i, j] = r["metric"]
            shade = cmap((r["metric"] - vmin) / (vmax - vmin))
            dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.55
            ax.text(
                j,
                i,
                _interval_text(r["metric"], r["low"], r["high"]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
            if best is not None and idx == best:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5))
            elif cheapest is not None and idx == cheapest:
                ax.add_patch(
                    plt.Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="red", lw=1.8, ls="--")
                )
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(columns)), [_resolution_label(c) for c in columns], fontsize=8)
        ax.set_yticks(
            range(len(rows)), [_size_label(b, n) for b, n in zip(sizes["backbone"], sizes["n_params"])], fontsize=7
        )
        ax.set_xlabel("input resolution (px)", fontsize=8)
        ax.set_title(panel_title(keys), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85, label=headline.label)
    legend = "cell: value [95% CI]" + ("; red box: the best configuration" if best is not None else "")
    if cheapest is not None and cheapest != best:
        legend += "; dashed box: the cheapest whose interval overlaps the best's"
    fig.suptitle("\n".join(textwrap.fill(line, 70 * ncols) for line in [title, provenance, legend]), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


KEYED_POINTS = 48  # up to this many points, each is numbered on the plot and named in a key beside it


def _identify_points(fig, ax, cells: pd.DataFrame, cost: pd.Series, frontier: list) -> list[str]:
    """Every point can be told from the plot alone: numbered (frontier points in bold) with a key to the right
    naming its configuration; above ``KEYED_POINTS`` only the frontier's points are named, on the plot."""
    placed = [i for i in cells.index if pd.notna(cost.get(i))]
    on_front = set(frontier)
    if len(placed) > KEYED_POINTS:
        for i in frontier:
            r = cells.loc[i]
            label = f"{r['backbone']}@{_resolution_label(r['resolution'])}"
            ax.annotate(label, (cost[i], r["metric"]), textcoords="offset points", xytext=(4, 6), fontsize=7)
        return []
    order = sorted(placed, key=lambda i: (cost[i], -cells.loc[i, "metric"]))
    key = []
    for n, i in enumerate(order, 1):
        r = cells.loc[i]
        weight = "bold" if i in on_front else "normal"
        ax.annotate(
            str(n), (cost[i], r["metric"]), textcoords="offset points", xytext=(3, 3), fontsize=6, weight=weight
        )
        extra = axes_words(r)
        key.append(
            f"{n}{'*' if i in on_front else ' '} {r['backbone']}@{_resolution_label(r['resolution'])} "
            f"{r['probe']}|{r['strategy']}{extra}"
        )
    fig.text(1.01, 0.5, "\n".join(["* on the frontier", *key]), fontsize=5.5, family="monospace", va="center")
    return key


def plot_frontier(
    cells: pd.DataFrame,
    cost: pd.Series,
    frontier: list,
    path: Path,
    title: str,
    provenance: str,
    headline: Headline = AUROC,
    cost_label: str = "forward GFLOPs per image",
) -> Path | None:
    """Every cell's headline (with interval) against its compute, coloured by probe | strategy, and the
    frontier of configurations better than every cheaper one. None with fewer than two cells to place."""
    if cost.notna().sum() < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.2), constrained_layout=True)
    for k, ((probe, strategy), g) in enumerate(cells.groupby(["probe", "strategy"], sort=True)):
        g = g[cost[g.index].notna()]
        if g.empty:
            continue
        known = np.isfinite(g["low"]) & np.isfinite(g["high"])
        yerr = np.clip(np.vstack([g["metric"] - g["low"], g["high"] - g["metric"]]), 0, None)
        yerr[:, ~known.to_numpy()] = 0
        ax.errorbar(
            cost[g.index],
            g["metric"],
            yerr=yerr,
            fmt="o",
            color=f"C{k % 10}",
            capsize=2,
            ms=5,
            lw=0.8,
            alpha=0.85,
            label=f"{probe} | {strategy}",
        )
    if frontier:
        ax.step(cost[frontier], cells.loc[frontier, "metric"], where="post", color="black", lw=1.3, label="frontier")
    _identify_points(fig, ax, cells, cost, frontier)
    ax.set_xscale("log")
    ax.set_xlabel(cost_label)
    ax.set_ylabel(headline.label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    legend = "bars: 95% CI; black steps: the best value reachable at each cost (" + (
        "higher is better)" if headline.goal == "max" else "lower is better)"
    )
    ax.set_title("\n".join(textwrap.fill(line, 100) for line in [title, provenance, legend]), fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # the key beside the axes included
    plt.close(fig)
    return path
