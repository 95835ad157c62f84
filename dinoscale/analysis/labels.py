"""Label efficiency: the headline against the number of training patients, across the training-set-size axis.

A sweep with ``train_size`` (fractions, counts or k per class of the train patients) has one cell per size; each
replicate draws its own nested subsets (``dinoscale.data.splits.train_subset_patients``), so a cell's interval,
which pools its replicates (``analysis.resample``), carries the subset draw as well as test sampling. Per
(modality, dataset, probe, strategy, other grouping axes) and backbone x resolution, the cells become one curve:
x = the patients trained on (``record.N_TRAIN_PATIENTS``, averaged over the replicates), fitted with the same
saturating power law on the error as the size and resolution curves (``scaling.fit_curve``; too few points: the
points alone). The answer names the smallest size whose interval overlaps the reference's: full data (a fraction
of 1), else the largest size swept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.analysis.curves import GROUP_KEYS, Curve, axes_words
from dinoscale.analysis.resample import CellDraws
from dinoscale.analysis.scaling import describe_points, fit_curve
from dinoscale.headline import Headline

AXIS = "patients"  # the label-efficiency curve's axis name (fits.csv, the figure's file)
SIZE = record.TRAIN_SIZE_AXIS
FULL = "1"  # the fraction that is every train patient (dinoscale.data.splits.train_size_label)
_KEYS = [k for k in GROUP_KEYS if k != SIZE]


def has_sizes(cells: pd.DataFrame) -> bool:
    """Whether the cells span the training-set-size axis (more than one size stated)."""
    if SIZE not in cells or record.N_TRAIN_PATIENTS not in cells:
        return False
    return cells.loc[cells[SIZE] != record.AXIS_DEFAULTS[SIZE], SIZE].nunique() > 1


def label_curves(cd: CellDraws, seed: int = 0) -> list[Curve]:
    """One curve per group and backbone x resolution over the sizes (x: training patients, ascending)."""
    cells = cd.cells
    if not has_sizes(cells):
        return []
    cells = cells[(cells[SIZE] != record.AXIS_DEFAULTS[SIZE]) & cells[record.N_TRAIN_PATIENTS].notna()]
    out = []
    for key, g in cells.groupby([*_KEYS, "backbone", "resolution"], sort=True, dropna=False):
        if g[SIZE].nunique() < 2:
            continue
        group = {**dict(zip(_KEYS, key)), SIZE: record.AXIS_DEFAULTS[SIZE]}  # the curve runs across the sizes
        g = g.sort_values(record.N_TRAIN_PATIENTS)
        x = g[record.N_TRAIN_PATIENTS].to_numpy(float)
        if len(np.unique(x)) < len(x):  # sizes that kept the same patients: the smallest size speaks for them
            g = g.drop_duplicates(record.N_TRAIN_PATIENTS, keep="first")
            x = g[record.N_TRAIN_PATIENTS].to_numpy(float)
        metric, low, high = (g[c].to_numpy(float) for c in ("metric", "low", "high"))
        draws = cd.columns(g.index.to_numpy())
        at = f"{g['backbone'].iloc[0]}@{g['resolution'].iloc[0]:g}px"
        if np.isnan(draws).all(axis=0).any():
            fit = describe_points(x, metric, AXIS, goal=cd.headline.goal)
        else:
            fit = fit_curve(x, metric, draws, AXIS, level=cd.level, seed=seed, goal=cd.headline.goal)
        out.append(Curve(group, AXIS, at, x, metric, low, high, list(g[SIZE].astype(str)), fit))
    return out


def _size_words(label: str) -> str:
    """'0.1 of the train patients', '20 train patients', '5 train patients per class'."""
    if label.endswith("shot"):
        return f"{label[:-4]} train patients per class ({label})"
    if label.endswith("pt"):
        return f"{label[:-2]} train patients"
    return "every train patient (full data)" if label == FULL else f"{label} of the train patients"


def _value(m: float, lo: float, hi: float) -> str:
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else f"{m:.3f} (no interval)"


def label_answer(c: Curve, h: Headline, level: float) -> str:
    """The smallest size whose interval overlaps the reference's (full data, else the largest size)."""
    ref = len(c.x) - 1
    full = c.point_labels[ref] == FULL
    ref_words = "full data" if full else f"the largest size swept ({c.point_labels[ref]})"
    where = f"{c.at}, {c.group['probe']} probe, {c.group['strategy']}{axes_words(c.group)}"
    known = np.isfinite(c.low).all() and np.isfinite(c.high).all()
    if not known:
        return f"Label efficiency ({where}): no intervals for every size, so no size can be said to match {ref_words}"
    match = next(i for i in range(len(c.x)) if c.low[i] <= c.high[ref] and c.high[i] >= c.low[ref])
    pct = f"{round(level * 100)}%"
    ref_value = f"{_value(c.metric[ref], c.low[ref], c.high[ref])} with {c.x[ref]:.0f} patients"
    if match == ref:
        return (
            f"Label efficiency ({where}): no smaller training set matches {ref_words}: every smaller size's {pct} "
            f"interval lies apart from {h.label} {ref_value}"
        )
    return (
        f"Label efficiency ({where}): the smallest training set that matches {ref_words} ({pct} intervals overlap) "
        f"is {_size_words(c.point_labels[match])}: {c.x[match]:.0f} patients, {h.label} "
        f"{_value(c.metric[match], c.low[match], c.high[match])}, against {ref_value} (intervals pool the "
        "replicates, each drawing its own subsets)"
    )


def label_lines(curves: list[Curve], h: Headline, level: float) -> list[tuple[int, str]]:
    """The answer's label-efficiency lines (level 0), each with its curve's fit verdict (level 1)."""
    out = []
    for c in curves:
        if c.axis != AXIS:
            continue
        out.append((0, label_answer(c, h, level)))
        out.append((1, f"{h.label} against training patients ({', '.join(c.point_labels)}): {c.fit.verdict}"))
    return out
