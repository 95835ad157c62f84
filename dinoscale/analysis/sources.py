"""Where results come from: the MLflow record of one sweep, or a results table (CSV).

Both give one row per finished run with the same columns; the metric columns are named for the
sweep's headline (``dinoscale.headline``): ``test_<name>``, ``test_<name>_ci_low``,
``test_<name>_ci_high`` and ``val_<name>`` (e.g. ``test_macro_auroc``, ``test_dice``, ``test_voi``).
``as_generic`` turns such a table into the analysis' internal, headline-independent naming:
``metric``, ``metric_ci_low``, ``metric_ci_high``, ``val_metric``.

MLflow also gives each run's per-sample test predictions (artifact ``predictions/test.csv``), which
the analysis resamples by patient: labels + scores (AUROC recomputed per resample) or, for a
per-volume headline, one value per volume in column ``<name>`` (averaged per resample).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.headline import _BY_TEST_NAME, AUROC, Headline, headline_from_tags
from dinoscale.provenance import PHANTOM, REAL, Provenance

METRIC = "metric"  # the internal name of test_<name>
GENERIC = (METRIC, *record.ci_names(METRIC))  # internal names of test_<name>, _ci_low, _ci_high
VAL = ("val_metric", *record.ci_names("val_metric"))  # and of val_<name> with its interval (where logged)
MODALITY, DATASET, WEIGHTS = record.MODALITY_PARAM, record.DATASET_PARAM, record.WEIGHTS_PARAM
AXIS_COLUMNS = list(record.AXIS_NAMES)
CELL_COLUMNS = list(record.CELL_KEYS)


def result_columns(headline: Headline = AUROC) -> list[str]:
    """Columns every results table has, for this headline."""
    return AXIS_COLUMNS + [headline.test, *record.ci_names(headline.test)]


RESULT_COLUMNS = result_columns(AUROC)  # the classification tables of before headlines existed
# optional: filled with a stated default when a table lacks them (never guessed from other columns)
OPTIONAL_COLUMNS = {
    MODALITY: "unknown",
    DATASET: "unknown",
    WEIGHTS: None,
    record.TOKENS_PER_IMAGE: None,
    record.GFLOPS: None,
    "run_id": None,
    # protocol constants the analysis applies as the trial did (dinoscale.metrics): absent -> the defaults
    record.MACRO_MIN_PATIENTS: None,
    record.MACRO_NEGATIVES: None,  # 1: the class set's negatives are read per unit (video frames)
    "min_interval_units": None,
    "selection_edge": "",  # a choice on a grid edge (record.SELECTION_EDGE), warned about in the report
    "n_val": None,  # val units the selection saw (shown next to the val metric)
    record.N_TRAIN_PATIENTS: None,  # patients trained on: the x of the label-efficiency curve
}
PREDICTIONS_ARTIFACT = record.PREDICTIONS
KNOWN_HEADLINES = tuple(_BY_TEST_NAME.values())


def short_name(h: Headline) -> str:
    """The metric in a word, for captions: AUROC, Dice, VOI, HD95..."""
    return {"macro_auroc": "AUROC", "dice": "Dice", "macro_f1": "macro F1", "accuracy": "accuracy"}.get(
        h.name, h.name.upper()
    )


def file_stem(h: Headline) -> str:
    """Plot files are ``<stem>_vs_<axis>.png``: the headline's name (``auroc`` for macro AUROC, as ever)."""
    return "auroc" if h.name == AUROC.name else h.name


def direction(h: Headline) -> str:
    return "higher is better" if h.goal == "max" else "lower is better"


def headline_sentence(h: Headline) -> str:
    """The report's line saying which metric it is about and which way is better."""
    moves = "increases" if h.goal == "max" else "decreases"
    named = h.label if direction(h) in h.label else f"{h.label}, {direction(h)}"
    return (
        f"Headline metric: {named} ({h.test}). 'Improves' means it {moves}; "
        f"the best configuration is the one with the {'highest' if h.goal == 'max' else 'lowest'} value."
    )


