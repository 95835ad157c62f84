"""Replicates that matter, end to end: a sweep with three replicates (seeds) redraws train / val by patient for
replicates 1 and 2, seeds each probe's initialisation, records the replicate's split on every run, and the
analysis pools the replicates with the patient bootstrap into wider, honest intervals than one replicate
gives. Real Ray Tune, real SQLite MLflow, phantom images, DINOv3-architecture models with random weights."""

from __future__ import annotations

import pytest

from conftest import tiny_spec_dict
from dinoscale.analysis import bootstrap_cells
from dinoscale.analysis.sources import results_from_mlflow
from dinoscale.spec import parse_spec
from dinoscale.sweep.runner import run_sweep

pytestmark = pytest.mark.slow


def test_three_replicates_give_wider_intervals_than_one(tmp_path, ray_local):
    raw = tiny_spec_dict(
        tmp_path,
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32],
        probes=[{"kind": "linear", "epochs": 20, "batch_size": 64}],
        seeds=[0, 1, 2],
    )
    out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True, analyze=False)
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 3
    runs, info = results_from_mlflow(
        out.tracking_uri, out.plan.spec.experiment_name, out.parent_run_id, with_predictions=True
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out.tracking_uri)
    params = {int(r.seed): client.get_run(r.run_id).data.params for r in runs.itertuples()}
    assert params[0]["replicate_split"] == "the dataset's split"
    assert params[1]["replicate_split"] == "train/val patients redrawn (seed 0, replicate 1)"
    metrics = {int(r.seed): client.get_run(r.run_id).data.metrics for r in runs.itertuples()}
    assert (
        len({m["n_val"] for m in metrics.values()}) >= 1 and len({m["test_macro_auroc"] for m in metrics.values()}) == 3
    )
    # the same test set for every replicate (test is never redrawn): their predictions pair over patients
    ids = {tuple(sorted(p["sample_id"])) for p in info["predictions"].values()}
    assert len(ids) == 1

    one = bootstrap_cells(runs[runs["seed"] == 0], info["predictions"], resamples=500).cells.iloc[0]
    three = bootstrap_cells(runs, info["predictions"], resamples=500).cells.iloc[0]
    assert one.seeds == 1 and three.seeds == 3
    assert "test sampling only" in one.uncertainty and "3 replicate(s)" in three.uncertainty
    assert three.high - three.low > one.high - one.low
