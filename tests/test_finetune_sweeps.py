"""lora / full beyond 2D classification: real sweeps (Ray Tune, SQLite MLflow, MONAI readers, timm demo-ladder
backbone with random weights), kept tiny. A fine-tuning search killed and resumed is checked in the killed sweep
of tests/test_orchestration.py (test_killed_driver_resumes_without_redoing_or_duplicating)."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dinoscale import record
from dinoscale.spec import parse_spec
from dinoscale.sweep.plan import NotRunnableError, build_plan, check_runnable
from dinoscale.sweep.runner import run_sweep

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _demo(tmp_path, name: str, **overrides) -> dict:
    raw = yaml.safe_load(open(ROOT / "sweeps" / "demo" / f"{name}.yaml"))
    raw.update(
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32],
        tracking={"uri": f"sqlite:///{tmp_path}/mlruns.db"},
        storage={"path": str(tmp_path / "store")},
        # intervals over as few as 3 test patients: these sweeps are kept tiny (the default refuses under 10)
        metrics={"bootstrap": {"resamples": 200}, "min_interval_units": 3},
        search={"n_trials": 2},
        **overrides,
    )
    return raw


def _children(client, exp_id, parent_id):
    return client.search_runs([exp_id], f"tags.`{record.PARENT_RUN_ID}` = '{parent_id}'", max_results=1000)


def _one_cell(out):
    client = MlflowClient(out.tracking_uri)
    (cell,) = _children(client, out.experiment_id, out.parent_run_id)
    configs = _children(client, out.experiment_id, cell.info.run_id)
    return cell, configs


def test_lora_cell_on_ct_volumes_adapts_the_slice_encoder(tmp_path, ray_local):
    """3D classification: every slice of a volume through the LoRA-adapted encoder, slice features pooled
    per volume (the frozen volumes view's pooling), scored per volume with a patient-level interval."""
    raw = _demo(tmp_path, "ct", strategies=["lora"], features={"volume_pool": "mean"})
    raw["dataset"]["phantom"].update(n_patients=16, depth=8)
    raw["finetuning"] = {"lora": {"epochs": 1, "batch_size": 4, "rank": 4}}
    out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True, analyze=False)
    assert [r["state"] for r in out.rows] == ["FINISHED"]
    assert out.extraction.feature_sets_extracted == 0  # lora cells read images, not cached features
    cell, configs = _one_cell(out)
    m = cell.data.metrics
    assert m["test_macro_auroc_ci_low"] <= m["test_macro_auroc"] <= m["test_macro_auroc_ci_high"]
    assert m["n_test"] == (out.plan.dataset.manifest["split"] == "test").sum()  # one unit per volume
    assert cell.data.params["head.volume_pool"] == "mean" and len(configs) == 2
    assert {c.data.tags[record.CONFIGURATION_STATE] for c in configs} <= {"complete", "stopped"}
    preds = client_download(out, cell, tmp_path)
    assert len(preds.splitlines()) == 1 + m["n_test"]


def client_download(out, run, tmp_path) -> str:
    path = MlflowClient(out.tracking_uri).download_artifacts(run.info.run_id, record.PREDICTIONS, str(tmp_path))
    return Path(path).read_text()


def test_lora_cell_on_mri_segmentation_adapts_the_encoder_under_the_decoder(tmp_path, ray_local):
    """Segmentation: the patch-token grid of every slice from the adapted encoder, the spec's segmentation
    head on top, Dice per volume with its interval; the frozen cell of the same backbone pairs with it."""
    raw = _demo(tmp_path, "mri", strategies=["frozen", "lora"])
    raw["dataset"]["phantom"].update(n_patients=12, depth=8)
    raw["probes"] = [{"kind": "segmentation", "head": "conv", "n_classes": 4, "steps": 6, "batch_size": 2, "crop": 32}]
    raw["finetuning"] = {"lora": {"epochs": 1, "batch_size": 2, "rank": 4}}
    out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True, analyze=False)
    assert {r["strategy"]: r["state"] for r in out.rows} == {"frozen": "FINISHED", "lora": "FINISHED"}
    assert {r["probe"] for r in out.rows} == {"segmentation"}  # the lora cell trains the same head: a pair
    lora = next(c for c in out.plan.cells if c.strategy == "lora")
    assert lora.finetune_head == {"probe": "segmentation", "head": "conv", "n_classes": 4, "hidden_dim": 64}
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(next(r for r in out.rows if r["strategy"] == "lora")["mlflow_run_id"])
    m = run.data.metrics
    assert 0.0 <= m["test_dice_ci_low"] <= m["test_dice"] <= m["test_dice_ci_high"] <= 1.0
    assert 0.0 <= m["val_dice"] <= 1.0 and m[record.SEARCH_CONFIGURATIONS] == 2
    preds = client_download(out, run, tmp_path)
    assert preds.splitlines()[0].startswith("sample_id,patient_id") and "dice" in preds.splitlines()[0]


@pytest.mark.parametrize(
    "demo, why",
    [
        ("wsi", "is a mil dataset"),
        ("em", "the tasks they can train on are multilabel, multiclass, video_frames, segmentation"),
        ("petct", "fuses extra input channels \\['pet'\\]"),
    ],
)
def test_fine_tuning_where_it_cannot_train_is_refused_before_anything_runs(tmp_path, demo, why):
    raw = _demo(tmp_path, demo, strategies=["frozen", "lora"])
    plan = build_plan(parse_spec(raw), tmp_path)
    with pytest.raises(NotRunnableError, match=rf"strategies \['lora'\] .*{why}.* Use strategies: \[frozen\]"):
        check_runnable(plan)