def custom_headline(name: str, goal: str) -> Headline:
    """A headline dinoscale.headline does not know (e.g. ``hd95``): per-volume values, goal as stated."""
    name = name[len("test_") :] if name.startswith("test_") else name
    if goal not in ("max", "min"):
        raise ValueError(f"headline goal must be 'max' or 'min', not {goal!r}")
    label = f"test {name}" + ("" if goal == "max" else " (lower is better)")
    return Headline(name, goal, label, per_volume=True)


def resolve_headline(name: str | None = None, goal: str | None = None) -> Headline | None:
    """A headline from a user's words (``voi`` or ``test_voi``; goal needed only for unknown metrics)."""
    if name is None:
        return None
    test = name if name.startswith("test_") else f"test_{name}"
    known = _BY_TEST_NAME.get(test)
    if known is None:
        if goal is None:
            raise ValueError(
                f"{test} is not a headline dinoscale knows; say whether higher or lower is better (goal max|min)"
            )
        return custom_headline(test, goal)
    return _checked_goal(known, goal)


def _checked_goal(h: Headline, goal: str | None) -> Headline:
    if goal is not None and goal != h.goal:
        raise ValueError(f"{h.test} is {direction(h)} (goal {h.goal}); goal {goal!r} contradicts it")
    return h


def sweep_headline(tags: dict) -> Headline:
    """The headline a sweep's parent run recorded (AUROC for sweeps from before headlines existed)."""
    h = headline_from_tags(tags)
    tag = tags.get(record.HEADLINE)
    if tag and tag != h.test:  # recorded, but not one dinoscale.headline knows: take the recorded goal
        return custom_headline(tag, tags.get(record.HEADLINE_GOAL, "max"))
    return h


def _is_interval(column: str) -> bool:
    return column.endswith(record.SUFFIXES)


def detect_headline(columns, name: str | None = None, goal: str | None = None) -> Headline:
    """Which headline a results table holds: the one named, else the one known headline it has a column
    for, else its only ``test_<x>`` column (then ``goal`` must be given). Interval columns are optional."""
    columns = [str(c) for c in columns]
    if name is not None:
        return resolve_headline(name, goal)
    known = [h for h in KNOWN_HEADLINES if h.test in columns]
    if len(known) == 1:
        return _checked_goal(known[0], goal)
    if len(known) > 1:
        raise ValueError(
            f"the results hold several headline metrics ({', '.join(h.test for h in known)}); "
            "choose one (analyze --headline)"
        )
    metrics = [c for c in columns if c.startswith("test_") and not _is_interval(c)]
    if len(metrics) == 1 and goal is not None:
        return custom_headline(metrics[0], goal)
    if len(metrics) == 1:
        raise ValueError(
            f"the results hold {metrics[0]}, which is not a headline dinoscale knows; "
            "say whether higher or lower is better (analyze --goal max|min)"
        )
    if metrics:
        raise ValueError(f"the results hold several metrics ({', '.join(metrics)}); choose one (analyze --headline)")
    raise ValueError(
        "no headline metric in the results: expected a column test_<name> (optionally with test_<name>_ci_low "
        f"and test_<name>_ci_high), e.g. {', '.join(h.test for h in KNOWN_HEADLINES)}, or name the column with "
        f"analyze --headline NAME --goal max|min; columns are {columns}"
    )


