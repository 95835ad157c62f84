"""Which curves a sweep holds, and their fits.

Per (modality, dataset, probe, strategy): the headline's error (1 - metric for a higher-is-better
headline, the metric itself for a lower-is-better one: ``scaling.to_error``) against parameters
(one curve per encoder family and resolution: a RAD-DINO ViT-B is never a point on DINOv3's size curve),
against input resolution (one per backbone; tokens grow as resolution squared) and against forward
GFLOPs per image (all cells pooled: the compute frontier across families). GFLOPs are taken as logged; where a run did not log them they
are estimated as 2 x params x tokens (and the report says so); with neither, the cell is left out of
that axis. A cell whose size or resolution a table does not state is left out of that axis only; a
curve with a point of unknown uncertainty (no interval) is described by its points alone
(``scaling.describe_points``), never fitted with invented confidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.analysis.resample import CellDraws
from dinoscale.analysis.scaling import NOT_IDENTIFIED, ScalingFit, describe_points, fit_curve
from dinoscale.analysis.sources import NOT_STATED
from dinoscale.headline import AUROC, Headline
from dinoscale.models.families import family_of

GROUP_KEYS = [*record.CONTEXT_COLUMNS, *record.GROUP_AXES]  # modality, dataset, probe, strategy (+ new axes)
# grouping axes that the fixed wording ("<backbone>@<res>, <probe> probe, <strategy>") does not name: said as "axis: value"
EXTRA_AXES = tuple(a for a in record.GROUP_AXES if a not in ("probe", "strategy"))


def stated_axes(r) -> list[str]:
    """The grouping axes beyond probe and strategy a cell (a row or a dict) states: an optional axis at its
    default (a sweep without it) goes unsaid."""
    return [a for a in EXTRA_AXES if a in r and r[a] != record.AXIS_DEFAULTS.get(a)]


def axes_words(r, sep: str = ", ") -> str:
    """``, tokens: cls`` for a cell (a row or a dict) on a grouping axis beyond probe and strategy ('' for none)."""
    return "".join(f"{sep}{a}: {r[a]}" for a in stated_axes(r))


AXES = {  # axis -> (x column, the column(s) each curve holds fixed, or None when all cells pool)
    "params": ("n_params", (record.FAMILY_PARAM, "resolution")),
    "resolution": ("resolution", "backbone"),
    "gflops": ("gflops", None),
}
AXIS_LABELS = {
    "params": "parameters",
    "resolution": "input resolution (px)",
    "gflops": "forward GFLOPs per image",
    "patients": "training patients (one point per training-set size)",
}


@dataclass
class Curve:
    group: dict
    axis: str
    at: str
    x: np.ndarray
    metric: np.ndarray
    low: np.ndarray
    high: np.ndarray
    point_labels: list[str]
    fit: ScalingFit
    notes: list[str] = field(default_factory=list)


def gflops_column(cells: pd.DataFrame) -> tuple[pd.Series, str | None]:
    """Per cell: logged GFLOPs, else the 2 x params x tokens estimate, else NaN (never invented)."""
    logged = pd.to_numeric(cells[record.GFLOPS], errors="coerce")
    estimate = (
        2
        * pd.to_numeric(cells["n_params"], errors="coerce")
        * pd.to_numeric(cells[record.TOKENS_PER_IMAGE], errors="coerce")
        / 1e9
    )
    out = logged.where(logged.notna(), estimate)
    estimated = int((logged.isna() & estimate.notna()).sum())
    if out.notna().sum() == 0:
        return out, None
    if estimated == 0:
        return out, "GFLOPs as logged by the runs"
    if logged.notna().sum() == 0:
        return out, "GFLOPs estimated as 2 x params x tokens per image (not measured)"
    return out, f"GFLOPs as logged; estimated as 2 x params x tokens per image for {estimated} cell(s) (not measured)"


def family_column(cells: pd.DataFrame) -> pd.Series:
    """Each cell's encoder family: as recorded where a run logged it, else from its backbone's name
    (``dinoscale.models.families.family_of``; '' where no family is known)."""
    derived = cells["backbone"].astype(str).map(family_of)
    if record.FAMILY_PARAM in cells:
        return cells[record.FAMILY_PARAM].where(cells[record.FAMILY_PARAM].notna(), derived).astype(str)
    return derived


def _slices(sub: pd.DataFrame, fixed) -> list[tuple[str, pd.DataFrame]]:
    """The cells of each curve along an axis, and the words for what the curve holds fixed. The size axis holds
    the family and the resolution; the family is named only where the group has more than one."""
    if fixed is None:
        return [("all backbones x resolutions", sub)]
    if isinstance(fixed, str):
        fixed = (fixed,)
    cols = list(fixed)
    named = [c for c in cols if c != record.FAMILY_PARAM or sub[record.FAMILY_PARAM].nunique() > 1]
    out = []
    for values, s in sub.groupby(cols, sort=True, dropna=False):
        value = dict(zip(cols, values if isinstance(values, tuple) else (values,)))
        words = [f"{c}={_res(value[c]) if c == 'resolution' else value[c]}" for c in named if c != record.FAMILY_PARAM]
        at = ", ".join(words) or "all"
        if record.FAMILY_PARAM in named:
            at += f" ({value[record.FAMILY_PARAM] or 'family not stated'})"
        out.append((at, s))
    return out


def _merge_equal_x(x: np.ndarray, index: np.ndarray) -> list[tuple[float, np.ndarray]]:
    return [(float(v), index[x == v]) for v in np.unique(x)]


def _curve(cd: CellDraws, sub: pd.DataFrame, x_col: str, axis: str, at: str, group: dict, seed: int) -> Curve:
    merged = _merge_equal_x(sub[x_col].to_numpy(float), sub.index.to_numpy())
    draws = np.column_stack([cd.draws[:, idx].mean(axis=1) for _, idx in merged])
    metric = np.array([cd.cells.loc[idx, "metric"].mean() for _, idx in merged])
    labels = [
        " + ".join(f"{b}@{_res(r)}" for b, r in cd.cells.loc[idx, ["backbone", "resolution"]].itertuples(index=False))
        for _, idx in merged
    ]
    notes = ["cells sharing an x were averaged"] if any(len(idx) > 1 for _, idx in merged) else []
    x = np.array([v for v, _ in merged])
    if np.isnan(draws).all(axis=0).any():  # a point of unknown uncertainty: the points alone speak
        fit = describe_points(x, metric, axis, goal=cd.headline.goal)
        nan = np.full(len(x), np.nan)
        return Curve(group, axis, at, x, metric, nan, nan.copy(), labels, fit, notes)
    q = (1 - cd.level) / 2
    low, high = np.nanquantile(draws, q, axis=0), np.nanquantile(draws, 1 - q, axis=0)
    fit = fit_curve(x, metric, draws, axis, level=cd.level, seed=seed, goal=cd.headline.goal)
    return Curve(group, axis, at, x, metric, low, high, labels, fit, notes)


def _res(r) -> str:
    return NOT_STATED if pd.isna(r) else f"{r:g}"


def build_curves(cd: CellDraws, seed: int = 0) -> tuple[list[Curve], list[str]]:
    """The curves of every group and axis, and notes on the cells each axis had to leave out."""
    cells = cd.cells.copy()
    cells[record.FAMILY_PARAM] = family_column(cells)
    curves, notes = [], []
    for gkey, g in cells.groupby(GROUP_KEYS, sort=True):
        group = dict(zip(GROUP_KEYS, gkey))
        for axis, (x_col, fixed) in AXES.items():
            sub = g.copy()
            note = None
            if axis == "gflops":
                sub["gflops"], note = gflops_column(sub)
                if note is None:
                    continue
            known = sub[x_col].notna()
            if not known.all() and axis == "gflops":
                notes.append(
                    f"{_group_name(group)}: {int((~known).sum())} cell(s) with neither logged GFLOPs nor tokens per "
                    "image left out of the GFLOPs axis"
                )
            sub = sub[known]
            if sub.empty:
                continue
            for at, s in _slices(sub, fixed):
                c = _curve(cd, s, x_col, axis, at, group, seed)
                if note:
                    c.notes.append(note)
                curves.append(c)
    return curves, notes


ALPHA_CI = record.ci_names("alpha")  # the fits table's interval columns
FLOOR_CI = record.ci_names("floor_error")


def _group_name(group: dict) -> str:
    return " ".join(str(group[k]) for k in GROUP_KEYS if k != record.MODALITY_PARAM)


def fitted_error(headline: Headline) -> str:
    """What the law's E is, in the headline's MLflow name: ``1 - test_dice`` or ``test_voi``."""
    return f"1 - {headline.test}" if headline.goal == "max" else headline.test


def fits_table(curves: list[Curve], headline: Headline = AUROC) -> pd.DataFrame:
    return pd.DataFrame([_fit_row(c, headline) for c in curves])


def _identified(value, identified: bool):
    """A fitted value, or the words NOT_IDENTIFIED where the fit left it at an optimiser bound (None: no fit)."""
    return value if value is None or identified else NOT_IDENTIFIED


def _fit_row(c: Curve, headline: Headline = AUROC) -> dict:
    f = c.fit
    row = {
        **c.group,
        "axis": c.axis,
        "at": c.at,
        "n_points": f.n_points,
        "trend": f.trend,
        "verdict": f.verdict,
        "family": "saturating power law" if f.fitted else None,
        "error": fitted_error(headline),
        # a parameter at its optimiser bound is "not identified", not a number (``ScalingFit.alpha_identified``)
        "alpha": _identified(f.alpha, f.alpha_identified),
        ALPHA_CI[0]: _identified(f.alpha_low, f.alpha_identified),
        ALPHA_CI[1]: _identified(f.alpha_high, f.alpha_identified),
        "exponent_identified": f.exponent_identified,
        "amplitude": _identified(f.amplitude, f.alpha_identified),
        "floor_error": _identified(f.floor, f.floor_identified),
        FLOOR_CI[0]: _identified(f.floor_low, f.floor_identified),
        FLOOR_CI[1]: _identified(f.floor_high, f.floor_identified),
        "resamples_fitted": f.resamples_fitted,
    }
    b = f.broken
    row.update(
        {
            "broken_break_x": b and b.break_x,
            "broken_alpha_before": b and b.alpha_before,
            "broken_alpha_after": b and b.alpha_after,
            "broken_delta_aicc": b and b.delta_aicc,
        }
    )
    e = f.extrapolation
    row.update(
        {
            "lolo_x": e and e.x,
            "lolo_predicted": e and e.predicted,
            "lolo_predicted_low": e and e.predicted_low,
            "lolo_predicted_high": e and e.predicted_high,
            "lolo_observed": e and e.observed,
            "lolo_consistent": e and e.consistent,
        }
    )
    row["notes"] = "; ".join(c.notes + f.notes)
    return row
