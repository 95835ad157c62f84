"""Frozen, LoRA and full cells in one sweep at equal search budget, on a Ray with 2 declared GPUs (Ray
schedules them; torch trains on the CPU here, ENVIRONMENT.md): every lora / full configuration is a Tune
trial asking for a whole GPU, stopped early by ASHA within its cell, recorded sweep -> cell -> configuration."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_spec_dict
from dinoscale import record
from dinoscale.spec import parse_spec
from dinoscale.sweep.runner import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_with_two_gpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _children(client, exp_id, parent_id):
    return client.search_runs([exp_id], f"tags.`{record.PARENT_RUN_ID}` = '{parent_id}'", max_results=1000)


def test_frozen_lora_and_full_cells_search_at_equal_budget_with_configurations_on_gpus(tmp_path, ray_with_two_gpus):
    raw = tiny_spec_dict(
        tmp_path,
        strategies=["frozen", "lora", "full"],
        resolutions=[32],
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        probes=[{"kind": "linear", "epochs": 20}],
        search={"n_trials": 3},
        resources={"cpus_per_trial": 1, "gpus_per_training_trial": 1},
        # val holds 7 patients: its interval (asserted below) needs the floor lowered from the default 10
        metrics={"bootstrap": {"resamples": 200, "level": 0.95, "seed": 0}, "min_interval_units": 5},
    )
    raw["finetuning"] = {
        "lora": {"epochs": 3, "batch_size": 16, "rank": 4, "patience": None},
        "full": {"epochs": 3, "batch_size": 16, "patience": None},
        "early_stopping": {"reduction_factor": 2},
    }
    out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True, analyze=False)
    by_strategy = {r["strategy"]: r for r in out.rows if r["probe"] == "linear"}  # lora / full train a linear head
    assert {r["state"] for r in out.rows} == {"FINISHED"} and set(by_strategy) == {"frozen", "lora", "full"}
    client = MlflowClient(out.tracking_uri)
    cells = _children(client, out.experiment_id, out.parent_run_id)
    assert len(cells) == 3 and {c.data.tags[record.ROLE] for c in cells} == {"cell"}
    runs = {c.data.params["strategy"]: c for c in cells}
    assert runs["frozen"].data.metrics["search_trials"] == 3  # the frozen probe's Optuna budget
    lora, full = runs["lora"].data.metrics, runs["full"].data.metrics
    assert 0 < lora["trainable_params"] < 0.2 * full["trainable_params"]  # adapters + head only
    assert runs["lora"].data.params["lora.rank"] == "4" and runs["lora"].data.params["search.budget"] == "3"
    spans = []
    for strategy in ("lora", "full"):
        cell = runs[strategy]
        configs = _children(client, out.experiment_id, cell.info.run_id)  # the third level
        assert len(configs) == 3 and {c.data.tags[record.ROLE] for c in configs} == {"configuration"}
        assert len({c.data.tags[record.TRIAL_KEY] for c in configs}) == 3
        assert sorted(c.data.tags[record.CONFIGURATION] for c in configs) == ["0", "1", "2"]
        best = {}
        for c in configs:
            state, m = c.data.tags[record.CONFIGURATION_STATE], c.data.metrics
            assert state in ("complete", "stopped") and c.data.tags[record.EVALUATIONS] == "1"
            assert c.data.tags["data.source"] == "phantom" and c.data.tags["weights.kind"] == "random"
            history = client.get_metric_history(c.info.run_id, record.SELECTION_VALUE)
            steps = [h.step for h in history]
            assert steps == list(range(1, int(m[record.EPOCHS_RUN]) + 1))  # one val metric per epoch trained
            if state == "stopped":  # lost at a rung (epoch 1 or 2 of 3) and trained no further
                assert c.info.status == "KILLED" and int(c.data.tags[record.STOPPED_AT_EPOCH]) in (1, 2)
                assert m[record.EPOCHS_RUN] == int(c.data.tags[record.STOPPED_AT_EPOCH])
                # Tune ended its trial (the driver recorded the stop) seconds after that epoch, not epochs later
                assert c.info.end_time - max(h.timestamp for h in history) < 30_000
            else:
                assert c.info.status == "FINISHED" and m[record.EPOCHS_RUN] == 3
            assert m["lr"] == float(c.data.params["lr"])  # searched values as metrics too (MLflow sorts params as text)
            best[c.data.tags[record.CONFIGURATION]] = m[record.BEST_SELECTION_VALUE]
            spans.append((c.info.start_time, c.info.end_time))
        chosen = cell.data.tags[record.SELECTED_CONFIGURATION]
        assert best[chosen] == max(best.values())  # selected on val
        m = cell.data.metrics
        assert m["val_macro_auroc"] == pytest.approx(best[chosen])
        assert m["val_macro_auroc_ci_low"] <= m["val_macro_auroc"] <= m["val_macro_auroc_ci_high"]
        assert m["test_macro_auroc_ci_low"] <= m["test_macro_auroc"] <= m["test_macro_auroc_ci_high"]
        assert m[record.SEARCH_CONFIGURATIONS] == 3 and m[record.CONFIGURATION_EPOCHS_BUDGET] == 9
        assert m[record.CONFIGURATION_EPOCHS] == sum(c.data.metrics[record.EPOCHS_RUN] for c in configs)
        assert cell.data.tags[record.SELECTED_RUN] in {c.info.run_id for c in configs}
        assert cell.data.tags[f"{record.SELECTED_PREFIX}lr"] == repr(cell.data.metrics["selected_lr"])
        table = client.download_artifacts(cell.info.run_id, record.SEARCH_TABLE, str(tmp_path / strategy))
        assert sum(1 for _ in open(table)) == 4
    # configurations ran side by side on the two GPUs, never more than two at once (one GPU each)
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) == 2
    # checkpoints under the storage path, keyed by trial key and configuration, compacted once finished
    ckpts = sorted((tmp_path / "store" / "checkpoints").glob("*/c*/finetune_state.pt"))
    assert len(ckpts) == 6
    assert all(torch.load(p, weights_only=True)["final"] for p in ckpts)
