"""Analysis: reads only the tracking store (or a results CSV), fits scaling curves, writes a report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dinoscale.analysis.report import write_report
from dinoscale.analysis.scaling import ScalingFit, fit_power_law  # noqa: F401

RESULT_COLUMNS = ["backbone", "n_params", "resolution", "probe", "strategy", "seed",
                  "test_macro_auroc", "test_macro_auroc_ci_low", "test_macro_auroc_ci_high"]


def results_from_mlflow(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Finished child runs of one sweep (the latest sweep of the experiment when not given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment '{experiment}' at {tracking_uri}; run a sweep first")
    if parent_run_id is None:
        parents = client.search_runs([exp.experiment_id], "tags.`dinoscale.role` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise LookupError(f"no sweep in experiment '{experiment}'")
        parent_run_id = parents[0].info.run_id
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000)
    rows = []
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        p, m = r.data.params, r.data.metrics
        rows.append({
            "backbone": p.get("backbone"), "n_params": int(m["n_params"]), "resolution": int(m["resolution"]),
            "probe": p.get("probe"), "strategy": p.get("strategy"), "seed": int(m.get("seed", 0)),
            "test_macro_auroc": m.get("test_macro_auroc"), "test_macro_auroc_ci_low": m.get("test_macro_auroc_ci_low"),
            "test_macro_auroc_ci_high": m.get("test_macro_auroc_ci_high"), "run_id": r.info.run_id,
        })
    return pd.DataFrame(rows, columns=RESULT_COLUMNS + ["run_id"]), {"parent_run_id": parent_run_id, "tags": parent.data.tags}


def results_from_csv(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {RESULT_COLUMNS}")
    return df


def analyze_sweep(tracking_uri: str, experiment: str, parent_run_id: str | None, out_dir: Path,
                  provenance: list[str] | None = None, quiet: bool = False) -> Path:
    from mlflow.tracking import MlflowClient

    df, info = results_from_mlflow(tracking_uri, experiment, parent_run_id)
    tags = info["tags"]
    if provenance is None:
        provenance = _provenance_from_tags(tags)
    out_dir = write_report(df, Path(out_dir), title=f"{experiment} / {tags.get('dinoscale.sweep_id', info['parent_run_id'])}",
                           provenance=provenance)
    client = MlflowClient(tracking_uri)
    for f in sorted(out_dir.iterdir()):
        if f.is_file():
            client.log_artifact(info["parent_run_id"], str(f), "report")
    if not quiet:
        from dinoscale.sweep.display import console

        console.print(f"Report: {out_dir / 'report.md'} (also attached to parent run {info['parent_run_id']})")
        console.print((out_dir / "verdicts.md").read_text())
    return out_dir


def _provenance_from_tags(tags: dict) -> list[str]:
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
