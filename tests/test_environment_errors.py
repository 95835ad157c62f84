"""The machine's surroundings failing a sweep: a full disk, a read-only or vanished storage path, a tracking
store that goes away. Each ends in one message naming the path or URI (with free vs needed space where that
is known) and whether ``--resume`` continues, exit status 2, no traceback - never "a bug in dinoscale".

Real file systems, not mocks: a small tmpfs mounted for the test (``mount -t tmpfs``: root, which CI is; a
developer's machine without it skips with the reason, CI fails), a read-only remount (``chmod`` does not stop
root), a real SQLite MLflow store whose folder is removed. ERRORS.md lists these errors.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, free_port
from dinoscale.cli import app
from dinoscale.errors import StorageError, TrackingError, describe, environment_error, user_error_of
from test_user_errors import write_png_dataset

# ---------------------------------------------------------------- a small file system of our own


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` (e.g. ``64k``) mounted at ``path`` for the block; unmounted whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        res = None
        why = "no mount command"
    else:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        why = res.stderr.decode(errors="replace").strip()
    if res is None or res.returncode != 0:
        why = f"cannot mount a tmpfs at {path} ({why}): these tests need root (CI runs as root)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI runs as root: a skip there would hide that the tests never ran
        pytest.skip(why)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    res = subprocess.run(["mount", "-o", f"remount,{options}", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- which errors are the surroundings


def test_storage_failures_are_told_as_one_storage_error():
    """Full (ENOSPC, EDQUOT), read-only (EROFS), not permitted (EACCES): a StorageError naming the path and what to
    do, also behind Ray's wrapper and in the text of pyarrow's errors; any other OSError stays a bug."""
    from ray.exceptions import RayTaskError

    full = OSError(errno.ENOSPC, "No space left on device", "/data/store/features/ab/x.npy")
    found = user_error_of(full)
    assert isinstance(found, StorageError) and found.reason == "full"
    assert "no space left on device (ENOSPC) at '/data/store/features/ab/x.npy'" in describe(found)
    assert "larger file system" in str(found)
    wrapped = RayTaskError("run_job", "Traceback (most recent call last): ...", full).as_instanceof_cause()
    assert user_error_of(wrapped).reason == "full"  # from an extraction task
    quota = user_error_of(OSError(errno.EDQUOT, "Disk quota exceeded", "/scratch/x"))
    assert quota.reason == "full" and "disk quota exceeded (EDQUOT)" in str(quota)
    assert user_error_of(OSError(errno.EROFS, "Read-only file system", "/mnt/ro")).reason == "read-only"
    assert user_error_of(OSError(errno.EACCES, "Permission denied", "/mnt/x")).reason == "permission"
    pyarrow_text = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert user_error_of(pyarrow_text).reason == "full"
    assert user_error_of(OSError(errno.ENOENT, "No such file", "/x")) is None  # a missing file: not by itself
    assert user_error_of(OSError(errno.EBADF, "Bad file descriptor")) is None

    # the storage root gone: ENOENT while it no longer exists
    gone = environment_error(OSError(errno.ENOENT, "No such file"), "/nowhere/store/f/x.npy", "/nowhere/store")
    assert gone.reason == "vanished" and "the storage path '/nowhere/store' disappeared" in str(gone)

    # what crosses Ray's process boundary arrives whole
    told = environment_error(full, "/data/store/x.npy", "/data/store", 40 << 10, "the 3 feature set(s) not yet stored")
    again = pickle.loads(pickle.dumps(told))
    assert (again.reason, again.path, again.code, str(again)) == ("full", told.path, errno.ENOSPC, str(told))
    assert "the 3 feature set(s) not yet stored need ~40 KiB" in str(again)


def test_full_store_raises_a_storage_error_and_keeps_what_was_committed(tmp_path):
    """A feature store on a file system that fills: the write that fails names its file and the bytes it
    needed; no partial or uncommitted file is left to hold the space; what was committed reads back."""
    from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore

    with tmpfs(tmp_path / "fs", "64k") as mnt:
        store = FeatureStore(mnt / "features")
        small = FeatureKey(FeatureRecipe("vit", "w", 32, (0.5,) * 3, (0.25,) * 3, tokens="cls", dtype="float16"), "m1")
        store.put(small, np.ones((8, 16), np.float32), [f"s{i}" for i in range(8)])
        big = FeatureKey(FeatureRecipe("vit", "w", 32, (0.5,) * 3, (0.25,) * 3, tokens="cls", dtype="float16"), "m2")
        with pytest.raises(StorageError) as caught:
            store.put(big, np.ones((200, 256), np.float32), [f"b{i}" for i in range(200)])
        err = caught.value
        assert err.reason == "full" and str(mnt / "features") in err.path
        assert "no space left on device (ENOSPC) writing" in str(err) and "needed" in str(err)
        left = [p.name for p in Path(store._dir(big.digest)).iterdir()]
        assert left == [], left  # nothing half-written, nothing uncommitted
        assert not store.has(big) and store.verify(small.digest) is None
        assert np.asarray(store.get(small).rows).shape == (8, 16)


def test_a_storage_path_removed_under_the_store_is_not_made_anew(tmp_path):
    """The storage path deleted (or unmounted) while a sweep writes: the store says so instead of quietly making
    the folders again (on whatever disk is below), and removes nothing else."""
    from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore

    first = FeatureKey(FeatureRecipe("vit", "w", 32, (0.5,) * 3, (0.25,) * 3, tokens="cls", dtype="float16"), "m0")
    FeatureStore(tmp_path / "store" / "features").put(first, np.ones((4, 8), np.float32), list("abcd"))
    store = FeatureStore(tmp_path / "store" / "features")  # as an extraction task opens it
    key = FeatureKey(FeatureRecipe("vit", "w", 32, (0.5,) * 3, (0.25,) * 3, tokens="cls", dtype="float16"), "m")
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(StorageError) as caught:
        store.put(key, np.ones((4, 8), np.float32), list("abcd"))
    assert caught.value.reason == "vanished"
    assert f"the storage path '{tmp_path / 'store'}' disappeared" in str(caught.value)
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- before anything starts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_png_dataset(tmp_path_factory.mktemp("env-data") / "data")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("DINOSCALE_TRACKING_URI", "DINOSCALE_STORAGE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def spec_file(tmp_path: Path, data: Path, storage: Path, **changes) -> Path:
    """1 backbone x 2 resolutions x k-NN on 48 PNGs: 2 cells, 6 feature sets of ~37 KiB in all (predicted)."""
    spec = {
        "name": "env-errors",
        "modality": "xray",
        "profile": "paper",
        "dataset": {"name": "manifest", "root": str(data), "classes": ["Nodule"]},
        "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
        "resolutions": [32, 64],
        "probes": [{"kind": "knn"}],
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db"},
        "storage": {"path": str(storage)},
        "ray": {"num_cpus": 2},
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def user_error(args: list, *names: str, kind: str = "storage") -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    out = res.output
    assert res.exit_code == 2, f"exit {res.exit_code}: {out}\n{res.exception!r}"
    assert "Traceback" not in out and f"{kind} error:" in out, out
    for n in names:
        assert str(n) in out, f"{n!r} not in: {out}"
    return out


def test_read_only_storage_is_refused_before_anything_starts(tmp_path, data):
    with tmpfs(tmp_path / "ro", "1m") as mnt:
        (mnt / "store").mkdir()
        remount(mnt, "ro")
        out = user_error(["sweep", spec_file(tmp_path, data, mnt / "store")], f"'{mnt / 'store'}'", "Read-only")
        assert len(out.strip().splitlines()) == 1, out


def test_too_little_free_space_is_refused_before_anything_starts(tmp_path, data):
    """The plan predicts the bytes to extract; a storage file system with less room (and a margin) is refused
    in the pre-flight with needed vs free, before Ray starts or a run is recorded."""
    with tmpfs(tmp_path / "small", "16k") as mnt:
        out = user_error(
            ["sweep", spec_file(tmp_path, data, mnt / "store")],
            f"storage path '{mnt / 'store'}' has ",  # the sweep's log file under logs/ takes a page or two
            "KiB free (of 16 KiB)",
            "the extraction needs ~",
            "predicted for 6 feature set(s)",
            "Nothing was started",
        )
        assert not (mnt / "store" / "sweeps").exists() and not (mnt / "store" / "features").exists()
    assert "parent run" not in out


# ---------------------------------------------------------------- the tracking store going away


def test_a_tracking_store_gone_mid_sweep_is_told_with_its_uri(tmp_path):
    """The exceptions MLflow really raises when its SQLite folder is removed, or its server stops answering,
    become one TrackingError naming the URI and what is left to resume; a wrong request stays a bug."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dinoscale.sweep.preflight import no_retries, tracking_failure_of

    folder = tmp_path / "tracking"
    folder.mkdir()
    uri = f"sqlite:///{folder}/mlruns.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("gone"))
    shutil.rmtree(folder)
    with pytest.raises(MlflowException) as caught:
        client.log_metric(run.info.run_id, "auroc", 0.5)
    told = tracking_failure_of(RuntimeError("during the trial stage"), uri)
    assert told is None  # not a store failure
    try:
        raise RuntimeError("the sweep's driver") from caught.value
    except RuntimeError as chained:
        told = tracking_failure_of(chained, uri)
    assert isinstance(told, TrackingError) and not told.resumable
    assert f"the MLflow tracking store {uri} failed mid-sweep: its folder '{folder}' is gone" in str(told)
    assert "start the sweep again without --resume" in str(told)
    assert "attempt to write a readonly database" in str(told) or "is gone" in str(told)

    # a trial's MLflow client makes the deleted database anew, empty: the sweep's runs are not in it
    folder.mkdir()
    with sqlite3.connect(folder / "mlruns.db") as con:
        con.execute("CREATE TABLE runs (run_uuid VARCHAR(32))")
    told = tracking_failure_of(caught.value, uri, run.info.run_id)
    assert not told.resumable and "no longer holds this sweep's runs" in str(told)
    with sqlite3.connect(folder / "mlruns.db") as con:  # the runs there: a store that refused one write
        con.execute("INSERT INTO runs VALUES (?)", (run.info.run_id,))
    told = tracking_failure_of(caught.value, uri, run.info.run_id)
    assert told.resumable and "the database cannot be written ((sqlite3.OperationalError) attempt to write a " in str(
        told
    )

    down = f"http://127.0.0.1:{free_port()}"
    with no_retries(), pytest.raises(MlflowException) as caught:
        MlflowClient(down).get_experiment_by_name("x")
    told = tracking_failure_of(caught.value, down)
    assert told.resumable and f"the MLflow tracking store {down} failed mid-sweep: the server stopped answering" in str(
        told
    )
    assert "connection refused" in str(told)

    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    intact = f"sqlite:///{tmp_path}/intact.db"
    MlflowClient(intact).search_experiments()  # a store that is there
    bug = MlflowException("Changing param values is not allowed", INVALID_PARAMETER_VALUE)
    assert tracking_failure_of(bug, intact) is None and tracking_failure_of(RuntimeError("a bug"), intact) is None


