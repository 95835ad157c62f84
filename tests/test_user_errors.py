"""Bad inputs through the command line, as a user meets them: one message naming the culprit, no traceback,
exit status 2 - found before anything expensive starts (the pre-flight), or, where only a worker can
find it, carried back from the Ray task or Ray Tune trial with the same message. Interruptions (SIGINT,
SIGTERM) of a real sweep process stop it cleanly and ``--resume`` completes it (exit 130 / 143, see
``dinoscale.errors.SweepInterrupted``).

The battery runs through typer's CliRunner (in process: no Ray, no model) where the failure happens
before Ray starts, and through a real ``python -m dinoscale.cli`` process where the process itself is the
point (exit status, stderr, signals, Ray). ERRORS.md lists what is checked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, free_port
from dinoscale.cli import app

N_PATIENTS = 24  # x 2 images: 48 rows, small enough for the pre-flight to decode every file


# ---------------------------------------------------------------- a user's small PNG dataset


def write_png_dataset(root: Path, n_patients: int = N_PATIENTS, size: int = 32, split: bool = False) -> Path:
    """``manifest.csv`` (path, patient_id, labels[, split]) + grey PNGs, as a user would lay them out."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["path,patient_id,labels" + (",split" if split else "")]
    for p in range(n_patients):
        for k in range(2):
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / "img" / f"p{p}_{k}.png")
            part = "train" if p < n_patients * 0.6 else "val" if p < n_patients * 0.8 else "test"
            lines.append(f"img/p{p}_{k}.png,P{p},{'Nodule' if p % 2 else ''}" + (f",{part}" if split else ""))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tracking database for the battery (MLflow creates its tables once) and one good dataset."""
    base = tmp_path_factory.mktemp("user-errors")
    return {"base": base, "uri": f"sqlite:///{base}/mlruns.db", "data": write_png_dataset(base / "data")}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """`sweep --tracking-uri` sets DINOSCALE_TRACKING_URI in this process: undo it after each case."""
    for var in ("DINOSCALE_TRACKING_URI", "DINOSCALE_STORAGE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def spec_file(tmp_path: Path, shared: dict, filename: str = "spec.yaml", **changes) -> Path:
    spec = {
        "name": "user-errors",
        "modality": "xray",
        "profile": "paper",
        "dataset": {"name": "manifest", "root": str(shared["data"]), "classes": ["Nodule"]},
        "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
        "resolutions": [32],
        "probes": [{"kind": "knn"}],
        "tracking": {"uri": shared["uri"]},
        "storage": {"path": str(tmp_path / "store")},
        "ray": {"num_cpus": 2},
    }
    for key, value in changes.items():  # "dataset.root" -> spec["dataset"]["root"]
        *parents, last = key.split(".")
        node = spec
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def user_error(args: list[str], *names: str, kind: str, env: dict | None = None) -> str:
    """Run the CLI in process; assert exit 2, no traceback, the error's kind and every name in the message."""
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    out = res.output
    assert res.exit_code == 2, f"exit {res.exit_code}: {out}\n{res.exception!r}"
    assert "Traceback" not in out and "Error(s) in loading" not in out, out
    assert f"{kind} error:" in out, out
    for n in names:
        assert str(n) in out, f"{n!r} not in: {out}"
    print(f"\n### {args[0]}: {out.strip()}") if os.environ.get("SHOW_MESSAGES") else None
    return out


# ---------------------------------------------------------------- spec


def test_spec_misspelt_key(tmp_path, shared):
    path = spec_file(tmp_path, shared)
    path.write_text(path.read_text().replace("  name: manifest", "  nmae: manifest"))
    user_error(["sweep", path], "dataset.nmae", "did you mean 'name'", kind="spec")


def test_spec_unknown_backbone(tmp_path, shared):
    path = spec_file(tmp_path, shared, backbones=[{"name": "dinov3-vitz16", "weights": "random"}])
    user_error(["sweep", path], "dinov3-vitz16", kind="spec")


def test_spec_file_missing(tmp_path):
    user_error(["sweep", tmp_path / "nothere.yaml"], "nothere.yaml", kind="spec")


