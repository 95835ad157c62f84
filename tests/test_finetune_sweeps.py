"""lora / full beyond 2D classification, and a fine-tuning search interrupted and resumed: real sweeps (Ray
Tune, SQLite MLflow, MONAI readers, timm demo-ladder backbone with random weights), kept tiny."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import tiny_spec_dict
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


# ---------------------------------------------------------------- interrupted and resumed


def _config_runs(uri: str) -> list:
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("dinoscale-xray-test")  # tiny_spec_dict's spec name
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], f"tags.`{record.ROLE}` = 'configuration'", max_results=1000)
    except Exception:  # the store may not exist yet
        return []


def test_interrupted_search_resumes_without_rerunning_or_duplicating_configurations(tmp_path, ray_local):
    """A sweep process is killed (SIGKILL, with the Ray it started) once its first configuration has
    finished and the next one is part-way (an epoch logged, none decided at a rung yet: grace 3 epochs);
    the resumed sweep trains only what was left, the part-way configuration from its checkpoint, and
    every configuration has one run."""
    raw = tiny_spec_dict(
        tmp_path,
        strategies=["lora"],
        resolutions=[32],
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        probes=[{"kind": "linear"}],
        search={"n_trials": 3},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )
    # two epochs before the first rung (grace 3): the kill lands on a configuration part-way even on a fast machine
    raw["finetuning"] = {
        "lora": {"epochs": 4, "batch_size": 16, "rank": 4, "patience": None},
        "early_stopping": {"grace_epochs": 3, "reduction_factor": 3},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    driver = subprocess.Popen(
        [sys.executable, "-m", "dinoscale.cli", "sweep", str(spec_path), "--no-analysis"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            runs = _config_runs(uri)
            states = [r.data.tags.get(record.CONFIGURATION_STATE) for r in runs]
            part_way = [
                r
                for r in runs
                if r.data.tags.get(record.CONFIGURATION_STATE) == "running"
                and 1 <= r.data.metrics.get(record.EPOCH, 0) < 3
            ]
            if "complete" in states and part_way:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the sweep ended before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die together
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = {r.data.tags[record.TRIAL_KEY]: r for r in _config_runs(uri)}
    finished_before = {k: r for k, r in before.items() if r.data.tags[record.CONFIGURATION_STATE] != "running"}
    assert 1 <= len(finished_before) < 3

    out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True, analyze=False, resume=True)
    assert [r["state"] for r in out.rows] == ["FINISHED"]
    after = _config_runs(out.tracking_uri)
    keys = [r.data.tags[record.TRIAL_KEY] for r in after]
    assert len(keys) == 3 and len(set(keys)) == 3  # one run per configuration, none duplicated
    by_key = {r.data.tags[record.TRIAL_KEY]: r for r in after}
    for key, r in finished_before.items():  # not trained again
        assert by_key[key].data.tags[record.EVALUATIONS] == "1"
        assert by_key[key].info.end_time == r.info.end_time
    for r in after:
        assert r.data.tags[record.CONFIGURATION_STATE] in ("complete", "stopped")
        epochs = client_history(out.tracking_uri, r.info.run_id)
        assert epochs == list(range(1, int(r.data.metrics[record.EPOCHS_RUN]) + 1))  # each epoch trained once
    interrupted = [k for k, r in before.items() if r.data.tags[record.CONFIGURATION_STATE] == "running"]
    assert interrupted
    for key in interrupted:  # the configuration the kill interrupted continued from its checkpoint
        assert by_key[key].data.tags[record.EVALUATIONS] == "2"
    cell = MlflowClient(out.tracking_uri).get_run(out.rows[0]["mlflow_run_id"])
    assert cell.data.metrics[record.SEARCH_CONFIGURATIONS] == 3 and "test_macro_auroc" in cell.data.metrics


def client_history(uri: str, run_id: str) -> list[int]:
    return [h.step for h in MlflowClient(uri).get_metric_history(run_id, record.SELECTION_VALUE)]