def test_resume_against_a_store_without_the_sweep_is_refused_in_the_preflight(tmp_path):
    """A tracking store deleted (or replaced, or another URI) since the sweep started holds no parent run: the
    resume is refused with what to do, before anything runs - not a crash when the run is looked up."""
    from mlflow.tracking import MlflowClient

    from dinoscale.sweep.preflight import check_parent_run
    from dinoscale.sweep.state import ResumeError, SweepState

    uri = f"sqlite:///{tmp_path}/new.db"
    client = MlflowClient(uri)
    here = client.create_run(client.create_experiment("resume")).info.run_id
    state = SweepState("xray-1", "xray", "d", here, "1", uri, str(tmp_path / "tune"))
    check_parent_run(uri, state)  # there: passes
    state.parent_run_id = "0" * 32
    with pytest.raises(ResumeError) as caught:
        check_parent_run(uri, state)
    assert f"its parent run {'0' * 32} is not in the tracking store {uri}" in str(caught.value)
    assert "start the sweep again without --resume" in str(caught.value)


# ---------------------------------------------------------------- a full disk mid-sweep, then --resume


def _cli(args: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "dinoscale.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_storage_full_mid_extraction_then_resume_completes(tmp_path, data):
    """A 64 KiB storage: the pre-flight passes (~41 KiB predicted with the margin), the extraction fills it
    (each small file takes a 4 KiB page). One message naming the storage path and the resume command, exit 2,
    no traceback; the parent run FAILED. After making room, --resume completes: both cells, one run each."""
    from mlflow.tracking import MlflowClient

    from dinoscale import record

    with tmpfs(tmp_path / "disk", "64k") as mnt:
        spec = spec_file(tmp_path, data, mnt / "store")
        res = _cli(["sweep", spec, "--no-analysis"], tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode == 2, out[-4000:]
        assert "Pre-flight ok" in out and "Extraction stage" in out  # met by the extraction, not the pre-flight
        assert "storage error: no space left on device (ENOSPC) writing" in res.stderr, res.stderr
        assert f"under '{mnt / 'store'}'" in res.stderr and "free of 64 KiB" in res.stderr
        assert "not yet stored need ~" in res.stderr
        assert f"continue with: dinoscale sweep {spec} --no-analysis --resume" in res.stderr
        assert "Traceback" not in out and "a bug in dinoscale" not in out and "RayTaskError" not in out
        assert not list((mnt / "store").rglob(".tmp-*"))  # nothing half-written left to hold the space

        client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
        exp = client.get_experiment_by_name("dinoscale-env-errors")
        parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{record.ROLE}` = '{record.ROLE_SWEEP}'")
        assert [p.info.status for p in parents] == ["FAILED"]
        failed_parent = parents[0].info.run_id

        remount(mnt, "size=64m")  # room made
        res = _cli(["sweep", spec, "--no-analysis", "--resume"], tmp_path)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    runs = client.search_runs([exp.experiment_id])
    cells = [r for r in runs if r.data.tags.get(record.ROLE) == record.ROLE_CELL]
    assert len(cells) == 2 and len({r.data.tags[record.CELL] for r in cells}) == 2
    assert all(r.info.status == "FINISHED" for r in cells)
    parents = [r for r in runs if r.data.tags.get(record.ROLE) == record.ROLE_SWEEP]
    assert [(p.info.run_id, p.info.status) for p in parents] == [(failed_parent, "FINISHED")]  # the same run


@pytest.mark.slow
def test_tracking_store_removed_mid_sweep_ends_in_one_message(tmp_path, data):
    """The SQLite store's folder removed while the trials run: the sweep ends with one message naming the URI and
    that its runs are lost (the trials' MLflow clients make an empty database anew), exit 2, not a bug report."""
    tracking = tmp_path / "tracking"
    tracking.mkdir()
    uri = f"sqlite:///{tracking}/mlruns.db"
    spec = spec_file(
        tmp_path, data, tmp_path / "store", tracking={"uri": uri}, resources={"trial_retries": 0}, resolutions=[32]
    )
    log = tmp_path / "sweep.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dinoscale.cli", "sweep", str(spec), "--no-analysis"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 400
        while "Trial stage" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        shutil.rmtree(tracking)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = log.read_text()
    assert proc.returncode == 2, said[-4000:]
    last = said.strip().splitlines()[-1]
    assert last.startswith(f"tracking error: the MLflow tracking store {uri} failed mid-sweep: "), said[-4000:]
    assert "start the sweep again without --resume" in last and "a bug in dinoscale" not in said
    assert said.count("tracking error:") == 1
