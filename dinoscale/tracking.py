"""MLflow conventions: an experiment per spec (dinoscale-<spec name> unless named), parent run per sweep, one child run per cell.

A child run is found again by its deterministic trial key (tag ``dinoscale.trial_key``) under its
parent, so a retried or resumed trial reuses its run instead of duplicating it. Numeric sweep axes
are logged as params *and* metrics, because MLflow sorts params as strings.
"""

from __future__ import annotations

import subprocess
import time
import warnings
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from dinoscale import settings
from dinoscale.record import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TRAINING,
    PARENT_RUN_ID,
    ROLE,
    ROLE_CELL,
    ROLE_SWEEP,
    RUNS_TABLE_QUERY,
    TRIAL_KEY,
)


def resolve_tracking_uri(uri: str, project_dir: Path | None = None) -> str:
    """The URI in use (``settings.tracking_uri``: --tracking-uri > DINOSCALE_TRACKING_URI > MLFLOW_TRACKING_URI
    > ``uri``, the spec's), a relative sqlite path made absolute (relative to the project folder), so workers agree."""
    uri = settings.tracking_uri(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        uri = "sqlite:///" + str(((project_dir or Path.cwd()) / rel).resolve())
    return uri


def default_artifact_location(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created if needed and marked as a model-training experiment (MLflow's
    ``mlflow.experimentKind``), so the MLflow UI treats it as runs to compare, not GenAI traces. An
    experiment created before that mark gets it; one a user marked otherwise is left alone."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                name,
                artifact_location=artifact_location,
                tags={EXPERIMENT_KIND: EXPERIMENT_KIND_TRAINING},
            )
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            return exp_id
    if EXPERIMENT_KIND not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING)
    return exp.experiment_id


def runs_table_url(ui_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's runs table of an experiment (or one run's page), as a link that opens on it: the
    UI's own default for a fresh browser is its GenAI overview (MLflow 3.17)."""
    base = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{base}/runs/{run_id}?{RUNS_TABLE_QUERY}" if run_id else f"{base}/runs?{RUNS_TABLE_QUERY}"


def sweep_links(tracking_uri: str, ui_url: str) -> list[tuple[str, str, str]]:
    """(experiment name, runs-table link, latest sweep's parent-run link) of every experiment of a tracking
    store that holds a dinoscale sweep, most recently updated first."""
    client = MlflowClient(tracking_uri)
    out = []
    for e in client.search_experiments(order_by=["last_update_time DESC"]):
        latest = client.search_runs(
            [e.experiment_id], f"tags.`{ROLE}` = '{ROLE_SWEEP}'", order_by=["attributes.start_time DESC"], max_results=1
        )
        if latest:
            run_id = latest[0].info.run_id
            out.append(
                (e.name, runs_table_url(ui_url, e.experiment_id), runs_table_url(ui_url, e.experiment_id, run_id))
            )
    return out


def git_commit(project_dir: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_dir or Path.cwd(), capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_dir or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_child(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str):
    """The run under ``parent_run_id`` keyed ``trial_key`` (a cell under its sweep, a configuration under its cell)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{TRIAL_KEY}` = '{trial_key}'",
        max_results=2,
    )
    return runs[0] if runs else None


def find_or_create_child(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    trial_key: str,
    run_name: str,
    tags: dict[str, str],
    role: str = ROLE_CELL,
) -> str:
    existing = find_child(client, experiment_id, parent_run_id, trial_key)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    all_tags = {PARENT_RUN_ID: parent_run_id, TRIAL_KEY: trial_key, ROLE: role, **tags}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def children(client: MlflowClient, experiment_id: str, parent_run_id: str, role: str) -> list:
    """Every run of ``role`` directly under ``parent_run_id``."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{ROLE}` = '{role}'",
        max_results=10000,
    )


def log_batch(
    client: MlflowClient,
    run_id: str,
    params: dict | None = None,
    metrics: dict | None = None,
    tags: dict | None = None,
    step: int = 0,
) -> None:
    """Log in chunks that stay under MLflow's per-request limits (100 params, 1000 metrics)."""
    ts = int(time.time() * 1000)
    p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    m = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items() if v is not None]
    t = [RunTag(k, str(v)[:8000]) for k, v in (tags or {}).items()]
    for i in range(0, max(len(p), 1), 100):
        client.log_batch(run_id, params=p[i : i + 100])
    for i in range(0, len(m), 1000):
        client.log_batch(run_id, metrics=m[i : i + 1000])
    for i in range(0, len(t), 100):
        client.log_batch(run_id, tags=t[i : i + 100])


def with_retries(fn, *args, attempts: int = 5, **kwargs):
    """SQLite allows one writer at a time; concurrent trials may briefly see 'database is locked'."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - retried only for lock contention
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


def split_dataset_inputs(ds) -> list:
    """The split manifests as MLflow datasets (name, digest = manifest digest, context = split)."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split in ("train", "val", "test"):
        df = ds.split(split).drop(columns=["path"])
        # 0/1 label columns as float: MLflow's schema inference warns on integer columns
        df = df.astype({c: "float64" for c in df.columns if pd.api.types.is_integer_dtype(df[c])})
        # source: the folder the files are in (a phantom's generated folder is labelled by its name)
        with warnings.catch_warnings():  # a local folder matches two equivalent MLflow source types
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(
                df, source=str(ds.root), name=f"{ds.name}-{split}", digest=ds.manifest_digest(split)
            )
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", split)]))
    return inputs


def finished_child_metrics(
    client: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str, primary: str
) -> dict | None:
    """Metrics of a cell already recorded FINISHED under this parent (the record makes resumes idempotent)."""
    run = find_child(client, experiment_id, parent_run_id, trial_key)
    if run is None or run.info.status != "FINISHED" or primary not in run.data.metrics:
        return None
    return {**run.data.metrics, "mlflow_run_id": run.info.run_id}
