"""The Slurm path on a real Slurm: Debian's slurm-wlm (slurmctld + two slurmd + munge) on localhost.

The test cluster: munged with its own key and socket, slurmctld and two slurmd (nodes n1 and n2 on
this host, distinct ports), no cgroups (proctrack/linuxproc, task/none), all started here as root
and stopped by process group at the end; nothing of the machine's own Slurm or munge is touched.

`cluster/slurm/submit.sh` submits a tiny demo sweep over both nodes (a Ray head on n1, a worker on
n2, token auth on, ports from the job id). The batch shell gets SIGTERM mid-sweep the way a time
limit sends it (`--signal=B:TERM@...` == `scancel --signal=TERM --batch`); the sweep stops cleanly
(exit 143), the job submits its follow-up, which finds the unfinished sweep and resumes it: MLflow
ends with one FINISHED parent and one FINISHED child per trial key.

Absent slurm-wlm/munge (or not root): skip with the reason; under CI (env CI set) fail, .ci/run installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import tiny_spec_dict
from dinoscale import record

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo", "squeue")


def _missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(why)  # CI installs slurm-wlm and munge (.ci/run): a skip there would hide a missing install
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or ""


SLURM_CONF = """\
ClusterName=dinoscale-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=20
MinJobAge=3600
InactiveLimit=0
Waittime=0
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{n1_port}-{n2_port}] CPUs=2 RealMemory=6000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class Daemons:
    """Processes started here, each in its own session, stopped by process group."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        with open(self.root / "log" / f"{name}.out", "ab") as log:
            p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            for p in reversed(self.procs):
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.time() + grace
            for p in self.procs:
                try:
                    p.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass


def _kill_leftovers(marker: str) -> None:
    """Job steps run in sessions of their own: stop any process whose command line or environment names
    this module's private folder (and only those)."""
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            seen = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in seen:
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def slurm():
    """A two-node Slurm on localhost; yields the environment its clients need (SLURM_CONF)."""
    missing = [d for d in DAEMONS if not _exe(d)]
    if missing:
        _missing(f"Slurm/munge not installed ({', '.join(missing)}): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        _missing("slurmd must run as root to start jobs; this test starts its own Slurm, so it needs root")
    root = Path(tempfile.mkdtemp(prefix="dinoscale-slurm-", dir="/tmp"))  # short: munge and Ray socket paths
    os.chmod(root, 0o755)
    for sub in ("log", "state", "munge", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    host = socket.gethostname().split(".")[0]
    n1 = _free_port()
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(host=host, root=root, ctld_port=_free_port(), d_port=_free_port(), n1_port=n1, n2_port=n1 + 1)
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = Daemons(root)
    try:
        m = root / "munge"
        daemons.start(
            "munged",
            [_exe("munged"), "-F", "--force", f"--socket={m}/munge.sock", f"--key-file={key}",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"],
            env,
        )  # fmt: skip
        _wait(lambda: (m / "munge.sock").exists(), 30, "munged", root)
        daemons.start("slurmctld", [_exe("slurmctld"), "-D", "-i"], env)
        _wait(lambda: _run(["scontrol", "ping"], env).returncode == 0, 60, "slurmctld", root)
        for n in NODES:
            daemons.start(f"slurmd-{n}", [_exe("slurmd"), "-D", "-N", n], env)
        _wait(lambda: _run(["sinfo", "-h", "-o", "%t %D"], env).stdout.split() == ["idle", "2"], 90, "slurmd", root)
        yield env, root
    finally:
        _run(["scancel", "--user=root", "--partition=debug"], env)
        time.sleep(2)
        daemons.stop_all()
        _kill_leftovers(str(root))
        if not os.environ.get("DINOSCALE_KEEP_SLURM"):
            shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([_exe(cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True, timeout=timeout)


def _logs(root: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(root.rglob("*.log*")))


def _wait(check, timeout: float, what: str, root: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout:.0f}s\n{_logs(root)}")


def _job(job: str, env: dict) -> dict[str, str]:
    out = _run(["scontrol", "show", "job", job, "-o"], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _children(client: MlflowClient, exp_id: str, parent: str) -> list:
    return client.search_runs([exp_id], f"tags.`{record.PARENT_RUN_ID}` = '{parent}'", max_results=100)


def test_sweep_on_slurm_stops_at_the_time_limit_signal_and_resumes_in_the_next_job(slurm, tmp_path):
    env, root = slurm
    work = root / "work"
    work.mkdir()
    spec = tiny_spec_dict(
        work, name="slurm-demo", backbones=[{"name": "dinov3-demo-xs", "weights": "random"}], resolutions=[32, 48]
    )
    spec["dataset"]["phantom"]["image_size"] = 64
    spec["metrics"] = {"bootstrap": {"resamples": 50, "level": 0.95, "seed": 0}}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    job_env = {
        **env,
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(root / "home"),  # the per-job Ray token goes under ~/.dinoscale/slurm
        "NODES": "2",
        "CPUS": "1",
        "MEM_GB": "3",
        "TIME": "15",
        "SLURM_LOGS": str(work / "logs"),
        "DINOSCALE_RESUBMIT": "1",
        "DINOSCALE_RAY_OBJECT_STORE": str(150 * 2**20),
        "OMP_NUM_THREADS": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "DINOSCALE_STORAGE", "DINOSCALE_TRACKING_URI"):
        job_env.pop(k, None)
    sub = subprocess.run(
        [str(ROOT / "cluster/slurm/submit.sh"), str(work / "spec.yaml")],
        env=job_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sub.returncode == 0, sub.stderr
    first = sub.stdout.strip().splitlines()[-1]
    assert "--gres" not in sub.stderr and "--cpus-per-task=1" in sub.stderr and "--mem=3G" in sub.stderr

    # cut the first job once a cell has finished, as its time limit would (--signal=B:TERM@...)
    client = MlflowClient(spec["tracking"]["uri"])

    def a_cell_finished() -> bool:
        exp = client.get_experiment_by_name("dinoscale-slurm-demo")
        if exp is None:
            return False
        runs = client.search_runs([exp.experiment_id], f"tags.`{record.ROLE}` = '{record.ROLE_CELL}'")
        return any(r.info.status == "FINISHED" for r in runs)

    _wait_job(first, env, a_cell_finished, 420, work)
    assert _run(["scancel", "--signal=TERM", "--batch", first], env).returncode == 0
    _wait_job(
        first, env, lambda: _job(first, env).get("JobState") not in ("RUNNING", "PENDING", "COMPLETING"), 180, work
    )
    log1 = next((work / "logs").glob(f"*-{first}.out")).read_text(errors="replace")
    assert _job(first, env)["ExitCode"] == "143:0", log1[-3000:]
    m = re.search(r"submitted job (\d+) to resume", log1)
    assert m, log1[-3000:]
    second = m.group(1)

    _wait_job(
        second, env, lambda: _job(second, env).get("JobState") not in ("RUNNING", "PENDING", "COMPLETING"), 420, work
    )
    log2 = next((work / "logs").glob(f"*-{second}.out")).read_text(errors="replace")
    assert _job(second, env)["ExitCode"] == "0:0", log2[-4000:]
    assert "--resume" in log2

    exp = client.get_experiment_by_name("dinoscale-slurm-demo")
    parents = client.search_runs([exp.experiment_id], f"tags.`{record.ROLE}` = '{record.ROLE_SWEEP}'")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert parents[0].data.tags[record.RESUMES] == "1"
    children = _children(client, exp.experiment_id, parents[0].info.run_id)
    keys = [c.data.tags[record.TRIAL_KEY] for c in children]
    assert len(keys) == 4 and len(set(keys)) == 4, keys  # 2 resolutions x 2 probes, none run twice
    assert {c.info.status for c in children} == {"FINISHED"}
    assert not list((root / "home" / ".dinoscale" / "slurm").glob("ray-token-*"))  # tokens removed at the end
    # a sweep on a cluster writes its report under the storage every node sees, not into the submit folder
    report = work / "store" / "reports" / "slurm-demo" / "report.html"
    assert report.is_file() and f"report: {report}" in " ".join(log2.split()), log2[-2000:]


def _wait_job(job: str, env: dict, check, timeout: float, work: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(2)
    logs = "\n".join(f.read_text(errors="replace")[-3000:] for f in (work / "logs").glob("*.out"))
    raise AssertionError(f"job {job}: not there after {timeout:.0f}s: {_job(job, env)}\n{logs}")
