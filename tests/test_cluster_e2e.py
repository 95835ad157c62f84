"""The cluster path end to end, on loopback, with real processes and no mocks.

What a cloud cluster does, in miniature: a Ray head plus two worker nodes started with `ray start`
(token authentication on, as on the cloud), the MLflow tracking server started by
cluster/mlflow/run-server.sh with the settings of cluster/cluster.env on a real PostgreSQL backend
store (credentials from the environment, as cluster/ deploys it), called with the Host header the
cluster uses; a demo sweep submitted with `ray job submit` whose nested runs are then read back over
the REST API; and the Makefile's job-client targets (`make cluster-status`, `make cluster-check`)
run against that cluster with only RAY_AUTH_TOKEN exported.
Every process started here is stopped by its process group, even when a test fails; nothing else
on the machine is touched (no global `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import tiny_spec_dict

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# Debian installs the server binaries off PATH, under /usr/lib/postgresql/<major>/bin
PG_BIN = Path(
    os.environ.get("PG_BIN")
    or max(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        default=Path("/nonexistent"),
    )
)
MLFLOW_USER, MLFLOW_PASSWORD = "admin", "e2e-" + secrets.token_hex(8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_tool(name: str) -> str:
    path = PG_BIN / name if (PG_BIN / name).exists() else shutil.which(name)
    if not path:
        msg = f"PostgreSQL's {name} not found (apt-get install -y postgresql; or set PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs it (.ci/run): a skip there would hide a missing install step
        pytest.skip(msg)
    return str(path)


class Processes:
    """Processes this module started, each in its own session so its whole group can be stopped."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.procs = log_dir, []

    def start(self, name: str, cmd: list[str], env: dict, **kw) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        f = self.log_dir / f"{name}.log"
        return f.read_text(errors="replace")[-4000:] if f.exists() else ""

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            _kill_group(p.pid, signal.SIGTERM)
        deadline = time.time() + 15
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(p.pid, signal.SIGKILL)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_leftovers(marker: str) -> None:
    """Ray may start helpers in sessions of their own: stop any process whose command line names
    this module's private temp dir (and only those)."""
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _wait_for(what: str, check, timeout: float, procs: Processes, name: str) -> None:
    """Poll until ready; fail at once (with the process's log) if it died."""
    proc = dict(procs.procs)[name]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}\n{procs.log(name)}")
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout:.0f}s\n{procs.log(name)}")


