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

import pandas as pd

from dinoscale import record
from dinoscale.headline import _BY_TEST_NAME, AUROC, Headline, headline_from_tags

GENERIC = ("metric", "metric_ci_low", "metric_ci_high")  # internal names of test_<name>, _ci_low, _ci_high
AXIS_COLUMNS = list(record.AXIS_NAMES)


def result_columns(headline: Headline = AUROC) -> list[str]:
    """Columns every results table has, for this headline."""
    return AXIS_COLUMNS + [headline.test, f"{headline.test}_ci_low", f"{headline.test}_ci_high"]


RESULT_COLUMNS = result_columns(AUROC)  # the classification tables of before headlines existed
# optional: filled with a stated default when a table lacks them (never guessed from other columns)
OPTIONAL_COLUMNS = {
    "modality": "unknown",
    "dataset": "unknown",
    "weights": None,
    "tokens_per_image": None,
    "gflops": None,
    "run_id": None,
    # protocol constants the analysis applies as the trial did (dinoscale.metrics): absent -> the defaults
    "macro_min_patients": None,
    "min_interval_units": None,
    "selection_edge": "",  # a choice on a grid edge (record.SELECTION_EDGE), warned about in the report
}
PREDICTIONS_ARTIFACT = record.PREDICTIONS
KNOWN_HEADLINES = tuple(_BY_TEST_NAME.values())


def short_name(h: Headline) -> str:
    """The metric in a word, for captions: AUROC, Dice, VOI, HD95..."""
    return {"macro_auroc": "AUROC", "dice": "Dice"}.get(h.name, h.name.upper())


def file_stem(h: Headline) -> str:
    """Plot files are ``<stem>_vs_<axis>.png``: the headline's name (``auroc`` for macro AUROC, as ever)."""
    return "auroc" if h.name == AUROC.name else h.name


def direction(h: Headline) -> str:
    return "higher is better" if h.goal == "max" else "lower is better"


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


def detect_headline(columns, name: str | None = None, goal: str | None = None) -> Headline:
    """Which headline a results table holds: the one named, else the one known headline it has columns
    for, else its only ``test_<x>`` with ``_ci_low`` / ``_ci_high`` (then ``goal`` must be given)."""
    columns = list(columns)
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
    triples = [c for c in columns if c.startswith("test_") and f"{c}_ci_low" in columns and f"{c}_ci_high" in columns]
    if len(triples) == 1 and goal is not None:
        return custom_headline(triples[0], goal)
    if len(triples) == 1:
        raise ValueError(
            f"the results hold {triples[0]}, which is not a headline dinoscale knows; "
            "say whether higher or lower is better (analyze --goal max|min)"
        )
    if triples:
        raise ValueError(
            f"the results hold several metrics with intervals ({', '.join(triples)}); choose one (analyze --headline)"
        )
    raise ValueError(
        "no headline metric in the results: expected test_<name>, test_<name>_ci_low, test_<name>_ci_high "
        f"(e.g. {', '.join(h.test for h in KNOWN_HEADLINES)}); columns are {columns}"
    )


