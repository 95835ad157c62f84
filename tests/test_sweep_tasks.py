"""Segmentation sweeps end to end: real Ray Tune, real SQLite MLflow, phantom volumes on disk,
DINOv3-architecture models with random weights (no mocks).

EM instance segmentation (CREMI blocks, VOI / ARAND per sample without an interval), PET/CT fusion and whole-slide
scoring per slide are checked on the rehearsals of sweeps/em.yaml, sweeps/petct.yaml and sweeps/wsi.yaml
(tests/test_rehearse.py, TASK_CHECKS); the CT pool probe on slice rows in tests/test_sweep.py's CT sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dinoscale.spec import parse_spec
from dinoscale.sweep.runner import run_sweep

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp: Path, modality: str, probe: dict, **phantom) -> dict:
    raw = yaml.safe_load((ROOT / "sweeps" / "demo" / f"{modality}.yaml").read_text())
    raw.update(
        {
            "name": f"{modality}-test",
            "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
            "resolutions": [32, 64],
            "probes": [probe],
            "metrics": {"bootstrap": {"resamples": 200, "level": 0.95, "seed": 0}},
            "tracking": {"uri": f"sqlite:///{tmp}/mlruns.db"},
            "storage": {"path": str(tmp / "store")},
            "ray": {"num_cpus": 2},
        }
    )
    raw["dataset"]["phantom"].update({"image_size": 64, "depth": 8, **phantom})
    return raw


def _children(out):
    client = MlflowClient(out.tracking_uri)
    runs = client.search_runs([out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    return client, runs


def _predictions(client, run_id: str) -> pd.DataFrame:
    path = client.download_artifacts(run_id, "predictions/test.csv")
    return pd.read_csv(path, dtype={"sample_id": str, "patient_id": str})


@pytest.fixture(scope="module")
def mri(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("mri")
    probe = {
        "kind": "segmentation",
        "head": "conv",
        "n_classes": 4,
        "steps": 60,
        "batch_size": 4,
        "learning_rates": [0.01],
        "hidden_dim": 32,
    }
    raw = _spec(tmp, "mri", probe, n_patients=34)  # 10 test patients: enough units for an interval
    raw["resolutions"] = [64, 96]  # 4x4 and 6x6 token grids
    spec = parse_spec(raw)
    return tmp, spec, run_sweep(spec, project_dir=tmp, quiet=True)


def test_mri_segmentation_sweep_logs_dice_with_patient_intervals(mri):
    tmp, spec, out = mri
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 2
    client, runs = _children(out)
    assert len(runs) == 2
    parent = client.get_run(out.parent_run_id)
    assert (
        parent.data.tags["dinoscale.headline"] == "test_dice" and parent.data.tags["dinoscale.headline_goal"] == "max"
    )
    test_ids = out.plan.dataset.split("test")["sample_id"].astype(str).tolist()
    for run in runs:
        m = run.data.metrics
        assert m["test_dice_ci_low"] <= m["test_dice"] <= m["test_dice_ci_high"]
        assert 0.0 <= m["test_dice"] <= 1.0 and "val_dice" in m and m["test_hd95_mm"] > 0
        assert 0 <= m["test_detection_rate"] <= 1 and m["test_fp_volume_ml"] >= 0 and m["test_fn_volume_ml"] >= 0
        # the ventricles are large and dark: even random features and a small decoder find them
        assert m["test_dice_ventricles"] > 0.3
        preds = _predictions(client, run.info.run_id)
        assert preds["sample_id"].tolist() == test_ids  # one row per test volume
        assert {"dice", "hd95_mm", "dice_ventricles", "detection_rate", "fp_volume_ml"} <= set(preds.columns)
        assert np.nanmean(preds["dice"]) == pytest.approx(m["test_dice"], abs=1e-9)
        assert run.data.params["probe"] == "segmentation" and run.data.tags["data.source"] == "phantom"
    # per-slice patch grids: every feature set has one row per slice of every volume
    ds = out.plan.dataset
    assert {f.view for f in out.plan.feature_sets} == {"slices"}
    for fs in out.plan.feature_sets:
        assert fs.n_slices == int(ds.split(fs.split)["n_slices"].sum())
    assert out.report_dir is not None and (out.report_dir / "dice_vs_resolution.png").exists()


def test_resumed_segmentation_sweep_extracts_and_evaluates_nothing_again(mri):
    tmp, spec, first = mri
    again = run_sweep(spec, project_dir=tmp, quiet=True, analyze=False)
    assert again.extraction.feature_sets_extracted == 0
    assert sum(r["reused"] for r in again.rows) == 0  # a new sweep: evaluated again, but from cached features
    assert {r["cell"]: round(r["metric"], 6) for r in again.rows} == {
        r["cell"]: round(r["metric"], 6) for r in first.rows
    }