def complete_columns(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col, default in OPTIONAL_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
    if df["run_id"].isna().any():  # a stable id per row, so predictions and draws can refer to it
        df["run_id"] = [r if isinstance(r, str) and r else f"row{i}" for i, r in enumerate(df["run_id"])]
    return df


NO_INTERVALS = "no intervals: point estimates only"  # the label of every verdict that rests on points alone
NOT_STATED = "not stated"  # a text axis (backbone, probe, strategy) a table leaves blank
_TEXT_AXES = tuple(a.name for a in record.AXES if not a.numeric)  # backbone, probe, strategy (+ new categorical axes)
_SCALING_AXES = {"n_params": "params", "resolution": "resolution"}  # column -> the axis it is the x of
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def _number(value, column: str) -> float:
    """A positive number from a table cell: plain numbers, plus the forms papers print (``21.6M`` params,
    ``224px`` or ``224x224`` resolution). NaN for anything else."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        v = float(value)
    else:
        text = str(value).strip().lower().replace(",", "").replace(" ", "")
        scale = 1.0
        if column == "n_params" and text[-1:] in _SUFFIX:
            text, scale = text[:-1], _SUFFIX[text[-1]]
        if column == "resolution":
            text = text.removesuffix("px")
            side = text.split("x")
            if len(side) == 2 and side[0] == side[1]:
                text = side[0]
        try:
            v = float(text) * scale
        except ValueError:
            return float("nan")
    return v if np.isfinite(v) and v > 0 else float("nan")


def _where(df: pd.DataFrame, mask) -> str:
    """The rows under ``mask``, as a person finds them again: file lines, else run ids."""
    mask = np.asarray(mask, dtype=bool)
    if "_line" in df.columns:
        ids, what = [str(int(v)) for v in df.loc[mask, "_line"]], "line"
    elif "run_id" in df.columns and df["run_id"].notna().all():
        ids, what = [str(v) for v in df.loc[mask, "run_id"]], "run"
    else:
        ids, what = [str(i) for i in np.flatnonzero(mask)], "row"
    shown = ", ".join(ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
    return f"{what}{'s' if len(ids) > 1 else ''} {shown}"


def _blank(column: pd.Series) -> np.ndarray:
    """Cells that say nothing: missing, or only whitespace."""
    return np.array([_is_blank(v) for v in column], dtype=bool)


def _is_blank(v) -> bool:
    if isinstance(v, str):
        return v.strip() == ""
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _rows(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"


def tidy_results(df: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    """Any results table made fit for the analysis, saying what it did (``df.attrs['notes']``):

    * rows without a numeric headline value are left out; none left is an error;
    * a higher-is-better headline must be a score in [0, 1] (percentages, all in [0, 100], are divided by
      100 and said so); a lower-is-better one must be >= 0;
    * intervals are optional: missing, non-numeric, zero-width or not containing the value they are
      unknown, and those rows' verdicts rest on point estimates only (``NO_INTERVALS``);
    * a blank or unreadable size or resolution leaves the row out of that axis only; blank text axes
      read ``not stated``; a missing seed makes rows of one configuration replicates.

    Idempotent; raises ValueError (one message) for what cannot be analysed at all.
    """
    if df.attrs.get("tidy") == headline.test:
        return df
    if headline.test not in df.columns:
        raise ValueError(f"no {headline.test} column; columns are {[c for c in df.columns if c != '_line']}")
    notes = list(df.attrs.get("notes", []))
    df = df.reset_index(drop=True).copy()
    df.attrs = {}
    df = _headline_values(df, headline, notes)
    _text_axes(df, notes)
    _scaling_axes(df, notes)
    _other_columns(df)
    df = complete_columns(df)
    dup = df.duplicated([*CELL_COLUMNS, "seed"], keep=False)
    if dup.any():
        notes.append(
            f"{_rows(int(dup.sum()))} repeat a configuration and seed ({_where(df, dup)}): averaged as replicates"
        )
    df.attrs = {"headline": headline, "notes": notes, "tidy": headline.test}
    return df


def _headline_values(df: pd.DataFrame, headline: Headline, notes: list[str]) -> pd.DataFrame:
    """The rows with a numeric headline value, its interval and val columns numeric, range and intervals checked."""
    t, (lo_col, hi_col) = headline.test, record.ci_names(headline.test)
    value = pd.to_numeric(df[t], errors="coerce")
    bad = ~np.isfinite(value.to_numpy(float))
    if bad.all():
        raise ValueError(f"no row has a numeric {t}")
    if bad.any():
        notes.append(f"{_rows(int(bad.sum()))} without a numeric {t} left out ({_where(df, bad)})")
        df, value = df[~bad].reset_index(drop=True), value[~bad].reset_index(drop=True)
    df[t] = value
    missing_ci = [c for c in (lo_col, hi_col) if c not in df.columns]
    for c in (lo_col, hi_col, headline.val, *record.ci_names(headline.val)):
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df.columns else np.nan
    _check_range(df, headline, notes)
    if missing_ci:
        notes.append(f"no interval column(s) {missing_ci}: every verdict rests on point estimates only")
    else:
        _check_intervals(df, headline, notes)
    return df


def _axis_text(v) -> str:
    """A categorical axis value as text; a number as the record writes it (a CSV reads the size '1' as 1.0)."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return f"{float(v):g}"
    return str(v).strip()


def _text_axes(df: pd.DataFrame, notes: list[str]) -> None:
    """Every categorical axis as stripped text, ``not stated`` where blank or absent (a backbone named by its size)."""
    # a report's cell table has pooled its replicates: its ``seeds`` column says how many, no seed axis is missing
    absent = [
        c
        for c in AXIS_COLUMNS
        if c not in df.columns and not (c == "seed" and "seeds" in df.columns) and c not in record.AXIS_DEFAULTS
    ]
    if absent:
        notes.append(f"column(s) {absent} not in the table: each taken as one value ({NOT_STATED})")
    for col, default in record.AXIS_DEFAULTS.items():  # an optional axis: a table without it is at its default
        df[col] = [default if _is_blank(v) else _axis_text(v) for v in df.get(col, pd.Series(None, index=df.index))]
    for col in _TEXT_AXES:
        if col == "backbone" and col not in df.columns and "n_params" in df.columns:
            df[col] = [
                f"{n / 1e6:.3g}M params" if np.isfinite(n) else NOT_STATED
                for n in df["n_params"].map(lambda v: _number(v, "n_params"))
            ]
        if col not in df.columns:
            df[col] = NOT_STATED
            continue
        blank = _blank(df[col])
        if blank.any():
            notes.append(f"{col}: blank in {_rows(int(blank.sum()))} ({_where(df, blank)}), read as '{NOT_STATED}'")
        df[col] = [NOT_STATED if b else str(v).strip() for v, b in zip(df[col], blank)]


def _scaling_axes(df: pd.DataFrame, notes: list[str]) -> None:
    """Size and resolution as numbers (the forms papers print read too); NaN where blank or unreadable, said so."""
    for col, axis in _SCALING_AXES.items():
        raw = df[col] if col in df.columns else pd.Series(np.nan, index=df.index)
        num = raw.map(lambda v, c=col: _number(v, c)).astype(float)
        if col in df.columns:
            blank = _blank(raw)
            unread = num.isna().to_numpy() & ~blank
            if blank.any():
                notes.append(
                    f"{col}: not stated in {_rows(int(blank.sum()))} ({_where(df, blank)}); left out of the {axis} axis only"
                )
            if unread.any():
                shown = ", ".join(repr(str(v)) for v in raw[unread].unique()[:4])
                notes.append(
                    f"{col}: {shown} not a positive number ({_where(df, unread)}); left out of the {axis} axis only"
                )
        df[col] = num


def _other_columns(df: pd.DataFrame) -> None:
    """The seed (``not stated`` where blank; 0 where absent), the context as text, compute and tokens as numbers."""
    if "seed" not in df.columns:
        df["seed"] = 0
    df["seed"] = [NOT_STATED if b else v for v, b in zip(df["seed"], _blank(df["seed"]))]
    for col in record.CONTEXT_COLUMNS:
        if col in df.columns:
            df[col] = [OPTIONAL_COLUMNS[col] if b else str(v).strip() for v, b in zip(df[col], _blank(df[col]))]
    for col in (record.GFLOPS, record.TOKENS_PER_IMAGE):
        if col in df.columns:
            df[col] = df[col].map(lambda v, c=col: _number(v, c)).astype(float)


def _check_range(df: pd.DataFrame, h: Headline, notes: list[str]) -> None:
    t, cols = h.test, [h.test, *record.ci_names(h.test), h.val]
    v = df[t]
    if h.goal == "min":
        if (v < 0).any():
            raise ValueError(
                f"{t} is lower-is-better, an error or a distance >= 0, but {_where(df, v < 0)} hold negative values"
            )
        return
    if (v < 0).any() or (v > 100).any():
        raise ValueError(
            f"{t} is higher-is-better, a score in [0, 1], but {_where(df, (v < 0) | (v > 100))} hold values outside "
            "[0, 1] (and outside [0, 100], so not percentages either)"
        )
    if (v > 1).any():
        for c in cols:
            df[c] = df[c] / 100
        notes.append(f"{t} read as percentages (values up to {v.max():g}) and divided by 100")


def _check_intervals(df: pd.DataFrame, h: Headline, notes: list[str]) -> None:
    lo_col, hi_col = record.ci_names(h.test)
    v, lo, hi = df[h.test], df[lo_col], df[hi_col]
    absent = lo.isna() | hi.isna()
    zero = ~absent & (hi == lo)
    outside = ~absent & ~zero & ((lo > v + 1e-9) | (hi < v - 1e-9))
    for mask, why in (
        (absent, "no interval (blank or not a number)"),
        (zero, "a zero-width interval, treated as unknown"),
        (outside, "an interval that does not contain the value, treated as unknown"),
    ):
        if mask.any():
            notes.append(f"{_rows(int(mask.sum()))} with {why} ({_where(df, mask)}): point estimates only there")
    unknown = absent | zero | outside
    df.loc[unknown, [lo.name, hi.name]] = np.nan


def as_generic(df: pd.DataFrame, headline: Headline | None = None) -> tuple[pd.DataFrame, Headline]:
    """A run table in the internal naming (``metric``, ``metric_ci_low``, ``metric_ci_high``, ``val_metric``)
    and its headline (detected from the columns when not given). Tables already generic pass through."""
    if headline is None and "metric" in df.columns and not any(h.test in df.columns for h in KNOWN_HEADLINES):
        headline = AUROC  # generic table, no headline stated: the pre-headline default
    headline = headline or detect_headline(df.columns)
    df = complete_columns(df)
    if headline.test in df.columns:
        df = df.drop(columns=[c for c in (*GENERIC, *VAL) if c in df.columns])
        df = df.rename(
            columns={
                **dict(zip((headline.test, *record.ci_names(headline.test)), GENERIC)),
                **dict(zip((headline.val, *record.ci_names(headline.val)), VAL)),
            }
        )
    for col in (*GENERIC, *VAL):
        if col not in df.columns:
            if col == "metric":
                raise ValueError(f"the results have no {headline.test} column")
            df[col] = float("nan")
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df, headline


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV results table as pandas reads it, column names stripped and matched case-insensitively to the
    names dinoscale knows; every failure to read it is one ValueError naming the file."""
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a folder, not a CSV file") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty; expected a CSV table with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable CSV table ({first})") from None
    df.columns = [str(c).strip() for c in df.columns]
    dup = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup:
        raise ValueError(f"{path}: column(s) {dup} appear more than once; keep one of each")
    known = [*AXIS_COLUMNS, *OPTIONAL_COLUMNS, record.GFLOPS_PER_IMAGE]
    lower = {c.lower(): c for c in known}
    df = df.rename(
        columns={
            c: lower[c.lower()]
            for c in df.columns
            if c.lower() in lower and lower[c.lower()] != c and lower[c.lower()] not in df.columns
        }
    )
    if record.GFLOPS not in df.columns and record.GFLOPS_PER_IMAGE in df.columns:
        df = df.rename(columns={record.GFLOPS_PER_IMAGE: record.GFLOPS})
    if df.empty:
        raise ValueError(f"{path}: a header but no rows")
    df["_line"] = df.index + 2  # the file's line of each row (the header is line 1), for messages
    return df


def results_from_csv(path: str | Path, headline: Headline | str | None = None, goal: str | None = None) -> pd.DataFrame:
    """A results table; its headline is the one given (a ``Headline`` or a name such as ``test_voi``), else
    detected from its columns (``detect_headline``; ``goal`` for a metric dinoscale does not know).
    Only the headline column is required (``tidy_results`` says what it does with gaps). The headline
    travels with the table as ``df.attrs['headline']``, what was left out as ``df.attrs['notes']``."""
    df = read_table(path)
    try:
        if is_report_cells(df):
            df, headline = from_report_cells(df, headline, goal)
        if not isinstance(headline, Headline):
            headline = detect_headline(df.columns, headline, goal)
        if headline.test not in df.columns and headline.name in df.columns:  # a bare metric column (e.g. "dice")
            df = df.rename(columns={headline.name: headline.test})
        return tidy_results(df, headline)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# A report's results.csv (report._write_files): one row per cell, the headline's value, interval and goal named
# in columns of their own; read back by results_from_csv as it was written (the round trip).
REPORT_CELL_COLUMNS = ("metric", "low", "high", "headline", "goal")


def is_report_cells(df: pd.DataFrame) -> bool:
    return all(c in df.columns for c in REPORT_CELL_COLUMNS)


def from_report_cells(
    df: pd.DataFrame, headline: Headline | str | None = None, goal: str | None = None
) -> tuple[pd.DataFrame, Headline]:
    """A report's cell table as a results table: ``metric`` / ``low`` / ``high`` / ``val_metric`` renamed for
    the headline its ``headline`` and ``goal`` columns name (one of each; a headline asked for must agree).
    Each row stands for its cell's ``seeds`` replicates, already pooled; where the report had paired patient
    resamples or pooled several replicates, the comparisons now draw each cell from its interval and a
    note says so."""
    named = sorted(set(df["headline"].dropna().astype(str)))
    goals = sorted(set(df["goal"].dropna().astype(str)))
    if len(named) != 1 or len(goals) != 1:
        raise ValueError(
            f"a report's cell table with {len(named)} headline(s) {named} and goal(s) {goals}; expected one of each"
        )
    h = resolve_headline(named[0], goals[0])
    asked = headline.test if isinstance(headline, Headline) else headline
    if asked is not None and (asked if asked.startswith("test_") else f"test_{asked}") != h.test:
        raise ValueError(f"a report's cell table on {h.test}, not {asked}")
    _checked_goal(h, goal)
    out = df.drop(columns=["headline", "goal"]).rename(
        columns={
            "metric": h.test,
            **dict(zip(("low", "high"), record.ci_names(h.test))),
            "val_metric": h.val,
            **dict(zip(("val_low", "val_high"), record.ci_names(h.val))),
        }
    )
    paired = "pairing" in df.columns and df["pairing"].fillna("").astype(str).str.startswith("patients").any()
    pooled = "seeds" in df.columns and (pd.to_numeric(df["seeds"], errors="coerce") > 1).any()
    if paired or pooled:
        out.attrs["notes"] = [
            "read from a report's cell table: "
            + " and ".join(
                w
                for w, on in (
                    ("the report's paired patient resamples", paired),
                    ("its cells' replicates (already pooled)", pooled),
                )
                if on
            )
            + " are not in it; comparisons draw each cell from its interval (unpaired: more conservative)"
        ]
    return out, h


def _spec_name(run) -> str | None:
    """The spec a parent run swept: its tag (``record.SPEC_NAME``), else its param ``sweep`` (sweeps recorded
    before the tag)."""
    return run.data.tags.get(record.SPEC_NAME) or run.data.params.get("sweep")


def find_sweep(
    client, experiment_id: str, experiment: str, spec_name: str | None = None, spec_digest: str | None = None
) -> tuple[str, str | None]:
    """The latest sweep (parent run) in the experiment; with ``spec_name``, the latest sweep *of that spec*,
    preferring one of the same ``spec_digest`` (the spec as it is now). Returns (its run id, a note when the
    sweep found is of an earlier version of the spec, else None)."""
    parents = client.search_runs(
        [experiment_id],
        f"tags.`{record.ROLE}` = '{record.ROLE_SWEEP}'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    if not parents:
        raise LookupError(f"no sweep in experiment '{experiment}'; run `dinoscale sweep SPEC` first")
    if spec_name is None:
        return parents[0].info.run_id, None
    mine = [r for r in parents if _spec_name(r) == spec_name]
    if not mine:
        others = sorted({n for n in map(_spec_name, parents) if n})
        raise LookupError(
            f"no sweep of spec '{spec_name}' in experiment '{experiment}' (it holds sweeps of {', '.join(others)}); "
            "run `dinoscale sweep SPEC` first, or name a sweep with --sweep RUN_ID"
        )
    same = [r for r in mine if r.data.tags.get(record.SPEC_DIGEST) == spec_digest]
    if same or spec_digest is None:
        return (same or mine)[0].info.run_id, None
    run = mine[0]
    return run.info.run_id, (
        f"spec '{spec_name}' has changed since its latest sweep {run.data.tags.get(record.SWEEP_ID, run.info.run_id)} "
        f"(digest {run.data.tags.get(record.SPEC_DIGEST, 'not recorded')}, now {spec_digest}): this report is on that "
        "sweep; sweep the spec again for its current grid"
    )


def _axis_value(axis: record.Axis, params: dict, metrics: dict):
    """A numeric axis from its mirrored metric (as an int where it is one), the others from params (an optional
    axis a run does not state: its default)."""
    if not axis.numeric:
        return params.get(axis.name, axis.default)
    v = metrics.get(axis.name, 0)
    return int(v) if float(v).is_integer() else v


def _run_row(r, headline: Headline) -> dict:
    p, m = r.data.params, r.data.metrics
    t = headline.test
    return {
        MODALITY: p.get(MODALITY, "unknown"),
        DATASET: p.get(DATASET, "unknown"),
        WEIGHTS: p.get(WEIGHTS),
        **{a.name: _axis_value(a, p, m) for a in record.AXES},
        t: m.get(t),
        **{c: m.get(c) for c in record.ci_names(t)},
        headline.val: m.get(headline.val),
        **{c: m.get(c) for c in record.ci_names(headline.val)},
        record.TOKENS_PER_IMAGE: m.get(record.TOKENS_PER_IMAGE),
        record.GFLOPS: m.get(record.GFLOPS_PER_IMAGE, m.get(record.GFLOPS)),
        "run_id": r.info.run_id,
        record.MACRO_MIN_PATIENTS: m.get(record.MACRO_MIN_PATIENTS, p.get(record.MACRO_MIN_PATIENTS)),
        record.MACRO_NEGATIVES: m.get(record.MACRO_NEGATIVES),
        "selection_edge": r.data.tags.get(record.SELECTION_EDGE, ""),
        "min_interval_units": p.get("min_interval_units"),
        "n_val": m.get("n_val"),
        record.N_TRAIN_PATIENTS: m.get(record.N_TRAIN_PATIENTS),
        **{k: v for k, v in m.items() if record.parse_external_name(k)},  # external test sets, where the sweep has them
    }


def results_from_mlflow(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None = None,
    with_predictions: bool = False,
    spec_name: str | None = None,
    spec_digest: str | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Finished child runs of one sweep, with the metric columns of the sweep's headline (parent tag
    ``dinoscale.headline``; AUROC when absent). The sweep: ``parent_run_id``, else the latest of the spec
    ``spec_name`` (``find_sweep``), else the latest of the experiment.

    ``info``: parent_run_id, the parent's tags, the ``headline``, the ``spec_name`` it swept, a ``note`` (the
    spec changed since that sweep, or None), and with ``with_predictions`` a dict run_id -> per-sample test predictions for the runs
    that logged them.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment '{experiment}' at {tracking_uri}; run a sweep first")
    note = None
    if parent_run_id is None:
        parent_run_id, note = find_sweep(client, exp.experiment_id, experiment, spec_name, spec_digest)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise LookupError(f"no run {parent_run_id} at {tracking_uri}; see the sweeps with `dinoscale ui`") from None
    if parent.info.experiment_id != exp.experiment_id or parent.data.tags.get(record.ROLE) != record.ROLE_SWEEP:
        raise LookupError(
            f"run {parent_run_id} is not a sweep's parent run in experiment '{experiment}'; give the run id of a "
            "sweep (its parent run, named after the sweep in the MLflow runs table)"
        )
    headline = sweep_headline(parent.data.tags)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{record.PARENT_RUN_ID}` = '{parent_run_id}'", max_results=10000
    )
    rows = [_run_row(r, headline) for r in runs if r.info.status == "FINISHED" and headline.test in r.data.metrics]
    df = complete_columns(
        pd.DataFrame(
            rows,
            columns=result_columns(headline)
            + [headline.val, *record.ci_names(headline.val)]
            + list(OPTIONAL_COLUMNS)
            + sorted({k for row in rows for k in row if record.parse_external_name(k)}),
        )
    )
    df.attrs["headline"] = headline
    df.attrs["parent_run_id"] = parent_run_id
    info = {
        "parent_run_id": parent_run_id,
        "tags": parent.data.tags,
        "headline": headline,
        "note": note,
        "spec_name": _spec_name(parent),
    }
    if with_predictions:
        info["predictions"] = load_predictions(client, df["run_id"].tolist(), headline)
    return df, info


def load_predictions(client, run_ids: list[str], headline: Headline = AUROC) -> dict[str, pd.DataFrame]:
    """Per-sample test predictions of each run that has them; runs without are left out, not faked."""
    out = {}
    # one progress bar per small CSV would bury the report's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="dinoscale-preds-") as tmp:
        for run_id in run_ids:
            if not any(a.path == PREDICTIONS_ARTIFACT for a in client.list_artifacts(run_id, "predictions")):
                continue
            local = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp)
            out[run_id] = read_predictions(local, f"run {run_id}", headline)
    return out


def read_predictions(path: str | Path, what: str, headline: Headline = AUROC) -> pd.DataFrame:
    """Per-sample predictions in the headline's format: ``label_<class>`` + ``score_<class>`` columns, or
    for a per-volume headline its column ``<name>`` (one value per volume)."""
    df = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str})
    missing = [c for c in ("sample_id", "patient_id") if c not in df.columns]
    if headline.per_volume:
        if missing or headline.name not in df.columns:
            raise ValueError(
                f"{what}: {path} lacks column(s) {missing + [headline.name] * (headline.name not in df.columns)}; "
                f"expected sample_id, patient_id and the per-volume metric column {headline.name}"
            )
        df[headline.name] = pd.to_numeric(df[headline.name], errors="coerce")
        return df
    labels = [c[len("label_") :] for c in df.columns if c.startswith("label_")]
    missing += [f"score_{c}" for c in labels if f"score_{c}" not in df.columns]
    if missing or not labels:
        raise ValueError(
            f"{what}: {path} lacks column(s) {missing or ['label_<class>']}; "
            "expected sample_id, patient_id, label_<class>, score_<class>"
        )
    return df


def table_provenance(df: pd.DataFrame) -> Provenance:
    """A results table's provenance, for ``Provenance`` to decide on: the weights its rows name and the source of
    each dataset it names (its ``data.source`` column where it has one, else the dataset registry's word on a
    dataset dinoscale generates; a name the registry does not know is of unknown origin)."""
    named = sorted(set(df[DATASET].dropna().astype(str)) - {"unknown"}) if DATASET in df else []
    if record.DATA_SOURCE in df:
        sources = {n: _first(df.loc[df[DATASET].astype(str) == n, record.DATA_SOURCE]) for n in named}
    else:
        sources = _registry_sources(named)
    weights = list(df[WEIGHTS].dropna().astype(str)) if WEIGHTS in df else []
    return Provenance.from_table(sources, weights)


def _first(values: pd.Series) -> str | None:
    values = values.dropna().astype(str)
    return values.iloc[0] if len(values) else None


def _registry_sources(names: list[str]) -> dict[str, str | None]:
    if not names:
        return {}
    # imported here: the dataset registry discovers every adapter module (about 4 s, measured), which a report
    # on a table that names no dataset never needs
    from dinoscale.data import dataset_names, is_phantom

    known = set(dataset_names())
    return {n: (PHANTOM if is_phantom(n) else REAL) if n in known else None for n in names}


def provenance_gaps(df: pd.DataFrame, provenance: list[str], decided: Provenance | None = None) -> list[str]:
    """Lines saying what the table states about data and weights, where the caller said nothing; what is
    generated or random is said in ``Provenance``'s words (``decided``: the table's, by default)."""
    decided = decided or table_provenance(df)
    said = decided.lines()
    lines = []
    if not any(line.lower().startswith("data") for line in provenance):
        named = sorted(set(df[DATASET].dropna().astype(str)) - {"unknown"}) if DATASET in df else []
        if decided.synthetic_data:
            lines += [line for line in said if line.startswith("data:")]
        else:
            lines.append(
                f"data: {', '.join(named)} (as named in the results; origin not recorded)"
                if named
                else "data: not stated in the results"
            )
    if not any(line.lower().startswith("weight") for line in provenance):
        kinds = sorted(set(decided.weights))
        lines += [line for line in said if line.startswith("weights: RANDOM")]
        lines.append(
            f"weights: {', '.join(kinds)} (as stated in the results)" if kinds else "weights: not stated in the results"
        )
    return lines
