"""The conventions people type by: MLFLOW_TRACKING_URI and RAY_ADDRESS honoured with one precedence (flag >
DINOSCALE_* > the ecosystem's variable > the spec), DINOSCALE_STORAGE for `cache`, `--version` and `-h`
everywhere, choices refused before any heavy import, and `dinoscale ui` serving the runs table.

The command line runs as a user runs it: a subprocess of this interpreter (`python -m dinoscale.cli`), with
a tracking server or a Ray cluster that is not there where the point is which address was used (the
message names it within a second, before torch is imported); the store-backed cases run for real."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import typer
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import ROOT, free_port, tiny_spec_dict, wait_until_serving
from dinoscale import __version__, record, settings
from dinoscale.cli import OnBadFile, Variant, app
from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore
from dinoscale.mlflow_ui import browse_hint
from dinoscale.tracking import resolve_tracking_uri, runs_table_url

VARS = ("DINOSCALE_TRACKING_URI", "MLFLOW_TRACKING_URI", "DINOSCALE_STORAGE", "DINOSCALE_RAY_ADDRESS", "RAY_ADDRESS")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """None of the variables from the developer's shell; the in-process commands' flags undone after each test."""
    for var in VARS:
        monkeypatch.delenv(var, raising=False)


def cli(*args, env: dict | None = None, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in VARS}
    return subprocess.run(
        [sys.executable, "-m", "dinoscale.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**base, "COLUMNS": "300", **(env or {})},  # usage errors unwrapped
        cwd=cwd,
        timeout=timeout,
    )


def closed_port() -> int:
    return free_port()  # bound then released: nothing listens there


@pytest.fixture
def spec_path(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tmp_path), sort_keys=False))
    return path


def _commands(group, path=()):
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, (*path, name))


# ---------------------------------------------------------------- --version, -h, choices


def test_version_at_the_top_and_on_every_command():
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dinoscale {__version__}", r
    paths = [p for p, _ in _commands(typer.main.get_command(app))]
    assert ("sweep",) in paths and ("cache", "verify") in paths and ("ui",) in paths
    for path in paths:
        res = CliRunner().invoke(app, [*path, "--version"])
        assert res.exit_code == 0 and res.output.strip() == f"dinoscale {__version__}", (path, res.output)


def test_h_is_help_everywhere():
    for path, _ in _commands(typer.main.get_command(app)):
        short = CliRunner().invoke(app, [*path, "-h"], env={"COLUMNS": "200"})
        long = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert short.exit_code == 0 and short.output == long.output and "Usage: " in short.output, path


def test_choices_are_listed_in_help_and_match_what_the_package_accepts():
    from dinoscale.data.replicas import VARIANTS

    assert tuple(v.value for v in Variant) == VARIANTS
    assert [v.value for v in OnBadFile] == ["error", "skip"]
    res = CliRunner().invoke(app, ["rehearse", "-h"], env={"COLUMNS": "200"})
    assert "ok|corrupt_file|bad_label|mask_shape" in res.output and "error|skip" in res.output


def test_a_bad_choice_is_refused_in_under_a_second_before_torch_is_imported():
    """The parser refuses it with nothing heavy imported first: under a second of CPU (0.3 s measured here;
    the wall clock of a machine shared by many processes is only bounded loosely)."""
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cpus, walls = [], []
    for _ in range(3):
        c0, t0 = cpu(), time.perf_counter()
        r = cli("rehearse", "sweeps/xray.yaml", "--variant", "nope")
        cpus.append(cpu() - c0)
        walls.append(time.perf_counter() - t0)
        assert r.returncode == 2 and "'nope' is not one of" in r.stderr, r.stderr[-2000:]
    assert min(cpus) < 1.0 and min(walls) < 5.0, (cpus, walls)
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dinoscale.cli", "rehearse", "sweeps/xray.yaml", "--variant", "no"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert r.returncode == 2 and {"typer", "dinoscale.settings"} <= imported  # importtime saw the imports
    assert not imported & {"torch", "ray", "mlflow", "timm", "monai", "numpy"}, imported & {"torch", "numpy"}
    r = cli("rehearse", "sweeps/xray.yaml", "--on-bad-file", "maybe")
    assert r.returncode == 2 and "'maybe' is not one of 'error', 'skip'" in r.stderr


# ---------------------------------------------------------------- MLFLOW_TRACKING_URI and its precedence


def test_mlflow_tracking_uri_is_honoured_and_dinoscale_variable_and_flag_beat_it(spec_path):
    """A server that is down is reported within a second, naming the URI in use and where it came from."""
    a, b, c = (f"http://127.0.0.1:{closed_port()}" for _ in range(3))
    r = cli("preflight", spec_path, env={"MLFLOW_TRACKING_URI": a})
    assert r.returncode == 2 and f"tracking server {a} (from MLFLOW_TRACKING_URI)" in r.stderr, r.stderr
    r = cli("preflight", spec_path, env={"MLFLOW_TRACKING_URI": a, "DINOSCALE_TRACKING_URI": b})
    assert r.returncode == 2 and f"tracking server {b} (from --tracking-uri / DINOSCALE_TRACKING_URI)" in r.stderr
    r = cli("sweep", spec_path, "--tracking-uri", c, env={"MLFLOW_TRACKING_URI": a, "DINOSCALE_TRACKING_URI": b})
    assert r.returncode == 2 and f"tracking server {c} " in r.stderr and a not in r.stderr and b not in r.stderr
    assert "Traceback" not in r.stderr


def test_precedence_of_each_setting(monkeypatch, tmp_path):
    assert settings.tracking_uri("sqlite:///spec.db") == "sqlite:///spec.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert settings.tracking_uri("sqlite:///spec.db") == "sqlite:///mlflow.db"
    monkeypatch.setenv("DINOSCALE_TRACKING_URI", "sqlite:///dinoscale.db")
    assert settings.tracking_uri("sqlite:///spec.db") == "sqlite:///dinoscale.db"
    assert settings.tracking_uri("sqlite:///spec.db", "sqlite:///flag.db") == "sqlite:///flag.db"
    assert resolve_tracking_uri("sqlite:///spec.db", tmp_path) == f"sqlite:///{tmp_path}/dinoscale.db"

    assert settings.ray_address(None) is None  # no address anywhere: the embedded local Ray
    assert settings.ray_address("spec:6379") == "spec:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray:6379")
    assert settings.ray_address("spec:6379") == "ray:6379"
    assert settings.ray_address_source("spec:6379") == "RAY_ADDRESS"
    monkeypatch.setenv("DINOSCALE_RAY_ADDRESS", "dinoscale:6379")
    assert settings.ray_address("spec:6379") == "dinoscale:6379"
    assert settings.ray_address("spec:6379", "auto") == "auto"

    assert settings.storage_root("rel", project_dir=tmp_path) == tmp_path / "rel"
    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "env"))
    assert settings.storage_root("rel", project_dir=tmp_path) == tmp_path / "env"
    assert settings.storage_root("rel", str(tmp_path / "flag")) == tmp_path / "flag"

    # reports: the project's on a laptop, the storage's on a cluster (the one path every node sees), the variable's
    assert settings.reports_root(tmp_path / "store", on_cluster=False, project_dir=tmp_path) == tmp_path / "reports"
    assert (
        settings.reports_root(tmp_path / "store", on_cluster=True, project_dir=tmp_path) == tmp_path / "store/reports"
    )
    monkeypatch.setenv("DINOSCALE_REPORTS", "out")
    assert settings.reports_root(tmp_path / "store", on_cluster=True, project_dir=tmp_path) == tmp_path / "out"


@pytest.mark.slow
def test_preflight_writes_to_the_store_mlflow_tracking_uri_names(spec_path, tmp_path):
    db = tmp_path / "elsewhere" / "from-env.db"
    r = cli("preflight", spec_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"tracking sqlite:///{db} " in r.stdout and db.is_file()
    assert not (tmp_path / "mlruns.db").exists()  # the spec's own store was not used


# ---------------------------------------------------------------- RAY_ADDRESS and its precedence


def test_ray_address_is_honoured_with_one_clear_line_and_its_precedence(spec_path):
    """A cluster that is not there: named with where its address came from, exit 2, in seconds (ray.init
    would retry it for minutes); no cluster is started."""
    a, b, c = (f"127.0.0.1:{closed_port()}" for _ in range(3))
    t0 = time.perf_counter()
    r = cli("sweep", spec_path, env={"RAY_ADDRESS": a})
    assert time.perf_counter() - t0 < 30
    assert r.returncode == 2 and r.stderr.startswith(f"ray error: Ray address '{a}' (RAY_ADDRESS)"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = cli("sweep", spec_path, env={"RAY_ADDRESS": a, "DINOSCALE_RAY_ADDRESS": b})
    assert r.returncode == 2 and f"'{b}' (DINOSCALE_RAY_ADDRESS)" in r.stderr
    r = cli("rehearse", "sweeps/xray.yaml", "--address", c, env={"RAY_ADDRESS": a, "DINOSCALE_RAY_ADDRESS": b})
    assert r.returncode == 2 and f"'{c}' (--address)" in r.stderr
    r = cli("sweep", spec_path, env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert r.returncode == 2 and "dashboard / job-submission URL" in r.stderr and "6379" in r.stderr


def test_a_ray_address_that_answers_is_announced(spec_path):
    """Something listening at RAY_ADDRESS: the sweep says it joins it (it is used, never ignored); the
    tracking server checked next is down, so nothing starts."""
    import socket

    raw = yaml.safe_load(spec_path.read_text())
    raw["tracking"] = {"uri": f"http://127.0.0.1:{closed_port()}"}
    spec_path.write_text(yaml.safe_dump(raw))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        r = cli("sweep", spec_path, env={"RAY_ADDRESS": address})
    assert f"Ray: joining the cluster at {address} (RAY_ADDRESS)" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 2 and "tracking error" in r.stderr


# ---------------------------------------------------------------- DINOSCALE_STORAGE for `cache`


def _one_entry(root: Path) -> str:
    key = FeatureKey(
        FeatureRecipe("vit_small_patch16_dinov3", "random-seed0", 64, (0.5,) * 3, (0.25,) * 3, dtype="float16"), "abc"
    )
    FeatureStore(root / "features").put(key, np.ones((3, 4), np.float32), list("abc"), extra={"split": "train"})
    return key.digest


def test_cache_reads_the_storage_of_the_one_precedence(tmp_path, spec_path):
    in_env, in_flag = _one_entry(tmp_path / "env"), _one_entry(tmp_path / "flag")
    r = cli("cache", "ls", env={"DINOSCALE_STORAGE": str(tmp_path / "env")})
    assert r.returncode == 0 and in_env in r.stdout and f"1 entry in {tmp_path / 'env' / 'features'}" in r.stdout
    r = cli("cache", "ls", spec_path, env={"DINOSCALE_STORAGE": str(tmp_path / "env")})  # beats storage.path
    assert r.returncode == 0 and f"in {tmp_path / 'env' / 'features'}" in r.stdout, r.stdout + r.stderr
    r = cli("cache", "verify", spec_path, "--storage", tmp_path / "flag", env={"DINOSCALE_STORAGE": "/nowhere"})
    assert r.returncode == 0 and f"{in_flag}  ok" in r.stdout and "1 ok, 0 damaged" in r.stdout
    r = cli("cache", "verify", "--spec", spec_path, in_env, env={"DINOSCALE_STORAGE": str(tmp_path / "env")})
    assert r.returncode == 0 and f"{in_env}  ok" in r.stdout  # the old --spec spelling still works
    r = cli("cache", "rm", spec_path, in_flag, "--storage", tmp_path / "flag")
    assert r.returncode == 0 and f"removed {in_flag}" in r.stdout


# ---------------------------------------------------------------- dinoscale ui and the closing hint


def test_browse_hint_names_a_command_that_works_for_this_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = resolve_tracking_uri(settings.DEFAULT_TRACKING_URI)
    link = runs_table_url("http://127.0.0.1:5000", "7")
    assert browse_hint(default, "7") == f"Browse with `dinoscale ui`, then open {link}"
    other = f"sqlite:///{tmp_path}/other dir/m.db"
    assert browse_hint(other, "7") == f"Browse with `dinoscale ui --tracking-uri '{other}'`, then open {link}"
    server = "http://mlflow.example:5000"
    assert browse_hint(server, "7") == f"Browse: {runs_table_url(server, '7')}"


def _recorded_sweep(uri: str) -> tuple[str, str]:
    """An experiment holding one sweep's parent run, tagged as the runner tags it."""
    client = MlflowClient(uri)
    exp = client.create_experiment("dinoscale-ui-test")
    run = client.create_run(exp, run_name="ui-sweep", tags={record.ROLE: record.ROLE_SWEEP})
    client.set_terminated(run.info.run_id)
    return exp, run.info.run_id