@pytest.fixture(scope="module")
def sandbox():
    """A private folder (PostgreSQL refuses to run as root, so it is writable by the postgres user
    when we are root) and the registry of started processes, all cleaned up at the end."""
    root = Path(tempfile.mkdtemp(prefix="dinoscale-cluster-e2e-"))
    os.chmod(root, 0o755)
    (root / "logs").mkdir()
    procs = Processes(root / "logs")
    try:
        yield root, procs
    finally:
        procs.stop_all()
        _kill_leftovers(str(root))
        if os.environ.get("DINOSCALE_KEEP_E2E"):
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        msg = "running as root without runuser: cannot start PostgreSQL as an unprivileged user"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return [runuser, "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres(sandbox):
    """A throw-away PostgreSQL cluster on a free loopback port with password (scram) auth."""
    root, procs = sandbox
    initdb, postgres_bin, psql = _pg_tool("initdb"), _pg_tool("postgres"), _pg_tool("psql")
    data, sock = root / "pg", root / "pgsock"
    sock.mkdir()
    pw = "pg-" + secrets.token_hex(8)
    pwfile = root / "pgpass.txt"
    pwfile.write_text(pw + "\n")
    if os.geteuid() == 0:
        shutil.chown(sock, "postgres")
        shutil.chown(pwfile, "postgres")
        data.mkdir()
        shutil.chown(data, "postgres")
    subprocess.run(
        _as_postgres_user(
            [
                initdb,
                "-D",
                str(data),
                "-U",
                "mlflow",
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    pwfile.unlink()
    port = _free_port()
    procs.start(
        "postgres",
        _as_postgres_user(
            [
                postgres_bin,
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(sock),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=50",
            ]
        ),
        env=dict(os.environ),
    )

    def ready():
        r = subprocess.run(
            [psql, "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "postgres", "-c", "select 1"],
            env={**os.environ, "PGPASSWORD": pw},
            capture_output=True,
            check=False,
        )
        return r.returncode == 0

    _wait_for("PostgreSQL", ready, 60, procs, "postgres")
    for db in ("mlflow", "mlflow_auth"):
        subprocess.run(
            [psql, "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "postgres", "-c", f"create database {db}"],
            env={**os.environ, "PGPASSWORD": pw},
            check=True,
            capture_output=True,
        )
    return {"port": port, "password": pw}


def _cluster_env() -> dict[str, str]:
    out = {}
    for line in (CLUSTER / "cluster.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


CLUSTER_HOST = _cluster_env()["DINOSCALE_TRACKING_URI"].split("://")[1].split("/")[0]  # mlflow.dinoscale.internal:5000


@pytest.fixture(scope="module")
def mlflow_server(sandbox, postgres):
    """The tracking server as cluster/ starts it: cluster/mlflow/run-server.sh (basic-auth app on
    PostgreSQL, its auth database rendered from MLFLOW_DB_HOST/PORT) with cluster.env's settings, the
    secrets from the environment, and the empty MLFLOW_S3_ENDPOINT_URL the old ConfigMap set. Only
    the listening address, the port and the worker count differ from the cluster's."""
    root, procs = sandbox
    port = _free_port()
    env = {
        **os.environ,
        **_cluster_env(),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PGPASSWORD": postgres["password"],
        "MLFLOW_DB_HOST": "127.0.0.1",
        "MLFLOW_DB_PORT": str(postgres["port"]),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_ARTIFACTS": (root / "mlartifacts").as_uri(),
        "MLFLOW_S3_ENDPOINT_URL": "",
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "TMPDIR": str(root),
    }
    for k in ("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS", "MLFLOW_AUTH_CONFIG_PATH"):
        env.pop(k, None)
    procs.start("mlflow", [str(CLUSTER / "mlflow" / "run-server.sh")], env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    _wait_for("MLflow server", healthy, 120, procs, "mlflow")
    return url


@pytest.fixture(scope="module")
def ray_cluster(sandbox, mlflow_server):
    """A Ray head (0 CPUs, like the cloud head) and two worker nodes (1 CPU each) joined over loopback, token auth on.
    MLflow credentials reach every Ray process through the nodes' environment, as on the cloud."""
    root, procs = sandbox
    temp = root / "ray"
    temp.mkdir()
    # the nodes' environment as cluster.env + with-secrets.sh give it (storage and tracking: this machine's)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
        "DINOSCALE_STORAGE": str(root / "shared-storage"),
        "DINOSCALE_TRACKING_URI": mlflow_server,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "OMP_NUM_THREADS": "1",
    }
    gcs, dash, client = _free_port(), _free_port(), _free_port()

    def node_ports():
        return [
            "--node-manager-port",
            str(_free_port()),
            "--object-manager-port",
            str(_free_port()),
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--dashboard-agent-grpc-port",
            str(_free_port()),
            "--runtime-env-agent-port",
            str(_free_port()),
            "--metrics-export-port",
            str(_free_port()),
        ]

    common = [
        "--num-gpus",
        "0",
        "--temp-dir",
        str(temp),
        "--object-store-memory",
        str(200 * 2**20),
        "--disable-usage-stats",
        "--block",
    ]
    # As on the cloud (cluster/launcher/*.yaml): the head runs the driver only (0 CPUs); the work
    # goes to the worker nodes.
    procs.start(
        "ray-head",
        [
            RAY,
            "start",
            "--head",
            "--num-cpus",
            "0",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--ray-client-server-port",
            str(client),
            *node_ports(),
            *common,
        ],
        env=env,
        cwd=root,
    )
    dashboard = f"http://127.0.0.1:{dash}"
    auth = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}

    def alive_nodes():
        try:
            r = requests.get(f"{dashboard}/nodes?view=summary", headers=auth, timeout=2)
            return sum(n["raylet"]["state"] == "ALIVE" for n in r.json()["data"]["summary"]) if r.ok else 0
        except (requests.RequestException, ValueError, KeyError):
            return 0

    _wait_for("Ray head", lambda: alive_nodes() >= 1, 90, procs, "ray-head")
    for i in (1, 2):
        procs.start(
            f"ray-worker-{i}",
            [
                RAY,
                "start",
                "--address",
                f"127.0.0.1:{gcs}",
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "1",
                *node_ports(),
                *common,
            ],
            env=env,
            cwd=root,
        )
        _wait_for(f"Ray worker node {i}", lambda i=i: alive_nodes() >= 1 + i, 90, procs, f"ray-worker-{i}")
    nodes = json.loads(
        subprocess.run(
            [RAY, "list", "nodes", "--address", dashboard, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    return {
        "gcs": f"127.0.0.1:{gcs}",
        "dashboard": dashboard,
        "env": env,
        "temp": temp,
        "client_port": client,
        "head_node": {n["node_id"] for n in nodes if n["is_head_node"]},
        "worker_nodes": {n["node_id"] for n in nodes if not n["is_head_node"]},
    }


def _rest(url: str, endpoint: str, body: dict, auth=(MLFLOW_USER, MLFLOW_PASSWORD)) -> requests.Response:
    return requests.post(f"{url}/api/2.0/mlflow/{endpoint}", json=body, auth=auth, timeout=30)


@pytest.fixture(scope="module")
def submitted_sweep(sandbox, ray_cluster, mlflow_server):
    """A tiny demo sweep submitted as a Ray job, the way `make cluster-submit` does it."""
    root, _ = sandbox
    job_dir = root / "job"
    job_dir.mkdir()
    spec = tiny_spec_dict(
        root,
        name="xray-cluster-e2e",
        resolutions=[32],
        tracking={"uri": "sqlite:///not-used-the-job-passes-the-server.db"},
        storage={"path": str(root / "shared-storage")},
        ray={},
    )
    spec["dataset"]["phantom"].update({"n_patients": 20, "images_per_patient": [2, 4], "image_size": 64})
    spec["probes"][0]["epochs"] = 10
    (job_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    job_id = "dinoscale-e2e-" + secrets.token_hex(4)
    # As in `make cluster-submit`: no --working-dir (the code is in the image; the runner ships it
    # with py_modules). A job working_dir combined with the runner's own runtime_env is garbage
    # collected while the driver still runs in it, and Tune then fails on os.getcwd().
    # `ray job submit` shell-quotes each word, hence one `sh -c` for the `cd && ...`.
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        ray_cluster["dashboard"],
        "--submission-id",
        job_id,
        "--",
        "sh",
        "-c",
        (
            f"cd {job_dir} && python -m dinoscale.cli sweep spec.yaml --address auto "
            f"--tracking-uri {mlflow_server} --no-analysis"
        ),
    ]
    t0 = time.time()
    sub = subprocess.run(cmd, env=ray_cluster["env"], capture_output=True, text=True, timeout=900, check=False)
    status = requests.get(
        f"{ray_cluster['dashboard']}/api/jobs/{job_id}",
        timeout=30,
        headers={"Authorization": f"Bearer {ray_cluster['env']['RAY_AUTH_TOKEN']}"},
    ).json()
    return {"spec": spec, "job_id": job_id, "submit": sub, "status": status, "seconds": time.time() - t0}


def test_job_succeeds_on_the_multi_node_cluster(submitted_sweep):
    s = submitted_sweep
    out = s["submit"].stdout[-6000:] + s["submit"].stderr[-3000:]
    assert s["submit"].returncode == 0, out
    assert s["status"]["status"] == "SUCCEEDED", f"{s['status']}\n{out}"
    assert s["status"]["entrypoint"].startswith("sh -c")
    assert "4/4 cells ok" in s["submit"].stdout + s["submit"].stderr, out


def test_tracking_server_requires_credentials(mlflow_server):
    r = requests.post(f"{mlflow_server}/api/2.0/mlflow/experiments/search", json={"max_results": 10}, timeout=10)
    assert r.status_code == 401
    assert (
        _rest(mlflow_server, "experiments/search", {"max_results": 10}, auth=(MLFLOW_USER, "wrong")).status_code == 401
    )


def test_nested_runs_are_in_the_postgres_backed_server(submitted_sweep, mlflow_server, ray_cluster):
    r = requests.get(
        f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "dinoscale-xray-cluster-e2e"},  # the spec's name (submitted_sweep)
        auth=(MLFLOW_USER, MLFLOW_PASSWORD),
        timeout=30,
    )
    assert r.ok, r.text
    exp_id = r.json()["experiment"]["experiment_id"]
    runs = _rest(mlflow_server, "runs/search", {"experiment_ids": [exp_id], "max_results": 100}).json().get("runs", [])
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parents = [(run, t) for run, t in zip(runs, tags) if t.get("dinoscale.role") == "sweep"]
    assert len(parents) == 1, [t.get("dinoscale.role") for t in tags]
    parent, ptags = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    assert ptags["dinoscale.demo"] == "true"
    pid = parent["info"]["run_id"]
    children = [(run, t) for run, t in zip(runs, tags) if t.get("mlflow.parentRunId") == pid]
    assert len(children) == 4  # 2 backbones x 1 resolution x 2 probes
    assert len({t["dinoscale.trial_key"] for _, t in children}) == 4
    for run, t in children:
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert 0.0 <= metrics["test_macro_auroc"] <= 1.0
        assert t["data.source"] == "phantom" and t["weights.kind"] == "random"
    # the trials ran on the worker nodes (not beside the driver on the head) and logged from there
    assert len(ray_cluster["worker_nodes"]) == 2 and len(ray_cluster["head_node"]) == 1
    assert {t["ray.node_id"] for _, t in children} <= ray_cluster["worker_nodes"]
    arts = requests.get(
        f"{mlflow_server}/api/2.0/mlflow/artifacts/list",
        params={"run_id": pid},
        auth=(MLFLOW_USER, MLFLOW_PASSWORD),
        timeout=30,
    )
    assert arts.ok and any(f["path"].startswith("spec") for f in arts.json().get("files", [])), arts.text


def test_cluster_was_multi_node_and_storage_is_the_spec_path(submitted_sweep, ray_cluster, sandbox):
    root, _ = sandbox
    r = requests.get(
        f"{ray_cluster['dashboard']}/nodes?view=summary",
        headers={"Authorization": f"Bearer {ray_cluster['env']['RAY_AUTH_TOKEN']}"},
        timeout=10,
    )
    assert sum(n["raylet"]["state"] == "ALIVE" for n in r.json()["data"]["summary"]) == 3  # head + 2 workers
    store = root / "shared-storage"
    assert (store / "features").is_dir() and any((store / "features").iterdir())
    assert (store / "tune").is_dir()


# ---------------------------------------------------------------- the tracking server by the cluster's name


def test_tracking_server_answers_the_clusters_host_name(mlflow_server):
    """MLflow checks the Host header: run-server.sh must list the name of DINOSCALE_TRACKING_URI
    (and the aliases). /health is exempt, so the readiness probe alone would stay green on a 403."""

    def search(host: str, **headers):
        return requests.post(
            f"{mlflow_server}/api/2.0/mlflow/experiments/search",
            json={"max_results": 1},
            auth=(MLFLOW_USER, MLFLOW_PASSWORD),
            headers={"Host": host, **headers},
            timeout=30,
        )

    for host in (CLUSTER_HOST, CLUSTER_HOST.split(":")[0], "mlflow:5000", "mlflow.dinoscale.svc.cluster.local:5000"):
        r = search(host)
        assert r.status_code == 200, f"Host: {host} -> {r.status_code} {r.text[:200]}"
    assert search("evil.example:5000").status_code == 403, "the check is on: unknown names are refused"
    assert requests.get(f"{mlflow_server}/health", headers={"Host": "evil.example:5000"}, timeout=10).status_code == 200
    # the web UI on the cluster's name: its same-origin POSTs carry an Origin header
    r = search(CLUSTER_HOST, Origin=f"http://{CLUSTER_HOST}")
    assert r.status_code == 200, f"UI request from http://{CLUSTER_HOST}: {r.status_code} {r.text[:200]}"


def test_tracking_server_process_has_no_empty_s3_endpoint(sandbox, mlflow_server):
    """run-server.sh drops the empty MLFLOW_S3_ENDPOINT_URL it was given (boto3: 'Invalid endpoint')."""
    _, procs = sandbox
    pid = dict(procs.procs)["mlflow"].pid  # run-server.sh execs mlflow: the same process
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not any(e.startswith(b"MLFLOW_S3_ENDPOINT_URL=") for e in environ)
    assert any(e.startswith(b"MLFLOW_SERVER_ALLOWED_HOSTS=mlflow.dinoscale.internal,") for e in environ)


# ---------------------------------------------------------------- the Makefile's job client on the token cluster


def _make(target: str, ray_cluster, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A cluster-* target as a user runs it: only RAY_AUTH_TOKEN exported (no RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN"] = ray_cluster["env"]["RAY_AUTH_TOKEN"]
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            target,
            "CLUSTER_DEPS=",
            f"BIN={VENV_BIN}",
            f"RAY_ADDRESS={ray_cluster['dashboard']}",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_make_cluster_status_with_only_the_token_exported(submitted_sweep, ray_cluster):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN"] = ray_cluster["env"]["RAY_AUTH_TOKEN"]
    bare = subprocess.run(
        [RAY, "job", "list", "--address", ray_cluster["dashboard"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bare.returncode != 0, "without RAY_AUTH_MODE=token the job client sends no token (the README's old advice)"
    r = _make("cluster-status", ray_cluster)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert submitted_sweep["job_id"] in r.stdout + r.stderr


def test_make_cluster_check_reports_the_missing_gpu_as_a_line(ray_cluster):
    """`make cluster-check` on this GPU-less cluster: token, storage and tracking pass, the GPU line
    fails with its reason, and nothing crashes."""
    t0 = time.time()
    r = _make("cluster-check", ray_cluster, "CHECK_GPU_WAIT=5")
    out = r.stdout + r.stderr
    print(r.stdout)  # the one screen a user sees (pytest -rP shows it)
    assert "Traceback" not in out, out[-4000:]
    assert r.returncode != 0, out[-4000:]
    lines = [ln for ln in out.splitlines() if ln[:4] in ("OK  ", "WARN", "FAIL")]
    by_check = {}
    for ln in lines:
        by_check.setdefault(ln.split()[1], []).append(ln.split()[0])
    assert by_check.get("token") == ["OK", "OK"], lines  # the job server (client side), the mode on every node
    assert by_check.get("gpu") == ["FAIL"] and "no GPU worker joined within 5s" in out, lines
    assert by_check.get("storage") in (["OK"], ["WARN"]) and "the same storage on all 3 node(s)" in out, lines
    assert by_check.get("tracking") == ["OK"], lines
    assert "cluster-check: 1 problem(s)" in out
    assert " INFO " not in r.stdout, "one screen: the report, not Ray's log chatter"
    print(f"cluster-check took {time.time() - t0:.0f}s")
