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


def test_killed_driver_resumes_without_redoing_or_duplicating(tmp_path, ray_local):
    raw = dict(seeds=[0, 1, 2], resources={"cpus_per_trial": 1, "max_concurrent_trials": 1})
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
        deadline = time.time() + 400
        while time.time() < deadline and len(_finished_children(uri)) < 4 and driver.poll() is None:
            time.sleep(0.3)
        assert driver.poll() is None, "the driver ended before it could be killed"
        finished_before = {r.data.tags["dinoscale.trial_key"] for r in _finished_children(uri)}
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die together
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert 4 <= len(finished_before) < 24

    spec = parse_spec(tiny_spec_dict(tmp_path, **raw))
    out = run_sweep(spec, project_dir=tmp_path, quiet=True, analyze=False, resume=True)
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 24
    client = MlflowClient(out.tracking_uri)
    parents = client.search_runs([out.experiment_id], "tags.`dinoscale.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["dinoscale.resumes"] == "1"
    children = _children(client, out.experiment_id, out.parent_run_id)
    keys = [c.data.tags["dinoscale.trial_key"] for c in children]
    assert len(keys) == 24 and len(set(keys)) == 24  # no cell has two child runs
    for c in children:
        if c.data.tags["dinoscale.trial_key"] in finished_before:
            assert c.data.tags["dinoscale.evaluations"] == "1", f"{c.data.tags['dinoscale.cell']} was rerun"
    extracted = [m.value for m in client.get_metric_history(out.parent_run_id, "extraction_feature_sets_extracted")]
    assert sum(extracted) == 12 and extracted[-1] == 0  # no feature set extracted twice


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