@pytest.mark.slow
def test_dinoscale_ui_serves_the_runs_table_of_the_store_in_use(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    exp, run_id = _recorded_sweep(uri)
    port, log = free_port(), tmp_path / "ui.log"
    env = {k: v for k, v in os.environ.items() if k not in VARS} | {"MLFLOW_TRACKING_URI": uri}
    with open(log, "w") as sink:  # the store from MLFLOW_TRACKING_URI: the precedence holds for `ui` too
        proc = subprocess.Popen(
            [sys.executable, "-m", "dinoscale.cli", "ui", "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, log, "dinoscale ui", 180)
        printed = log.read_text()
        link = runs_table_url(url, exp)
        assert f"dinoscale-ui-test: {link}" in printed, printed
        assert requests.get(link, timeout=10).status_code == 200  # the UI's page (the part after # is the browser's)
        found = requests.post(f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp]}, timeout=10)
        assert found.status_code == 200 and [r["info"]["run_id"] for r in found.json()["runs"]] == [run_id]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_make_ui_runs_dinoscale_ui():
    recipe = subprocess.run(
        ["make", "-n", "ui", "-o", ".venv/.installed", "PORT=5123"], cwd=ROOT, text=True, capture_output=True
    )
    assert recipe.returncode == 0 and "dinoscale ui" in recipe.stdout and "--port 5123" in recipe.stdout, recipe


def test_output_piped_into_a_reader_that_leaves_is_no_bug():
    """`dinoscale validate SPEC --show | head -1`: the reader closes the pipe early; no traceback, no bug report."""
    import subprocess

    p = subprocess.run(
        f"{sys.executable} -m dinoscale.cli validate {ROOT / 'sweeps/demo/xray.yaml'} --show | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stdout.startswith("#") and "Traceback" not in p.stderr and "a bug in dinoscale" not in p.stderr