def test_spec_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    user_error(["validate", bad], "bad.yaml", "not valid YAML", kind="spec")


def test_spec_probe_that_does_not_fit_the_task(tmp_path, shared):
    path = spec_file(tmp_path, shared, probes=[{"kind": "segmentation"}])
    user_error(["sweep", path], "segmentation", "Probes that fit", kind="spec")


@pytest.mark.parametrize(
    "dataset, probe",
    [
        ("nih-chestxray14", "segmentation"),
        ("phantom-mri", "linear"),
        ("wsi-tiles", "knn"),
        ("phantom-em", "segmentation"),
    ],
)
def test_validate_refuses_a_probe_that_does_not_fit_the_datasets_task(tmp_path, shared, dataset, probe):
    """Where the dataset registry states the task (and, with a published size, the units), ``validate`` refuses
    what the pre-flight would: it no longer says ok to a spec the sweep then refuses."""
    where = {} if dataset.startswith("phantom") else {"root": str(tmp_path)}
    path = spec_file(tmp_path, shared, dataset={"name": dataset, **where}, probes=[{"kind": probe}])
    out = user_error(["validate", path], "probes", f"['{probe}'] do not fit dataset '{dataset}'", kind="spec")
    assert "Probes that fit" in out and " ok " not in out


# ---------------------------------------------------------------- data