def complete_columns(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col, default in OPTIONAL_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
    if df["run_id"].isna().any():  # a stable id per row, so predictions and draws can refer to it
        df["run_id"] = [r if isinstance(r, str) and r else f"row{i}" for i, r in enumerate(df["run_id"])]
    return df


def as_generic(df: pd.DataFrame, headline: Headline | None = None) -> tuple[pd.DataFrame, Headline]:
    """A run table in the internal naming (``metric``, ``metric_ci_low``, ``metric_ci_high``, ``val_metric``)
    and its headline (detected from the columns when not given). Tables already generic pass through."""
    if headline is None and "metric" in df.columns and not any(h.test in df.columns for h in KNOWN_HEADLINES):
        headline = AUROC  # generic table, no headline stated: the pre-headline default
    headline = headline or detect_headline(df.columns)
    df = complete_columns(df)
    if headline.test in df.columns:
        df = df.drop(columns=[c for c in (*GENERIC, "val_metric") if c in df.columns])
        df = df.rename(
            columns={
                headline.test: "metric",
                f"{headline.test}_ci_low": "metric_ci_low",
                f"{headline.test}_ci_high": "metric_ci_high",
                headline.val: "val_metric",
            }
        )
    for col in (*GENERIC, "val_metric"):
        if col not in df.columns:
            if col == "metric":
                raise ValueError(f"the results have no {headline.test} column")
            df[col] = float("nan")
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df, headline


def results_from_csv(path: str | Path, headline: Headline | str | None = None, goal: str | None = None) -> pd.DataFrame:
    """A results table; its headline is the one given (a ``Headline`` or a name such as ``test_voi``), else
    detected from its columns (``detect_headline``; ``goal`` for a metric dinoscale does not know).
    The headline travels with the table as ``df.attrs['headline']``."""
    df = pd.read_csv(path)
    try:
        if not isinstance(headline, Headline):
            headline = detect_headline(df.columns, headline, goal)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    expected = result_columns(headline)
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {expected}")
    bad = df[expected[-3:]].apply(pd.to_numeric, errors="coerce").isna().any(axis=1)
    if bad.any():
        raise ValueError(
            f"{path}: row(s) {list(df.index[bad] + 2)} have a missing or non-numeric "
            f"{headline.test} / _ci_low / _ci_high (line numbers count the header)"
        )
    df.attrs["headline"] = headline
    return df


def _latest_sweep(client, experiment_id: str, experiment: str) -> str:
    parents = client.search_runs(
        [experiment_id],
        f"tags.`{record.ROLE}` = '{record.ROLE_SWEEP}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise LookupError(f"no sweep in experiment '{experiment}'")
    return parents[0].info.run_id


def _axis_value(axis: record.Axis, params: dict, metrics: dict):
    """A numeric axis from its mirrored metric (as an int where it is one), the others from params."""
    if not axis.numeric:
        return params.get(axis.name)
    v = metrics.get(axis.name, 0)
    return int(v) if float(v).is_integer() else v


def _run_row(r, headline: Headline) -> dict:
    p, m = r.data.params, r.data.metrics
    t = headline.test
    return {
        "modality": p.get("modality", "unknown"),
        "dataset": p.get("dataset", "unknown"),
        "weights": p.get("weights"),
        **{a.name: _axis_value(a, p, m) for a in record.AXES},
        t: m.get(t),
        f"{t}_ci_low": m.get(f"{t}_ci_low"),
        f"{t}_ci_high": m.get(f"{t}_ci_high"),
        headline.val: m.get(headline.val),
        "tokens_per_image": m.get("tokens_per_image"),
        "gflops": m.get("gflops_per_image", m.get("gflops")),
        "run_id": r.info.run_id,
        "macro_min_patients": m.get("macro_min_patients", p.get("macro_min_patients")),
        "selection_edge": r.data.tags.get(record.SELECTION_EDGE, ""),
        "min_interval_units": p.get("min_interval_units"),
    }


def results_from_mlflow(
    tracking_uri: str, experiment: str, parent_run_id: str | None = None, with_predictions: bool = False
) -> tuple[pd.DataFrame, dict]:
    """Finished child runs of one sweep (the latest sweep of the experiment when not given), with the
    metric columns of the sweep's headline (parent tag ``dinoscale.headline``; AUROC when absent).

    ``info``: parent_run_id, the parent's tags, the ``headline``, and with ``with_predictions`` a dict
    run_id -> per-sample test predictions for the runs that logged them.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment '{experiment}' at {tracking_uri}; run a sweep first")
    parent_run_id = parent_run_id or _latest_sweep(client, exp.experiment_id, experiment)
    parent = client.get_run(parent_run_id)
    headline = sweep_headline(parent.data.tags)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{record.PARENT_RUN_ID}` = '{parent_run_id}'", max_results=10000
    )
    rows = [_run_row(r, headline) for r in runs if r.info.status == "FINISHED" and headline.test in r.data.metrics]
    df = complete_columns(
        pd.DataFrame(rows, columns=result_columns(headline) + [headline.val] + list(OPTIONAL_COLUMNS))
    )
    df.attrs["headline"] = headline
    info = {"parent_run_id": parent_run_id, "tags": parent.data.tags, "headline": headline}
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


def provenance_gaps(df: pd.DataFrame, provenance: list[str]) -> list[str]:
    """Lines saying what the table states about data and weights, where the caller said nothing."""
    lines = []
    if not any(line.lower().startswith("data") for line in provenance):
        named = sorted(set(df["dataset"].dropna().astype(str)) - {"unknown"}) if "dataset" in df else []
        lines.append(
            f"data: {', '.join(named)} (as named in the results; origin not recorded)"
            if named
            else "data: not stated in the results"
        )
    if not any(line.lower().startswith("weight") for line in provenance):
        kinds = sorted(set(df["weights"].dropna().astype(str))) if "weights" in df else []
        if "random" in kinds:
            lines.append("weights: RANDOM init for at least one backbone - no pretrained features")
        lines.append(
            f"weights: {', '.join(kinds)} (as stated in the results)" if kinds else "weights: not stated in the results"
        )
    return lines
