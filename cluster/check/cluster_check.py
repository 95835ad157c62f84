"""`make cluster-check`: is this Ray cluster ready for a sweep? One screen, one line per finding.

    python cluster/check/cluster_check.py submit --address http://127.0.0.1:8265 [--gpu-wait 900]
        (your machine) checks the token against the job server, then submits itself as a Ray job
        and prints its report; exit 0 when nothing FAILs
    python cluster/check/cluster_check.py run [--gpu-wait 900]
        (on the head, as the job's driver) the checks below

Checks, each printed as `OK`, `WARN` or `FAIL`:
  token     the job server refuses a request without the token and accepts RAY_AUTH_TOKEN;
            RAY_AUTH_MODE=token on every node
  gpu       inside a GPU worker's container torch sees the GPU Ray advertises; with no GPU worker
            up yet, one GPU task asks the autoscaler for one and waits --gpu-wait seconds
  storage   DINOSCALE_STORAGE is set, writable and the SAME storage on every node (each node reads
            a file the head wrote there), and is a network file system
  tracking  from a worker, by the cluster's host name (DINOSCALE_TRACKING_URI): the name resolves,
            the server answers, accepts the Host header (MLflow answers 403 to names it does not
            list) and the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD)
Nothing here needs more than the standard library and Ray (torch for the GPU line).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

NETWORK_FS = ("nfs", "nfs4", "efs", "lustre", "ceph", "cifs", "smb3", "glusterfs", "gcsfuse", "fuse", "beegfs", "gpfs")


class Report:
    def __init__(self):
        self.lines: list[tuple[str, str, str]] = []

    def add(self, status: str, check: str, message: str) -> None:
        self.lines.append((status, check, message))
        print(f"{status:<4} {check:<8} {message}", flush=True)

    @property
    def failed(self) -> int:
        return sum(s == "FAIL" for s, _, _ in self.lines)


# ---------------------------------------------------------------- probes (run on each node)


def _mount_of(path: str) -> tuple[str, str]:
    """(mount point, file system type) that holds `path`, from /proc/mounts."""
    best = ("", "?")
    try:
        real = os.path.realpath(path)
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, parts[2])
    except OSError:
        pass
    return best


def probe_node(storage: str | None, run_dir: str | None, head_token: str | None) -> dict:
    """On one node: its environment, and what it sees of the shared storage."""
    out = {
        "host": socket.gethostname(),
        "ip": _node_ip(),
        "env_storage": os.environ.get("DINOSCALE_STORAGE"),
        "auth_mode": os.environ.get("RAY_AUTH_MODE", ""),
        "error": None,
    }
    if storage and run_dir:
        try:
            head_file = Path(run_dir) / "head"
            out["sees_head"] = head_file.is_file() and head_file.read_text() == head_token
            mine = Path(run_dir) / f"node-{out['ip']}-{os.getpid()}"
            mine.write_text(out["host"])
            out["wrote"] = mine.name
            out["mount"], out["fstype"] = _mount_of(storage)
        except OSError as e:
            out["error"] = f"{type(e).__name__}: {e}"
    return out


def probe_gpu() -> dict:
    out = {"host": socket.gethostname(), "ip": _node_ip(), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["available"] = torch.cuda.is_available()
        out["devices"] = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if out["available"] else []
        )
    except (ImportError, OSError, RuntimeError, AssertionError) as e:  # no torch, a broken driver: a finding
        out["available"] = False
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def probe_tracking(uri: str | None) -> tuple[str, str]:
    """(status, message) for the tracking server as this node sees it, by the cluster's name."""
    if not uri:
        return "FAIL", "DINOSCALE_TRACKING_URI is not set on this node (cluster/cluster.env)"
    u = urllib.parse.urlsplit(uri)
    if u.scheme not in ("http", "https") or not u.hostname:
        return "FAIL", f"DINOSCALE_TRACKING_URI={uri!r} is not an http(s) URL"
    host = u.hostname
    where = f"{host} from {socket.gethostname()}"
    try:
        socket.getaddrinfo(host, u.port or (443 if u.scheme == "https" else 80))
    except socket.gaierror as e:
        return (
            "FAIL",
            f"{host} does not resolve on {socket.gethostname()} ({e.strerror}): DNS record / private zone (cluster/README.md)",
        )
    base = uri.rstrip("/")
    try:
        urllib.request.urlopen(f"{base}/health", timeout=10).read()
    except urllib.error.HTTPError as e:
        return "FAIL", f"{base}/health answered {e.code}: is that the MLflow server?"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return (
            "FAIL",
            f"{base} not reachable from {socket.gethostname()} ({reason}): firewall / security group, port {u.port}",
        )
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/experiments/search",
        method="POST",
        data=json.dumps({"max_results": 1}).encode(),
        headers={"Content-Type": "application/json"},
    )
    if user and password:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        urllib.request.urlopen(req, timeout=20).read()
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")[:200]
        if e.code == 403 and "Host" in body:
            return "FAIL", (
                f"the server refuses the Host header {u.netloc!r} (403): start it with DINOSCALE_TRACKING_URI={uri} "
                "(cluster/mlflow/run-server.sh) or list the name in MLFLOW_SERVER_ALLOWED_HOSTS"
            )
        if e.code == 401:
            missing = (
                ""
                if user and password
                else " (MLFLOW_TRACKING_USERNAME/PASSWORD not set on this node: with-secrets.sh / dinoscale-secrets)"
            )
            return "FAIL", f"{where}: credentials rejected (401){missing}"
        return "FAIL", f"{where}: {e.code} {body.strip()}"
    except (urllib.error.URLError, OSError) as e:
        return "FAIL", f"{where}: {getattr(e, 'reason', e)}"
    return (
        "OK",
        f"{uri} from {socket.gethostname()}: the name resolves, the server accepts its Host header and the credentials",
    )


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except (ImportError, RuntimeError, OSError):
        return socket.gethostname()


