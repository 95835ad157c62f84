"""The spec's resources as sbatch options (cluster/slurm/slurm_ray.py), and the auto-resume decision."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from conftest import tiny_spec_dict
from dinoscale.spec import parse_spec
from dinoscale.sweep.state import SweepState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster" / "slurm"))
import slurm_ray  # noqa: E402 - the helper lives beside the sbatch template, not in the package


def _opts(spec: dict, gpus: int | None = None) -> dict[str, str]:
    ns = argparse.Namespace(
        nodes=2,
        gpus=gpus,
        cpus=None,
        mem_gb=None,
        time="24:00:00",
        signal_lead=180,
        partition="",
        account="",
        output="",
    )
    return dict(o.lstrip("-").split("=", 1) for o in slurm_ray.sbatch_options(parse_spec(spec), ns))


def test_gpu_options_follow_the_spec_resources(tmp_path):
    spec = tiny_spec_dict(tmp_path, profile="paper")
    spec["resources"] = {"cpus_per_trial": 2, "gpus_per_trial": 0.25, "cpus_per_extraction": 6, "node_memory_gb": 120}
    o = _opts(spec, gpus=4)
    # 4 GPUs: 16 frozen trials x 2 CPUs = 32 > 4 extraction tasks x 6 CPUs = 24
    assert o["gres"] == "gpu:4" and o["cpus-per-task"] == "32" and o["mem"] == "120G"
    assert o["nodes"] == "2" and o["ntasks-per-node"] == "1" and o["signal"] == "B:TERM@180"
    spec["strategies"] = ["frozen", "lora"]  # fine-tuning: one trial per GPU
    spec["resources"]["cpus_per_trial"] = 4
    assert _opts(spec, gpus=4)["cpus-per-task"] == "24"


def test_cpu_only_demo_spec_has_no_gres_and_a_plan_based_memory(tmp_path):
    o = _opts(tiny_spec_dict(tmp_path))
    assert "gres" not in o and o["cpus-per-task"] == "2"  # the spec's ray.num_cpus
    assert int(o["mem"].rstrip("G")) >= slurm_ray.MIN_MEM_GIB


def test_resume_flag_only_for_an_unfinished_sweep(tmp_path, monkeypatch):
    monkeypatch.delenv("DINOSCALE_STORAGE", raising=False)
    spec = parse_spec(tiny_spec_dict(tmp_path))
    assert slurm_ray.resume_flag(spec) == ""
    state = SweepState("s1", spec.name, spec.digest(), "p", "e", "sqlite://", "t", status="running")
    state.save(tmp_path / "store")
    assert slurm_ray.resume_flag(spec) == "--resume"
    state.status = "finished"
    state.save(tmp_path / "store")
    assert slurm_ray.resume_flag(spec) == ""


def test_cli_names_a_missing_spec_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "cluster/slurm/slurm_ray.py"), "options", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr


def test_scripts_parse():
    for f in ("dinoscale.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "cluster/slurm" / f)], check=False).returncode == 0
