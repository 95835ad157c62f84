"""How fine-tuning configurations share GPUs: a Ray with 2 declared GPUs (Ray schedules them; torch trains on
the CPU here, ENVIRONMENT.md), each configuration asking for a whole one."""

import pytest
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


def test_configurations_run_side_by_side_on_idle_gpus_and_a_stopped_one_frees_its_gpu(tmp_path, ray_with_two_gpus):
    raw = tiny_spec_dict(
        tmp_path,
        strategies=["lora"],
        resolutions=[32],
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        probes=[{"kind": "linear"}],
        search={"n_trials": 6},
        resources={"cpus_per_trial": 1, "gpus_per_training_trial": 1},
    )
    raw["finetuning"] = {
        "lora": {"epochs": 4, "batch_size": 16, "rank": 4, "patience": None},
        "early_stopping": {"grace_epochs": 1, "reduction_factor": 2},
    }
    out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True, analyze=False)
    assert [r["state"] for r in out.rows] == ["FINISHED"]
    client = MlflowClient(out.tracking_uri)
    configs = client.search_runs(
        [out.experiment_id], f"tags.`{record.ROLE}` = 'configuration'", order_by=["attributes.start_time ASC"]
    )
    assert len(configs) == 6
    spans = [(r.info.start_time, r.info.end_time) for r in configs]
    # configurations of the one cell ran side by side on the two GPUs, never more than two at once
    overlaps = [max(sum(s <= t < e for s, e in spans) for t in (s for s, _ in spans))]
    assert overlaps == [2]
    stopped = [r for r in configs if r.data.tags[record.CONFIGURATION_STATE] == "stopped"]
    assert stopped, "ASHA (top half continue) stops some of 6 configurations"
    for r in stopped:
        assert int(r.data.tags[record.STOPPED_AT_EPOCH]) < 4 and r.data.metrics[record.EPOCHS_RUN] < 4
    # a stopped configuration trained no further: nothing logged after the rung it lost at, and Tune ended its
    # trial (the driver's record of the stop) seconds after that epoch, not after its remaining epochs
    for r in stopped:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, record.SELECTION_VALUE)]
        assert steps == list(range(1, int(r.data.tags[record.STOPPED_AT_EPOCH]) + 1))
        last = max(m.timestamp for m in client.get_metric_history(r.info.run_id, record.SELECTION_VALUE))
        assert r.info.end_time - last < 30_000
    # and its GPU went to a configuration that was waiting for one
    assert any(s >= min(r.info.end_time for r in stopped) for s, _ in spans)
