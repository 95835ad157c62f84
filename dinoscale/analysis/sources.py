"""Where results come from: the MLflow record of one sweep, or a results table (CSV).

Both give one row per finished run with the same columns. MLflow also gives each run's per-sample
test predictions (artifact ``predictions/test.csv``), which the analysis resamples by patient.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

RESULT_COLUMNS = ["backbone", "n_params", "resolution", "probe", "strategy", "seed",
                  "test_macro_auroc", "test_macro_auroc_ci_low", "test_macro_auroc_ci_high"]
# optional: filled with a stated default when a table lacks them (never guessed from other columns)
OPTIONAL_COLUMNS = {"modality": "unknown", "dataset": "unknown", "weights": None, "tokens_per_image": None,
                    "gflops": None, "val_macro_auroc": None, "run_id": None}
PREDICTIONS_ARTIFACT = "predictions/test.csv"


def complete_columns(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col, default in OPTIONAL_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
    if df["run_id"].isna().any():  # a stable id per row, so predictions and draws can refer to it
        df["run_id"] = [r if isinstance(r, str) and r else f"row{i}" for i, r in enumerate(df["run_id"])]
    return df


def results_from_csv(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {RESULT_COLUMNS}")
    bad = df[RESULT_COLUMNS[-3:]].apply(pd.to_numeric, errors="coerce").isna().any(axis=1)
    if bad.any():
        raise ValueError(f"{path}: row(s) {list(df.index[bad] + 2)} have a missing or non-numeric "
                         f"test_macro_auroc / _ci_low / _ci_high (line numbers count the header)")
    return df


def _latest_sweep(client, experiment_id: str, experiment: str) -> str:
    parents = client.search_runs([experiment_id], "tags.`dinoscale.role` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise LookupError(f"no sweep in experiment '{experiment}'")
    return parents[0].info.run_id


def _run_row(r) -> dict:
    p, m = r.data.params, r.data.metrics
    return {
        "modality": p.get("modality", "unknown"), "dataset": p.get("dataset", "unknown"), "weights": p.get("weights"),
        "backbone": p.get("backbone"), "n_params": int(m["n_params"]), "resolution": int(m["resolution"]),
        "probe": p.get("probe"), "strategy": p.get("strategy"), "seed": int(m.get("seed", 0)),
        "test_macro_auroc": m.get("test_macro_auroc"), "test_macro_auroc_ci_low": m.get("test_macro_auroc_ci_low"),
        "test_macro_auroc_ci_high": m.get("test_macro_auroc_ci_high"), "val_macro_auroc": m.get("val_macro_auroc"),
        "tokens_per_image": m.get("tokens_per_image"), "gflops": m.get("gflops_per_image", m.get("gflops")), "run_id": r.info.run_id,
    }


def results_from_mlflow(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
                        with_predictions: bool = False) -> tuple[pd.DataFrame, dict]:
    """Finished child runs of one sweep (the latest sweep of the experiment when not given).

    ``info``: parent_run_id, the parent's tags, and with ``with_predictions`` a dict run_id ->
    per-sample test predictions for the runs that logged them.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment '{experiment}' at {tracking_uri}; run a sweep first")
    parent_run_id = parent_run_id or _latest_sweep(client, exp.experiment_id, experiment)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000)
    rows = [_run_row(r) for r in runs if r.info.status == "FINISHED" and "test_macro_auroc" in r.data.metrics]
    df = complete_columns(pd.DataFrame(rows, columns=RESULT_COLUMNS + list(OPTIONAL_COLUMNS)))
    info = {"parent_run_id": parent_run_id, "tags": parent.data.tags}
    if with_predictions:
        info["predictions"] = load_predictions(client, df["run_id"].tolist())
    return df, info


def load_predictions(client, run_ids: list[str]) -> dict[str, pd.DataFrame]:
    """Per-sample test predictions of each run that has them; runs without are left out, not faked."""
    out = {}
    # one progress bar per small CSV would bury the report's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="dinoscale-preds-") as tmp:
        for run_id in run_ids:
            if not any(a.path == PREDICTIONS_ARTIFACT for a in client.list_artifacts(run_id, "predictions")):
                continue
            local = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, tmp)
            out[run_id] = read_predictions(local, f"run {run_id}")
    return out


def read_predictions(path: str | Path, what: str) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str})
    labels = [c[len("label_"):] for c in df.columns if c.startswith("label_")]
    missing = [c for c in ("sample_id", "patient_id") if c not in df.columns]
    missing += [f"score_{c}" for c in labels if f"score_{c}" not in df.columns]
    if missing or not labels:
        raise ValueError(f"{what}: {path} lacks column(s) {missing or ['label_<class>']}; "
                         "expected sample_id, patient_id, label_<class>, score_<class>")
    return df


def provenance_from_tags(tags: dict) -> list[str]:
    lines = []
    if tags.get("data.source") == "phantom":
        lines.append(f"data: PHANTOM ({tags.get('data.generator')}, seed {tags.get('data.seed')}) - synthetic, not patient data")
    elif tags.get("data.name"):
        lines.append(f"data: {tags.get('data.name')} ({tags.get('data.root', '')})")
    if "random" in tags.get("weights.kinds", ""):
        lines.append("weights: RANDOM init for at least one backbone - no pretrained features")
    if tags.get("weights.kinds"):
        lines.append(f"weight sources: {tags['weights.kinds']}")
    return lines


def provenance_gaps(df: pd.DataFrame, provenance: list[str]) -> list[str]:
    """Lines saying what the table states about data and weights, where the caller said nothing."""
    lines = []
    if not any(line.lower().startswith("data") for line in provenance):
        named = sorted(set(df["dataset"].dropna().astype(str)) - {"unknown"}) if "dataset" in df else []
        lines.append(f"data: {', '.join(named)} (as named in the results; origin not recorded)" if named
                     else "data: not stated in the results")
    if not any(line.lower().startswith("weight") for line in provenance):
        kinds = sorted(set(df["weights"].dropna().astype(str))) if "weights" in df else []
        if "random" in kinds:
            lines.append("weights: RANDOM init for at least one backbone - no pretrained features")
        lines.append(f"weights: {', '.join(kinds)} (as stated in the results)" if kinds else "weights: not stated in the results")
    return lines