# ---------------------------------------------------------------- the driver (on the head)


def run(gpu_wait: float) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto", log_to_driver=False)
    report = Report()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    head = next((n for n in nodes if "node:__internal_head__" in n.get("Resources", {})), None)
    workers = [n for n in nodes if n is not head]
    print(
        f"cluster: {len(nodes)} node(s) alive, head {head and head['NodeManagerAddress']}, "
        f"resources {ray.cluster_resources()}",
        flush=True,
    )

    def on(node, fn, *args, **kw):
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        return ray.remote(fn).options(num_cpus=0, scheduling_strategy=strategy, **kw).remote(*args)

    # storage (and each node's environment)
    storage = os.environ.get("DINOSCALE_STORAGE")
    run_dir = token = None
    if not storage:
        report.add("FAIL", "storage", "DINOSCALE_STORAGE is not set on the head (cluster/cluster.env)")
    else:
        try:
            run_dir = Path(storage) / ".cluster-check" / uuid.uuid4().hex[:12]
            run_dir.mkdir(parents=True)
            token = uuid.uuid4().hex
            (run_dir / "head").write_text(token)
        except OSError as e:
            report.add("FAIL", "storage", f"{storage} is not writable on the head: {e}")
            run_dir = None
    probes = ray.get([on(n, probe_node, storage, str(run_dir) if run_dir else None, token) for n in nodes], timeout=300)
    if run_dir:
        bad = []
        for p in probes:
            if p["error"]:
                bad.append(f"{p['ip']}: {p['error']}")
            elif p["env_storage"] != storage:
                bad.append(f"{p['ip']}: DINOSCALE_STORAGE={p['env_storage']!r} (head: {storage!r})")
            elif not p.get("sees_head"):
                bad.append(
                    f"{p['ip']}: {storage} is not the head's storage (the head's file is missing: NFS not mounted?)"
                )
        written = {f.name for f in run_dir.iterdir()}
        bad += [
            f"{p['ip']}: its file is not visible on the head"
            for p in probes
            if p.get("wrote") and p["wrote"] not in written
        ]
        for line in bad:
            report.add("FAIL", "storage", line)
        if not bad:
            types = sorted({p.get("fstype", "?") for p in probes})
            msg = f"{storage}: writable, and the same storage on all {len(probes)} node(s) ({', '.join(types)})"
            if any(t.split(".")[0] not in NETWORK_FS and not t.startswith("fuse") for t in types):
                report.add("WARN", "storage", msg + ": not a network file system, fine on one machine only")
            else:
                report.add("OK", "storage", msg)
        for f in run_dir.iterdir():
            f.unlink()
        run_dir.rmdir()

    # gpu
    gpu_nodes = [n for n in workers if n.get("Resources", {}).get("GPU", 0) >= 1]
    if gpu_nodes:
        refs = [on(n, probe_gpu, num_gpus=1) for n in gpu_nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=gpu_wait)
        results = [ray.get(r) for r in ready]
        if len(ready) < len(refs):
            report.add(
                "WARN",
                "gpu",
                f"{len(refs) - len(ready)} GPU node(s) busy for {gpu_wait:.0f}s (a sweep running?): not checked",
            )
    else:
        print(f"no GPU worker up: asking the autoscaler for one (waiting up to {gpu_wait:.0f}s)", flush=True)
        ref = ray.remote(probe_gpu).options(num_cpus=0, num_gpus=1).remote()
        ready, _ = ray.wait([ref], timeout=gpu_wait)
        if not ready:
            ray.cancel(ref, force=True)
            report.add(
                "FAIL",
                "gpu",
                f"no GPU worker joined within {gpu_wait:.0f}s, so no GPU was checked: `ray status` on the head "
                "(quotas, spot capacity, node setup errors in /tmp/ray/session_latest/logs/monitor*)",
            )
        results = [ray.get(r) for r in ready]
    for g in results:
        if g.get("available"):
            report.add(
                "OK",
                "gpu",
                f"{g['ip']}: {', '.join(g['devices'])} in the container (torch {g['torch']}, CUDA {g['torch_cuda']})",
            )
        else:
            why = g.get("error") or f"torch {g.get('torch')} (CUDA {g.get('torch_cuda')}) sees no GPU"
            report.add(
                "FAIL",
                "gpu",
                f"{g['ip']}: Ray gave this task a GPU but the container has none: {why} "
                "(docker --gpus all / NVIDIA runtime / driver; KubeRay: nvidia.com/gpu limits, device plugin)",
            )

    # tracking, from a worker (where the trials log from)
    target = (gpu_nodes or workers or [head])[0]
    status, msg = ray.get(on(target, probe_tracking, os.environ.get("DINOSCALE_TRACKING_URI")), timeout=120)
    if target is head and status == "OK":
        status, msg = "WARN", msg + " (no worker node up: checked from the head)"
    report.add(status, "tracking", msg)

    # token: the mode on every node (the job server itself was checked by `submit`)
    modes = [p["auth_mode"] for p in probes]
    if all(m == "token" for m in modes):
        report.add("OK", "token", f"RAY_AUTH_MODE=token on all {len(modes)} node(s)")
    else:
        off = [p["ip"] for p in probes if p["auth_mode"] != "token"]
        report.add("FAIL", "token", f"RAY_AUTH_MODE is not 'token' on {', '.join(off)}")

    print(f"cluster-check: {report.failed} problem(s)" if report.failed else "cluster-check: ready", flush=True)
    return 1 if report.failed else 0


