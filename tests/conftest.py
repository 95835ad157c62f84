import copy
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A developer's shell must not redirect the suite either: tests that need these variables set them themselves.
_SETTING_VARS = (
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "DINOSCALE_TRACKING_URI",
    "DINOSCALE_STORAGE",
    "DINOSCALE_RAY_ADDRESS",
    "DINOSCALE_REPORTS",
)


@pytest.fixture(autouse=True)
def _settings_stay_in_their_test():
    """A command run in-process (CliRunner) turns its --tracking-uri / --storage / --address flags into this
    process's DINOSCALE_* variables (dinoscale.settings.apply_flags), and ``mlflow.set_tracking_uri`` sets
    MLFLOW_TRACKING_URI: either would send every later test's sweep to this test's store (the settings
    precedence puts them above the spec). Each test starts and ends without them."""
    for var in _SETTING_VARS:
        os.environ.pop(var, None)
    yield
    leaked = {var for var in _SETTING_VARS if os.environ.pop(var, None) is not None}
    if "MLFLOW_TRACKING_URI" in leaked:
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(None)  # mlflow's own copy of it too
        # nothing in dinoscale sets it, and a user's notebook would keep it: a leak is a bug of its own
        pytest.fail("MLFLOW_TRACKING_URI was left set (mlflow.set_tracking_uri?): use MlflowClient(uri)")


def tiny_spec_dict(tmp_path: Path, **overrides) -> dict:
    """A demo spec small enough for tests: 2 backbones x 2 resolutions x 2 probes, ~100 images."""
    spec = yaml.safe_load((ROOT / "sweeps" / "demo" / "xray.yaml").read_text())
    spec.update(
        {
            "name": "xray-test",
            "backbones": [
                {"name": "dinov3-demo-xs", "weights": "random"},
                {"name": "dinov3-demo-s", "weights": "random"},
            ],
            "resolutions": [32, 64],
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db"},
            "storage": {"path": str(tmp_path / "store")},
            "ray": {"num_cpus": 2},
        }
    )
    spec["dataset"] = copy.deepcopy(spec["dataset"])
    # 34 patients: 10 in test, the fewest over which a bootstrap interval is computed (metrics.MIN_INTERVAL_UNITS)
    spec["dataset"]["phantom"].update({"n_patients": 34, "images_per_patient": [2, 4], "image_size": 128})
    spec["probes"][0]["epochs"] = 20
    spec["metrics"] = {"bootstrap": {"resamples": 200, "level": 0.95, "seed": 0}}
    spec.update(overrides)
    return spec


@pytest.fixture
def tiny_spec(tmp_path):
    from dinoscale.spec import parse_spec

    return parse_spec(tiny_spec_dict(tmp_path))


@pytest.fixture(scope="module")
def ray_local():
    """An embedded Ray for the tests that need one (started once and kept; cluster tests replace it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def separable_splits(n=240, d=16, c=3, seed=0):
    """Train/val/test feature splits where label j is linearly separable on feature j (known answer: AUROC 1)."""
    import numpy as np

    from dinoscale.probes import Split

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, c)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, :c] += 4 * (2 * y - 1)
    parts = np.split(np.arange(n), [n // 2, 3 * n // 4])
    return [Split(x[p], y[p]) for p in parts]


# Debian's chromium, headless and hermetic: a fresh profile, no background traffic (the network is closed).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots kept for a person to look at (gitignored)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser of the browser tests. Absent: they skip with the reason on a developer's machine and
    FAIL in CI (env CI set), where .ci/run installs it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        why = "headless Chromium is not installed (apt-get update && apt-get install -y chromium; CI installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return exe


def wait_until_serving(proc, url: str, log: Path, what: str, timeout: float) -> None:
    """Wait for a server started as ``proc`` to answer ``{url}/health``; fail with its log if it exits or stays
    silent for ``timeout`` seconds."""
    import time

    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"{what} exited early:\n{log.read_text()[-3000:]}"
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