def test_data_root_missing(tmp_path, shared):
    user_error(
        ["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(tmp_path / "nodata")})], "nodata", kind="data"
    )


def test_data_manifest_without_patient_column(tmp_path, shared):
    root = write_png_dataset(tmp_path / "d", n_patients=4)
    csv = root / "manifest.csv"
    csv.write_text(csv.read_text().replace("patient_id", "patient"))
    user_error(
        ["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})], "manifest.csv", "patient_id", kind="data"
    )


def test_data_listed_file_missing(tmp_path, shared):
    root = write_png_dataset(tmp_path / "d")
    (root / "img" / "p5_1.png").unlink()
    user_error(["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})], "p5_1.png", kind="data")


def test_data_truncated_png_named_with_the_real_cause(tmp_path, shared):
    root = write_png_dataset(tmp_path / "d")
    png = root / "img" / "p3_1.png"
    png.write_bytes(png.read_bytes()[:200])
    out = user_error(
        ["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})], "p3_1.png", "truncated", kind="data"
    )
    assert "DICM" not in out  # not the last fallback reader's complaint


def test_data_file_that_is_not_an_image(tmp_path, shared):
    root = write_png_dataset(tmp_path / "d")
    (root / "img" / "p8_0.png").write_text("<html>a download error page</html>")
    user_error(
        ["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})],
        "p8_0.png",
        "cannot identify",
        kind="data",
    )


def test_data_label_outside_the_class_list(tmp_path, shared):
    root = write_png_dataset(tmp_path / "d", n_patients=4)
    csv = root / "manifest.csv"
    csv.write_text(csv.read_text().replace("P1,Nodule", "P1,Nodul", 1))
    user_error(
        ["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})],
        "Nodul",
        "manifest.csv, line",
        kind="data",
    )


def test_data_patient_in_two_official_splits(tmp_path, shared):
    root = write_png_dataset(tmp_path / "d", split=True)
    csv = root / "manifest.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace(",train", ",test")  # P0's second image in test, its first in train
    csv.write_text("\n".join(lines) + "\n")
    user_error(
        ["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})], "P0 in test+train", kind="leakage"
    )


def test_data_official_split_list_without_a_test_split(tmp_path, shared):
    root = write_png_dataset(tmp_path / "d", n_patients=6, split=True)
    csv = root / "manifest.csv"
    csv.write_text(csv.read_text().replace(",test", ",train"))
    user_error(
        ["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})], "split 'test' is empty", kind="data"
    )


# ---------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Checkpoints a user might hold: the demo-xs model's own, another size's, renamed keys, pickled, garbage."""
    import argparse

    import torch
    from safetensors.torch import save_file

    from dinoscale.models import load_backbone

    d = tmp_path_factory.mktemp("weights")
    xs = {k: v.contiguous() for k, v in load_backbone("dinov3-demo-xs").model.state_dict().items()}
    s = {k: v.contiguous() for k, v in load_backbone("dinov3-demo-s").model.state_dict().items()}
    save_file(s, d / "demo_s.safetensors")
    save_file(
        {("encoder." + k if k.startswith("blocks.1.") else k): v for k, v in xs.items()}, d / "renamed.safetensors"
    )
    torch.save({"model": xs, "args": argparse.Namespace(arch="vit_small")}, d / "with_args.pth")
    (d / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return d


def _with_weights(tmp_path, shared, file) -> Path:
    return spec_file(tmp_path, shared, backbones=[{"name": "dinov3-demo-xs", "weights": str(file)}])


def test_weights_file_missing(tmp_path, shared):
    user_error(
        ["sweep", _with_weights(tmp_path, shared, tmp_path / "nothere.safetensors")],
        "nothere.safetensors",
        kind="weights",
    )


def test_weights_pickled_pth_refused_safely(tmp_path, shared, weights):
    out = user_error(
        ["sweep", _with_weights(tmp_path, shared, weights / "with_args.pth")],
        "with_args.pth",
        "argparse.Namespace",
        kind="weights",
    )
    assert "nothing in the file was run" in out


def test_weights_of_another_size(tmp_path, shared, weights):
    user_error(
        ["sweep", _with_weights(tmp_path, shared, weights / "demo_s.safetensors")],
        "demo_s.safetensors",
        "cls_token [1, 1, 144] in the file, [1, 1, 96] in the model",
        kind="weights",
    )


def test_weights_with_other_key_names(tmp_path, shared, weights):
    user_error(
        ["sweep", _with_weights(tmp_path, shared, weights / "renamed.safetensors")],
        "renamed.safetensors",
        "encoder.blocks.1.",
        kind="weights",
    )


def test_weights_file_damaged(tmp_path, shared, weights):
    user_error(
        ["sweep", _with_weights(tmp_path, shared, weights / "broken.safetensors")],
        "broken.safetensors",
        "not a readable .safetensors file",
        kind="weights",
    )


def test_weights_from_the_hub_offline_and_not_cached(tmp_path, shared):
    path = spec_file(tmp_path, shared, backbones=[{"name": "dinov3-vits16", "weights": "hub"}], resolutions=[32])
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": ""}
    user_error(["sweep", path], "dinov3-vits16", "HF_HUB_OFFLINE", kind="weights", env=env)


def test_plan_names_a_missing_weights_file_too(tmp_path, shared):
    user_error(["plan", _with_weights(tmp_path, shared, tmp_path / "w.safetensors")], "w.safetensors", kind="weights")


# ---------------------------------------------------------------- storage


def test_storage_path_under_a_file(tmp_path, shared):
    (tmp_path / "afile").write_text("x")
    path = spec_file(tmp_path, shared, **{"storage.path": str(tmp_path / "afile" / "store")})
    user_error(["sweep", path], f"'{tmp_path / 'afile'}' is a file", kind="storage")


def test_storage_from_the_environment_is_a_file(tmp_path, shared):
    (tmp_path / "storefile").write_text("x")
    env = {"DINOSCALE_STORAGE": str(tmp_path / "storefile")}
    user_error(["sweep", spec_file(tmp_path, shared)], "storefile", "DINOSCALE_STORAGE", kind="storage", env=env)


def test_plan_names_a_storage_path_under_a_file(tmp_path, shared):
    (tmp_path / "afile").write_text("x")
    path = spec_file(tmp_path, shared, **{"storage.path": str(tmp_path / "afile" / "store")})
    user_error(["plan", path], "afile' is a file", kind="storage")


# ---------------------------------------------------------------- tracking


def _timed(args: list, *names: str, limit_s: float = 15.0) -> float:
    """The time to report, from the command's start (the package's imports done once before, as the first
    case of a run would otherwise charge several seconds of imports on 2 shared cores to it)."""
    import mlflow.tracking  # noqa: F401

    import dinoscale.sweep.preflight  # noqa: F401
    import dinoscale.sweep.runner  # noqa: F401

    t0 = time.perf_counter()
    user_error(args, *names, kind="tracking")
    took = time.perf_counter() - t0
    assert took < limit_s, f"reported after {took:.1f}s"
    return took


def test_tracking_server_refusing_connections(tmp_path, shared):
    uri = f"http://127.0.0.1:{free_port()}"
    took = _timed(["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri], uri, "connection refused")
    assert took < 5


def test_tracking_server_that_does_not_answer(tmp_path, shared):
    """Accepts the connection, never answers (a hung server, a proxy): one request, a 5 s timeout, no retries."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        _timed(["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri], uri, "did not answer")
    finally:
        srv.close()


def test_tracking_host_that_drops_connections(tmp_path, shared):
    """A host that never completes the TCP handshake (an unroutable address, a firewall dropping packets):
    simulated by a listener whose accept queue is full, so the kernel drops the SYNs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=2)
    uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        _timed(["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri], uri, "timed out")
    finally:
        filler.close()
        srv.close()


def _http_server(status: int | None):
    """A local web server answering every request with ``status`` (None: 501, no handler at all)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

    if status is not None:

        def answer(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        Handler.do_GET = Handler.do_POST = answer
    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_tracking_uri_that_is_not_an_mlflow_server(tmp_path, shared):
    httpd, uri = _http_server(None)
    try:
        _timed(
            ["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri],
            uri,
            "did not answer as an MLflow tracking store",
        )
    finally:
        httpd.shutdown()


def test_tracking_server_refusing_the_credentials(tmp_path, shared):
    httpd, uri = _http_server(401)
    try:
        _timed(["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri], uri, "MLFLOW_TRACKING_USERNAME")
    finally:
        httpd.shutdown()


def test_tracking_database_under_a_file(tmp_path, shared):
    (tmp_path / "afile").write_text("x")
    path = spec_file(tmp_path, shared, **{"tracking.uri": f"sqlite:///{tmp_path}/afile/mlruns.db"})
    user_error(["sweep", path], f"'{tmp_path / 'afile'}' is a file", "tracking URI", kind="tracking")


def test_analyze_with_the_tracking_server_down(tmp_path, shared):
    uri = f"http://127.0.0.1:{free_port()}"
    path = spec_file(tmp_path, shared, **{"tracking.uri": uri})
    _timed(["analyze", path], uri, "connection refused", limit_s=5)


def test_tracking_folder_store_under_a_file(tmp_path, shared):
    (tmp_path / "afile").write_text("x")
    uri = f"file://{tmp_path}/afile/mlruns"
    user_error(["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri], "afile' is a file", kind="tracking")


def test_tracking_password_never_printed(tmp_path, shared):
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    out = user_error(
        ["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri], "alice:***@127.0.0.1", kind="tracking"
    )
    assert "s3cret" not in out


# ---------------------------------------------------------------- resume


def test_resume_without_an_earlier_sweep(tmp_path, shared):
    user_error(
        ["sweep", spec_file(tmp_path, shared), "--resume"], "no sweep named 'user-errors' to resume", kind="resume"
    )


# ---------------------------------------------------------------- readers: the file, the reader, the real cause


def test_corrupt_files_name_the_file_the_reader_and_the_cause(tmp_path):
    """A damaged PNG, DICOM, NIfTI or HDF5 file, read the way extraction and trials read them."""
    import h5py
    import nibabel as nib
    from PIL import Image
    from pydicom.data import get_testdata_file

    from dinoscale.data import DataError
    from dinoscale.data.readers import read_image, read_volume

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:300])
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(ct[: len(ct) // 2])
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 8).astype(np.float32), np.eye(4)), tmp_path / "ok.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "ok.nii.gz").read_bytes()[:1500])
    with h5py.File(tmp_path / "ok.h5", "w") as f:
        f["raw"] = np.zeros((4, 8, 8), np.uint8)
    (tmp_path / "cut.h5").write_bytes((tmp_path / "ok.h5").read_bytes()[:1000])
    cases = [
        (
            lambda: read_image(tmp_path / "cut.png"),
            "cut.png: the PNG/JPEG/TIFF reader (MONAI PILReader) failed",
            "trunc",
        ),
        (
            lambda: read_image(tmp_path / "cut.dcm"),
            "cut.dcm: the DICOM reader (MONAI PydicomReader) failed",
            "pixel data",
        ),
        (
            lambda: read_volume(tmp_path / "cut.nii.gz"),
            "cut.nii.gz: the NIfTI reader (MONAI NibabelReader) failed",
            "EOF",
        ),
        (lambda: read_volume(f"{tmp_path / 'cut.h5'}::raw::0:2"), "cut.h5: the HDF5 reader (h5py) failed", "truncated"),
    ]
    for read, named, cause in cases:
        with pytest.raises(DataError) as err:
            read()
        msg = str(err.value)
        assert named in msg and cause in msg, msg
        assert "DICM" not in msg or ".dcm" in named and "DICM" in cause, msg  # never a fallback reader's complaint
        assert len(msg.splitlines()) == 1, msg


# ---------------------------------------------------------------- errors from workers, signals (in process)


def test_user_error_found_inside_ray_and_tune_wrappers():
    """Ray re-raises a task's error as RayTaskError(<class>) whose text is the remote traceback; Tune keeps
    it as the trial's error: the user's own error is found again behind either, and only a user error."""
    from ray.exceptions import RayTaskError

    from dinoscale.data import DataError
    from dinoscale.errors import describe, user_error_of

    original = DataError("/data/img/p3_1.png: the PNG/JPEG/TIFF reader (MONAI PILReader) failed: OSError: truncated")
    wrapped = RayTaskError("cell_trainable", "Traceback (most recent call last): ...", original).as_instanceof_cause()
    assert isinstance(wrapped, DataError) and str(wrapped) != str(original)  # Ray's text, not the message
    assert user_error_of(wrapped) is original
    assert describe(user_error_of(wrapped)) == f"data error: {original}"
    try:
        try:
            raise original
        except DataError as e:
            raise RuntimeError("feature extraction failed") from e
    except RuntimeError as chained:
        assert user_error_of(chained) is original
    assert user_error_of(RuntimeError("a bug")) is None and user_error_of(None) is None


def test_signals_raise_outside_tune_and_stop_tune_gracefully_inside():
    from dinoscale.sweep.interrupt import SweepSignals

    before = signal.getsignal(signal.SIGTERM)
    with SweepSignals() as signals:
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert signals.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before

    asked = []
    saved_usr1 = signal.signal(signal.SIGUSR1, lambda s, f: asked.append(s))  # stands for Tune's graceful stop
    try:
        with SweepSignals() as signals:
            signals.in_tune = True
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # no KeyboardInterrupt: Tune is asked to stop and save its state
            assert asked == [signal.SIGUSR1] and signals.fired and signals.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        signal.signal(signal.SIGUSR1, saved_usr1)


@pytest.mark.slow
def test_every_node_sees_the_storage_path(tmp_path, ray_local):
    """On a cluster, a task on each alive node reads back a file the driver wrote under the storage path."""
    from dinoscale.sweep.preflight import check_storage_on_nodes

    assert check_storage_on_nodes(tmp_path) is None  # one node: nothing to check
    assert check_storage_on_nodes(tmp_path, min_nodes=1) == "seen by all 1 nodes"
    assert not list(tmp_path.glob(".dinoscale-nodes-*"))  # the sentinel is removed


# ---------------------------------------------------------------- the real entry point, Ray workers, signals


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


def test_process_reports_a_tracking_server_that_is_down_within_seconds(tmp_path, shared):
    """End to end, from the process's start: the server is checked before the spec's validation imports torch."""
    refused = f"http://127.0.0.1:{free_port()}"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=2)
    dropped = f"http://127.0.0.1:{srv.getsockname()[1]}"
    try:
        for uri, why in ((refused, "connection refused"), (dropped, "timed out after 5.0s")):
            t0 = time.perf_counter()
            res = _cli(["sweep", spec_file(tmp_path, shared), "--tracking-uri", uri], tmp_path, timeout=60)
            took = time.perf_counter() - t0
            assert (
                res.returncode == 2 and f"tracking error: cannot reach the MLflow tracking server {uri}" in res.stderr
            )
            assert why in res.stderr and "Traceback" not in res.stdout + res.stderr
            assert took < 15, f"{uri}: reported after {took:.1f}s"
    finally:
        filler.close()
        srv.close()


@pytest.mark.slow
def test_process_exit_status_and_stderr(tmp_path, shared):
    """The installed entry point as a shell sees it: status 2, the message on stderr, no traceback anywhere."""
    root = write_png_dataset(tmp_path / "d")
    (root / "img" / "p2_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    res = _cli(["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)})], tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "data error:" in res.stderr and "p2_0.png: UnidentifiedImageError: cannot identify image file" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr


@pytest.mark.slow
def test_bad_file_met_by_an_extraction_worker(tmp_path, shared):
    """A damaged file outside the pre-flight's sample is met by a Ray extraction task: the driver prints the
    reader's message (file, reader, cause), not Ray's wrapper, and exits 2."""
    root = write_png_dataset(tmp_path / "d", n_patients=40)  # 80 rows: the pre-flight decodes a sample
    png = root / "img" / "p5_1.png"  # not among the sampled rows (first, last and 6 between, per split)
    png.write_bytes(png.read_bytes()[:150])
    res = _cli(["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)}), "--no-analysis"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Pre-flight ok" in out and "Extraction stage" in out  # found by the worker, not the pre-flight
    assert "data error:" in res.stderr and "p5_1.png: the PNG/JPEG/TIFF reader (MONAI PILReader) failed" in res.stderr
    assert "Traceback" not in out and "RayTaskError" not in out


def _seg_dataset(root: Path, bad_label_patient: int | None) -> Path:
    """2D images with PNG label maps; one map holds a label the probe's 2 classes do not cover."""
    from PIL import Image

    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True)
    lines = ["path,patient_id,mask_path"]
    for p in range(16):
        img = (rng.random((32, 32)) * 100).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = 1
        img[mask == 1] += 120
        if p == bad_label_patient:
            mask[0, 0] = 7
        Image.fromarray(img).save(root / "img" / f"p{p}.png")
        Image.fromarray(mask).save(root / "img" / f"p{p}_mask.png")
        lines.append(f"img/p{p}.png,P{p},img/p{p}_mask.png")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def _seg_spec(tmp_path, shared, root):
    return spec_file(
        tmp_path,
        shared,
        filename="seg.yaml",
        **{
            "name": "user-errors-seg",
            "dataset": {"name": "manifest", "root": str(root)},
            "probes": [{"kind": "segmentation", "n_classes": 2, "steps": 4, "crop": 32}],
            "features": {"tokens": "patch_grid"},
            "resources": {"trial_retries": 0},
        },
    )


@pytest.mark.slow
def test_a_label_outside_the_probe_classes_is_named_before_anything_runs(tmp_path, shared):
    """The pre-flight reads every split's label maps: a label the probe does not cover is one line naming the
    mask, exit 2, before extraction (no cell run is started)."""
    from mlflow.tracking import MlflowClient

    from dinoscale import record

    root = _seg_dataset(tmp_path / "seg", bad_label_patient=3)
    res = _cli(["sweep", _seg_spec(tmp_path, shared, root), "--no-analysis"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "p3_mask.png: label value(s) [7] outside the probe's 2 classes" in out
    assert "Traceback" not in out and "RayTaskError" not in out
    client = MlflowClient(shared["uri"])
    exp = client.get_experiment_by_name("dinoscale-user-errors-seg")
    if exp is not None:
        cells = client.search_runs([exp.experiment_id], filter_string=f"tags.`{record.CELL}` LIKE '%segmentation%'")
        assert cells == []
    assert not list((tmp_path / "store").rglob("shard-*.npy"))  # nothing extracted


@pytest.mark.slow
def test_user_error_in_a_trial_reaches_the_driver_and_the_record(tmp_path, shared):
    """A mask edited while the sweep runs (after the pre-flight checked it) is met by the Ray Tune trial,
    which rebuilds the label maps: the summary prints the trial's own message, the cell's MLflow run records
    it (with the traceback artifact kept), and the exit status says it was the input."""

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from dinoscale import record

    root = _seg_dataset(tmp_path / "seg", bad_label_patient=None)
    log = tmp_path / "sweep.log"
    proc = _start(["sweep", _seg_spec(tmp_path, shared, root), "--no-analysis"], tmp_path, log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "store").rglob("labels/*.npy")):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        mask = np.asarray(Image.open(root / "img" / "p3_mask.png")).copy()
        mask[0, 0] = 7  # the pre-flight's label maps are now stale: the trial reads the mask again
        Image.fromarray(mask).save(root / "img" / "p3_mask.png")
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert proc.returncode == 2, out[-3000:]
    assert "p3_mask.png: label value(s) [7] outside the probe's 2 classes" in out
    assert "Traceback" not in out and "RayTaskError" not in out
    client = MlflowClient(shared["uri"])
    exp = client.get_experiment_by_name("dinoscale-user-errors-seg")
    cells = client.search_runs([exp.experiment_id], filter_string=f"tags.`{record.CELL}` LIKE '%segmentation%'")
    assert len(cells) == 1 and cells[0].info.status == "FAILED"
    assert (
        cells[0].data.tags[record.ERROR].startswith("data error: ")
        and "p3_mask.png" in cells[0].data.tags[record.ERROR]
    )
    folder = record.TRACEBACK.rsplit("/", 1)[0]
    assert record.TRACEBACK in {a.path for a in client.list_artifacts(cells[0].info.run_id, folder)}


# ---------------------------------------------------------------- interruption


def _start(args: list, cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "dinoscale.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: Ctrl-C reaches the driver and its Ray processes
    )


def _wait_for(predicate, what: str, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_nothing_lost(tmp_path):
    """Ctrl-C (SIGINT to the process group) during extraction, then SIGTERM (to the driver, as a scheduler
    sends it) during the trials of the resumed sweep, then a resume to the end: each stop exits 128 +
    signal with a message and no traceback, marks the parent run KILLED; the end has one FINISHED run per
    cell (none duplicated, finished ones not redone) and extracted no stored feature set again."""
    from mlflow.tracking import MlflowClient

    from conftest import tiny_spec_dict
    from dinoscale import record

    raw = tiny_spec_dict(
        tmp_path, backbones=[{"name": "dinov3-demo-xs", "weights": "random"}], name="xray-interrupt"
    )
    # 1 backbone x 2 resolutions x 2 probes x 3 seeds = 12 cells, one at a time: a cell takes ~1 s, so after the
    # first has finished, the stop (SIGTERM, then Tune's graceful stop) must leave some unfinished even on a
    # loaded machine (with 4 cells, CI once saw all 4 finish before the driver stopped)
    raw["seeds"] = [0, 1, 2]
    raw["resources"] = {**raw.get("resources", {}), "max_concurrent_trials": 1}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    client = MlflowClient(raw["tracking"]["uri"])

    def runs(status: str | None = None):
        exp = client.get_experiment_by_name("dinoscale-xray-interrupt")
        found = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in found if status is None or r.info.status == status]

    def parent():
        return next(r for r in runs() if r.data.tags.get(record.ROLE) == record.ROLE_SWEEP)

    # 1. Ctrl-C while the extraction tasks run
    log1 = tmp_path / "run1.log"
    p = _start(["sweep", spec, "--no-analysis"], tmp_path, log1)
    _wait_for(lambda: "Extraction stage" in log1.read_text(), "the extraction stage")
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(timeout=300) == 130, log1.read_text()[-3000:]
    out1 = log1.read_text()
    assert "interrupted by SIGINT during the extraction stage" in out1 and "--resume" in out1
    assert "Traceback" not in out1
    assert parent().info.status == "KILLED" and parent().data.tags[record.INTERRUPTED].startswith("SIGINT")

    # 2. resumed; SIGTERM to the driver once a cell has finished
    log2 = tmp_path / "run2.log"
    p = _start(["sweep", spec, "--no-analysis", "--resume"], tmp_path, log2)
    _wait_for(
        lambda: any(r.data.tags.get(record.ROLE) == record.ROLE_CELL for r in runs("FINISHED")), "a finished cell"
    )
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=300) == 143, log2.read_text()[-3000:]
    out2 = log2.read_text()
    assert "interrupted by SIGTERM during the trial stage" in out2 and "Traceback" not in out2
    assert parent().info.status == "KILLED" and not runs("RUNNING")
    finished = {r.info.run_id for r in runs("FINISHED") if r.data.tags.get(record.ROLE) == record.ROLE_CELL}
    assert 1 <= len(finished) < 12
    stored = {m: m.stat().st_mtime_ns for m in (tmp_path / "store" / "features").rglob("meta.json")}
    assert len(stored) == 6  # 2 resolutions x 3 splits, all extracted before the trials

    # 3. resumed to the end
    res = _cli(["sweep", spec, "--no-analysis", "--resume"], tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    cells = [r for r in runs() if r.data.tags.get(record.ROLE) == record.ROLE_CELL]
    assert len(cells) == 12 and len({r.data.tags[record.CELL] for r in cells}) == 12
    assert all(r.info.status == "FINISHED" for r in cells)
    assert finished <= {r.info.run_id for r in cells}  # the same runs, not duplicates
    assert all(r.data.tags[record.EVALUATIONS] == "1" for r in cells if r.info.run_id in finished)  # not redone
    assert parent().info.status == "FINISHED"
    assert {m: m.stat().st_mtime_ns for m in (tmp_path / "store" / "features").rglob("meta.json")} == stored
    history = client.get_metric_history(parent().info.run_id, "extraction_feature_sets_extracted")
    assert [m.value for m in sorted(history, key=lambda m: m.step)][-1] == 0


# ---------------------------------------------------------------- science checks of the pre-flight (issue 26)


def _one_error_line(res: subprocess.CompletedProcess, kind: str) -> str:
    """Exit 2, no traceback, and the error on exactly one line of stderr; returns that line."""
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "RayTaskError" not in out
    lines = [x for x in res.stderr.splitlines() if f"{kind} error:" in x]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_test_split_without_a_scorable_class_is_refused_before_extraction(tmp_path, shared):
    """No class has both a positive and a negative test patient: macro AUROC is undefined in every cell. The
    pre-flight says so in one line listing the classes (it was a RuntimeError traceback from inside each trial,
    after extraction)."""
    root = write_png_dataset(tmp_path / "d", split=True)
    csv = root / "manifest.csv"
    csv.write_text(csv.read_text().replace(",Nodule,test", ",,test"))  # every test patient negative
    res = _cli(["sweep", spec_file(tmp_path, shared, **{"dataset.root": str(root)}), "--no-analysis"], tmp_path)
    line = _one_error_line(res, "data")
    assert "no class has both a positive and a negative patient in the test split (4 patients)" in line
    assert "Nodule (0 positive, 4 negative)" in line and "Enlarge the test split" in line
    assert "Extraction stage" not in res.stdout + res.stderr
    assert not list((tmp_path / "store").rglob("shard-*.npy"))  # nothing extracted


@pytest.mark.slow
def test_a_ct_window_on_mri_is_refused_naming_the_window_and_the_modality(tmp_path, shared):
    """A ``modality: ct`` spec with the lung window on MSD BrainTumour (MRI, as its dataset.json states): one
    line naming the window, the modality and the share of decoded voxels it clips; nothing extracted."""
    from dinoscale.data.replicas import get_replica
    from dinoscale.spec import DatasetSpec

    subset = "Task01_BrainTumour"
    rep = get_replica("msd").write(tmp_path / "msd", DatasetSpec(name="msd", root="x", subset=subset))
    spec = spec_file(
        tmp_path,
        shared,
        filename="mri-as-ct.yaml",
        **{
            "name": "user-errors-window",
            "modality": "ct",
            "dataset": {"name": "msd", "root": str(rep.root), "subset": subset, "window": "lung"},
            "probes": [{"kind": "segmentation", "n_classes": 4, "steps": 4, "crop": 16}],
            "features": {"tokens": "patch_grid"},
        },
    )
    res = _cli(["sweep", spec, "--no-analysis"], tmp_path)
    line = _one_error_line(res, "data")
    assert "dataset.window lung = [-1350, 150] HU is a CT window" in line
    assert f"dataset 'msd' ({subset}) states its modality as FLAIR, T1w, t1gd, T2w, not CT" in line
    assert "of the sampled voxels" in line and "Remove dataset.window" in line
    assert not list((tmp_path / "store").rglob("shard-*.npy"))