# ---------------------------------------------------------------- the client (your machine)


def check_token(address: str, report: Report) -> bool:
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    url = address.rstrip("/") + "/api/version"
    if os.environ.get("RAY_AUTH_MODE") != "token":
        report.add(
            "FAIL", "token", "RAY_AUTH_MODE=token is not set here: the job client would not send the token (401)"
        )
        return False
    try:
        urllib.request.urlopen(url, timeout=15).read()
        report.add("WARN", "token", f"{url} answers WITHOUT a token: token authentication is off on this cluster")
    except urllib.error.HTTPError as e:
        if e.code != 401:
            report.add("FAIL", "token", f"{url}: {e.code} without a token")
            return False
    except (urllib.error.URLError, OSError) as e:
        report.add(
            "FAIL",
            "token",
            f"the job server at {address} is not reachable ({getattr(e, 'reason', e)}): "
            "`make cluster-dashboard` (launcher) or `kubectl port-forward svc/<head-svc> 8265:8265` (KubeRay)",
        )
        return False
    if not token:
        report.add("FAIL", "token", "RAY_AUTH_TOKEN is not set here (the cluster's token, from your secret store)")
        return False
    try:
        urllib.request.urlopen(
            urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}), timeout=15
        ).read()
    except urllib.error.HTTPError as e:
        report.add("FAIL", "token", f"the job server refuses RAY_AUTH_TOKEN ({e.code}): not this cluster's token")
        return False
    report.add(
        "OK", "token", f"the job server at {address} refuses requests without the token and accepts RAY_AUTH_TOKEN"
    )
    return True


def submit(address: str, gpu_wait: float) -> int:
    report = Report()
    if not check_token(address, report):
        print("cluster-check: 1 problem (the job server), nothing submitted", flush=True)
        return 1
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + 120  # a head that just started has no job agent for a few seconds
    while True:
        try:
            job = client.submit_job(
                entrypoint=f"python cluster_check.py run --gpu-wait {gpu_wait:g}",
                submission_id=f"cluster-check-{uuid.uuid4().hex[:8]}",
                runtime_env={"working_dir": str(Path(__file__).resolve().parent)},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                print(f"FAIL job      could not submit the check job: {e}", flush=True)
                return 1
            time.sleep(2)
    print(f"submitted {job}; its report:", flush=True)
    deadline = time.time() + gpu_wait + 900
    status = client.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    # the report, without Ray's own INFO chatter (runtime env set-up, "connecting to ...")
    chatter = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+INFO |^Running entrypoint for job ")
    print("\n".join(ln for ln in logs.rstrip().splitlines() if not chatter.match(ln)), flush=True)
    if status == JobStatus.SUCCEEDED:
        return 0
    if "cluster-check:" not in logs:
        info = client.get_job_info(job)
        print(f"FAIL job      the check job ended {status}: {info.message}", flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("submit")
    s.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    s.add_argument("--gpu-wait", type=float, default=900)
    r = sub.add_parser("run")
    r.add_argument("--gpu-wait", type=float, default=900)
    a = p.parse_args(argv)
    return submit(a.address, a.gpu_wait) if a.mode == "submit" else run(a.gpu_wait)


if __name__ == "__main__":
    sys.exit(main())
