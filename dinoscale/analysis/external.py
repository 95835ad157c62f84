"""External test sets in the report: internal and external side by side per cell, with the drop.

Each frozen cell's run logs one metric family per external set (``record.external_name``): the macro AUROC on
the external set over the internal classes it maps onto, the internal test macro AUROC over the same classes,
and the drop (internal - external) with an interval from independent patient resamples of both sets
(``dinoscale.sweep.external``). A cell's replicates are averaged here (values and bounds alike; the count is
in ``seeds``). The answer names, per external set, the drop of the report's best cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dinoscale import record

_KEYS = [k for k in record.CELL_KEYS]
SET = "external"  # the external set's label column of external.csv
_PARTS = {
    record.EXTERNAL_INTERNAL: "internal",
    record.EXTERNAL_METRIC: SET,
    record.EXTERNAL_DROP: "drop",
}
_COUNTS = (record.EXTERNAL_PATIENTS, record.EXTERNAL_CLASSES)


def external_columns(columns) -> list[str]:
    """The external metrics of a results table (``external.<label>.*``)."""
    return [c for c in columns if record.parse_external_name(str(c))]


def external_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell and external set: internal, external and drop with their bounds (replicates averaged)."""
    cols = external_columns(runs.columns)
    if not cols:
        return pd.DataFrame()
    labels = sorted({record.parse_external_name(c)[0] for c in cols})
    keys = [k for k in _KEYS if k in runs.columns]
    rows = []
    for label in labels:
        part = runs[keys].copy()
        part.insert(0, SET + "_set", label)
        for metric, short in _PARTS.items():
            name = record.external_name(label, metric)
            for col, suffix in zip((name, *record.ci_names(name)), ("", "_low", "_high")):
                part[short + suffix] = pd.to_numeric(runs.get(col), errors="coerce")
        for metric in _COUNTS:
            part[metric] = pd.to_numeric(runs.get(record.external_name(label, metric)), errors="coerce")
        part["seeds"] = 1
        rows.append(part[part[record.EXTERNAL_PATIENTS].notna()])  # scored, comparable or not
    both = pd.concat(rows, ignore_index=True)
    values = [c for c in both.columns if c not in keys and c not in (SET + "_set", "seeds")]
    agg = {**{c: "mean" for c in values}, "seeds": "sum"}
    return both.groupby([SET + "_set", *keys], sort=True, dropna=False).agg(agg).reset_index()


def _value(v: float, lo: float, hi: float) -> str:
    if not np.isfinite(v):
        return "undefined"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else f"{v:.3f} (no interval)"


def _drop_words(r) -> str:
    if not np.isfinite(r.drop):
        return "cannot be compared (no mapped class with both kinds of patient in both sets)"
    if not (np.isfinite(r.drop_low) and np.isfinite(r.drop_high)):
        return f"drops by {r.drop:.3f} (no interval: too few patients)"
    sure = "" if r.drop_low > 0 or r.drop_high < 0 else "; the interval includes no change"
    gain = " (negative: better on the external set)" if r.drop_high < 0 else ""
    return f"drops by {r.drop:.3f} [{r.drop_low:.3f}, {r.drop_high:.3f}]{gain}{sure}"


def external_lines(table: pd.DataFrame, best: pd.DataFrame, label: str) -> list[tuple[int, str]]:
    """The answer's line per external set: the best cell's drop (level 0), internal and external (level 1)."""
    if table.empty:
        return []
    out = []
    keys = ["backbone", "resolution", "probe", "strategy"]
    for b in best.itertuples():
        mine = table[(table[record.DATASET_PARAM] == b.dataset) & (table[record.MODALITY_PARAM] == b.modality)]
        for k in keys:
            mine = mine[mine[k] == getattr(b, k)]
        for r in mine.itertuples():
            n = int(getattr(r, record.EXTERNAL_CLASSES)) if np.isfinite(getattr(r, record.EXTERNAL_CLASSES)) else 0
            where = f"{b.backbone}@{b.resolution:g}px, {b.probe} probe, {b.strategy}"
            out.append(
                (
                    0,
                    f"on {getattr(r, SET + '_set')} (external, {n} class{'es' if n != 1 else ''} mapped) the best cell "
                    f"({where}) {_drop_words(r)}",
                )
            )
            patients = getattr(r, record.EXTERNAL_PATIENTS)
            out.append(
                (
                    1,
                    f"{label} on the mapped classes: internal test {_value(r.internal, r.internal_low, r.internal_high)}"
                    f", external {_value(r.external, r.external_low, r.external_high)} ({patients:.0f} patients); "
                    "the drop is internal minus external, its interval from independent patient resamples of both sets",
                )
            )
    return out


def external_markdown(table: pd.DataFrame) -> list[str]:
    """The report's section: one row per cell and external set."""
    if table.empty:
        return []
    md = [
        "## External test sets",
        "",
        "Each cell's probe (fitted on its train, chosen on val) scores every external set; macro AUROC over the "
        "internal classes each set maps onto, internal test on the same classes, drop = internal - external "
        "(95% intervals: patient bootstrap; the drop's from independent resamples of both sets). All columns: "
        "external.csv.",
        "",
        "| external | probe | strategy | backbone | resolution | internal [95% CI] | external [95% CI] | drop [95% CI] |",
        "|---|---|---|---|---:|---|---|---|",
    ]
    for r in table.itertuples():
        md.append(
            f"| {getattr(r, SET + '_set')} | {r.probe} | {r.strategy} | {r.backbone} | {r.resolution:g} | "
            f"{_value(r.internal, r.internal_low, r.internal_high)} | {_value(r.external, r.external_low, r.external_high)} | "
            f"{_value(r.drop, r.drop_low, r.drop_high)} |"
        )
    return md + [""]
