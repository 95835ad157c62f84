"""Orchestration under failure, with real Ray (several raylets) and real MLflow stores/servers."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import free_port, tiny_spec_dict
from dinoscale import record
from dinoscale.spec import parse_spec
from dinoscale.sweep.runner import run_sweep

pytestmark = pytest.mark.slow


def _children(client, exp_id, parent_id):
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)


def _finished_children(uri, experiment="dinoscale-xray-test"):  # tiny_spec_dict's spec name
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs(
            [exp.experiment_id], "tags.`dinoscale.role` = 'cell' and attributes.status = 'FINISHED'", max_results=1000
        )
    except Exception:  # the store may not exist yet
        return []


@pytest.fixture
def three_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_three_node_cluster_spreads_trials_and_survives_losing_a_worker(tmp_path, three_node_cluster):
    cluster, workers = three_node_cluster
    spec = parse_spec(tiny_spec_dict(tmp_path, seeds=[0, 1, 2]))  # 24 cells
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    killed = {}

    def kill_a_worker_mid_sweep():
        deadline = time.time() + 300
        while time.time() < deadline and len(_finished_children(uri)) < 6:
            time.sleep(0.5)
        killed["node_id"] = workers[1].node_id
        killed["finished_before"] = len(_finished_children(uri))
        cluster.remove_node(workers[1], allow_graceful=False)

    t = threading.Thread(target=kill_a_worker_mid_sweep, daemon=True)
    t.start()
    out = run_sweep(spec, project_dir=tmp_path, address=cluster.address, quiet=True, analyze=False)
    t.join(10)
    assert "node_id" in killed and killed["finished_before"] < 24, "the worker must be killed while the sweep runs"
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 24
    client = MlflowClient(out.tracking_uri)
    children = _children(client, out.experiment_id, out.parent_run_id)
    assert len(children) == 24
    assert len({c.data.tags["dinoscale.trial_key"] for c in children}) == 24
    nodes = {c.data.tags["ray.node_id"] for c in children}
    assert len(nodes) == 3, f"trials landed on {len(nodes)} of 3 nodes"
    assert killed["node_id"] in nodes


def _write_spec(tmp_path, **overrides) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path, **overrides)))
    return str(path)


def _config_runs(uri: str) -> list:
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("dinoscale-xray-test")  # tiny_spec_dict's spec name
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], f"tags.`{record.ROLE}` = 'configuration'", max_results=1000)
    except Exception:  # the store may not exist yet
        return []


def _killed_part_way(uri: str) -> bool:
    """Both frozen cells finished, and in the lora cell's search one configuration finished and the next one
    part-way (an epoch logged, none decided at a rung yet)."""
    runs = _config_runs(uri)
    states = [r.data.tags.get(record.CONFIGURATION_STATE) for r in runs]
    part_way = [
        r
        for r in runs
        if r.data.tags.get(record.CONFIGURATION_STATE) == "running" and 1 <= r.data.metrics.get(record.EPOCH, 0) < 3
    ]
    return "complete" in states and bool(part_way) and len(_finished_children(uri)) >= 2


def test_killed_driver_resumes_without_redoing_or_duplicating(tmp_path, ray_local):
    """A sweep process is killed (SIGKILL, with the Ray it started) once its frozen cells have finished and the
    lora cell's search has finished its first configuration and the next one is part-way (grace 3 epochs: the
    kill lands before a rung is decided). The resumed sweep runs only what was left: no cell or configuration
    run twice or duplicated, no feature set extracted again, the part-way configuration from its checkpoint.
    (The cells run one at a time, frozen before lora: resources.cell_order 'cheapest'.)"""
    raw = dict(
        strategies=["frozen", "lora"],
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32],
        search={"n_trials": 3},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )
    # two epochs before the first rung (grace 3): the kill lands on a configuration part-way even on a fast machine
    raw["finetuning"] = {
        "lora": {"epochs": 4, "batch_size": 16, "rank": 4, "patience": None},
        "early_stopping": {"grace_epochs": 3, "reduction_factor": 3},
    }
    spec_path = _write_spec(tmp_path, **raw)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "dinoscale.cli", "sweep", spec_path, "--no-analysis"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and not _killed_part_way(uri):
            time.sleep(0.2)
        assert driver.poll() is None, "the driver ended before it could be killed"
        finished_before = {r.data.tags[record.TRIAL_KEY] for r in _finished_children(uri)}
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die together
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert len(finished_before) == 2  # the frozen linear and k-NN cells; the lora cell is not finished
    before = {r.data.tags[record.TRIAL_KEY]: r for r in _config_runs(uri)}
    configs_done = {k: r for k, r in before.items() if r.data.tags[record.CONFIGURATION_STATE] != "running"}
    assert 1 <= len(configs_done) < 3

    spec = parse_spec(tiny_spec_dict(tmp_path, **raw))
    out = run_sweep(spec, project_dir=tmp_path, quiet=True, analyze=False, resume=True)
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 3
    client = MlflowClient(out.tracking_uri)
    parents = client.search_runs([out.experiment_id], "tags.`dinoscale.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["dinoscale.resumes"] == "1"
    children = _children(client, out.experiment_id, out.parent_run_id)
    keys = [c.data.tags["dinoscale.trial_key"] for c in children]
    assert len(keys) == 3 and len(set(keys)) == 3  # no cell has two child runs
    for c in children:
        if c.data.tags["dinoscale.trial_key"] in finished_before:
            assert c.data.tags["dinoscale.evaluations"] == "1", f"{c.data.tags['dinoscale.cell']} was rerun"
    extracted = [m.value for m in client.get_metric_history(out.parent_run_id, "extraction_feature_sets_extracted")]
    assert sum(extracted) == 3 and extracted[-1] == 0  # no feature set extracted twice
    _check_the_search_resumed(out, before, configs_done)


def _check_the_search_resumed(out, before: dict, configs_done: dict) -> None:
    """The lora cell's search: one run per configuration, the finished ones not trained again, the part-way one
    continued from its checkpoint, every epoch trained once."""
    client = MlflowClient(out.tracking_uri)
    after = _config_runs(out.tracking_uri)
    keys = [r.data.tags[record.TRIAL_KEY] for r in after]
    assert len(keys) == 3 and len(set(keys)) == 3  # one run per configuration, none duplicated
    by_key = {r.data.tags[record.TRIAL_KEY]: r for r in after}
    for key, r in configs_done.items():  # not trained again
        assert by_key[key].data.tags[record.EVALUATIONS] == "1"
        assert by_key[key].info.end_time == r.info.end_time
    for r in after:
        assert r.data.tags[record.CONFIGURATION_STATE] in ("complete", "stopped")
        epochs = [h.step for h in client.get_metric_history(r.info.run_id, record.SELECTION_VALUE)]
        assert epochs == list(range(1, int(r.data.metrics[record.EPOCHS_RUN]) + 1))  # each epoch trained once
    interrupted = [k for k, r in before.items() if r.data.tags[record.CONFIGURATION_STATE] == "running"]
    assert interrupted
    for key in interrupted:  # the configuration the kill interrupted continued from its checkpoint
        assert by_key[key].data.tags[record.EVALUATIONS] == "2"
    lora = next(r for r in out.rows if r["strategy"] == "lora")
    cell = client.get_run(lora["mlflow_run_id"])
    assert cell.data.metrics[record.SEARCH_CONFIGURATIONS] == 3 and "test_macro_auroc" in cell.data.metrics


def test_resume_refuses_a_changed_spec(tmp_path, ray_local):
    from dinoscale.sweep.state import ResumeError

    spec = parse_spec(tiny_spec_dict(tmp_path))
    with pytest.raises(ResumeError, match="no sweep named 'xray-test' to resume"):
        run_sweep(spec, project_dir=tmp_path, quiet=True, resume=True)
    run_sweep(spec, project_dir=tmp_path, quiet=True, analyze=False)
    with pytest.raises(ResumeError, match="already finished"):
        run_sweep(spec, project_dir=tmp_path, quiet=True, resume=True)
    changed = parse_spec(tiny_spec_dict(tmp_path, resolutions=[32]))
    with pytest.raises(ResumeError, match="spec of 'xray-test' changed"):
        run_sweep(changed, project_dir=tmp_path, quiet=True, resume=True)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.time() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _rest(url, endpoint, body):
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_sweep_against_a_real_mlflow_server_over_http(tmp_path, mlflow_server, ray_local):
    spec = parse_spec(tiny_spec_dict(tmp_path, tracking={"uri": mlflow_server}))
    out = run_sweep(spec, project_dir=tmp_path, quiet=True)
    assert out.tracking_uri == mlflow_server
    exp = json.loads(
        urllib.request.urlopen(
            f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name={spec.experiment_name}"
        ).read()
    )
    exp_id = exp["experiment"]["experiment_id"]
    runs = _rest(
        mlflow_server,
        "runs/search",
        {
            "experiment_ids": [exp_id],
            "max_results": 100,
            "filter": f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'",
        },
    )["runs"]
    assert len(runs) == 8
    for r in runs:
        metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in r["data"]["params"]}
        tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == out.parent_run_id and r["info"]["status"] == "FINISHED"
        assert metrics["resolution"] == float(params["resolution"]) and metrics["n_params"] == float(params["n_params"])
        assert "test_macro_auroc_ci_low" in metrics
    # artifacts went through the server's proxy
    listing = json.loads(
        urllib.request.urlopen(
            f"{mlflow_server}/api/2.0/mlflow/artifacts/list?run_id={runs[0]['info']['run_id']}&path=predictions"
        ).read()
    )
    assert [f["path"] for f in listing["files"]] == ["predictions/test.csv"]
