"""GPU requests come from what the cluster CAN run, not from the nodes up at submit time.

On an autoscaled cluster the GPU workers start at zero: deciding from `ray.cluster_resources()` at
submit time sent extraction (and trials on a resume) without GPU requests, so with 8-GPU node types
Ray packed them onto one node, all on GPU 0. Here a live Ray with no GPU stands for that moment; the
sweep's decision (`cluster_has_gpus`) must still say GPU when cluster.env or the launcher's node types
say the cluster has GPU workers, and the resulting trial bundle must be the one the cost guard models.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from dinoscale.spec import load_spec
from dinoscale.sweep.extraction import GPU_CLUSTER_ENV, cluster_has_gpus
from dinoscale.sweep.plan import build_plan
from dinoscale.sweep.runner import trial_resources

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster" / "check"))
import node_selection  # noqa: E402 - the cost guard's demand model, beside the cluster checks


def test_gpu_decision_from_settings_and_node_types_not_from_live_nodes(ray_local, tmp_path, monkeypatch):
    assert ray_local.cluster_resources().get("GPU", 0) == 0  # no GPU worker up yet
    monkeypatch.delenv(GPU_CLUSTER_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not cluster_has_gpus()  # embedded Ray / CPU Slurm: the live nodes decide
    # the launcher head: Ray's copy of the rendered YAML names GPU node types
    rendered = subprocess.run(
        [sys.executable, str(ROOT / "cluster/scripts/render_launcher.py"), str(ROOT / "cluster/launcher/aws.yaml")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    (tmp_path / "ray_bootstrap_config.yaml").write_text(rendered)
    assert cluster_has_gpus()
    monkeypatch.setenv(GPU_CLUSTER_ENV, "0")
    assert not cluster_has_gpus()
    # KubeRay (no bootstrap file): cluster.env, the ConfigMap, says so
    (tmp_path / "ray_bootstrap_config.yaml").unlink()
    value = re.search(rf"^{GPU_CLUSTER_ENV}=(\S+)", (ROOT / "cluster/cluster.env").read_text(), re.M).group(1)
    monkeypatch.setenv(GPU_CLUSTER_ENV, value)
    assert cluster_has_gpus()


def test_trial_bundle_with_workers_at_zero_is_the_one_the_cost_guard_models(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "store"))
    spec_path = ROOT / "sweeps" / "xray.yaml"
    spec = load_spec(spec_path)
    plan = build_plan(spec, ROOT)
    bundle = trial_resources(plan.cells[0], spec, has_gpu=True)
    ((guard, count),) = node_selection.sweep_demands(spec_path)["trials"]
    assert bundle == {"CPU": guard["CPU"], "GPU": guard["GPU"]} and bundle["GPU"] > 0
    assert count == len(plan.cells)
    extraction = yaml.safe_load(spec_path.read_text()).get("resources", {})
    ((ex, _),) = node_selection.sweep_demands(spec_path)["extraction"]
    assert ex["GPU"] == extraction.get("gpus_per_extraction", 1) > 0
