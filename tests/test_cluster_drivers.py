"""Host images and the image's CUDA build stay matched, and the AWS AMI is looked up, not hard-coded.

- The image's torch is a CUDA build (cluster/Dockerfile BASE_IMAGE, cudaX.Y); every GPU host image the
  launchers boot must carry a driver at least as new as that CUDA needs, and the floor stated in the
  Dockerfile label, cluster.env (DINOSCALE_MIN_DRIVER, checked on the node by wait-for-gpu.sh) and the
  GCP families must agree: change the base image without the rest and this fails.
- AWS: every node type boots the Deep Learning OSS-driver AMI through its SSM public parameter, looked
  up in the rendered region (moto's SSM here, a real boto3 client); the region reaches the containers.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from test_cluster_scripts import SCRIPTS, _gpu_node

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# NVIDIA's CUDA toolkit release notes, table 3 (minimum Linux driver for CUDA minor version compatibility
# does not apply to torch's bundled runtime: these are the toolkit drivers)
CUDA_MIN_DRIVER = {"12.1": 530, "12.4": 550, "12.6": 560, "12.8": 570, "12.9": 575, "13.0": 580}
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert m, name
    return m.group(1)


def _env(key: str) -> str:
    m = re.search(rf"^{key}=(\S*)", (CLUSTER / "cluster.env").read_text(), re.M)
    assert m, key
    return m.group(1)


def _launcher(cloud: str) -> dict:
    return yaml.safe_load((CLUSTER / "launcher" / f"{cloud}.yaml").read_text())


def test_driver_floor_matches_the_image_cuda_build_everywhere():
    base = _dockerfile_arg("BASE_IMAGE")
    cuda = re.search(r"cuda(\d+\.\d+)", base).group(1)
    floor = CUDA_MIN_DRIVER[cuda]
    assert int(_dockerfile_arg("MIN_NVIDIA_DRIVER")) == floor, base
    assert int(_env("DINOSCALE_MIN_DRIVER")) == floor
    make = (ROOT / "Makefile").read_text()
    assert f"BASE_IMAGE    ?= {base}" in make  # `make cluster-image` builds the same base
    gcp = _launcher("gcp")
    for name, t in gcp["available_node_types"].items():
        if not t.get("resources", {}).get("GPU"):
            continue
        image = t["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        m = re.search(r"family/common-cu(\d+)-.*-nvidia-(\d+)$", image)
        assert m, f"{name}: {image} names no driver branch"
        assert int(m.group(2)) >= floor, f"{name}: driver {m.group(2)} < {floor} for CUDA {cuda}"


def test_aws_nodes_boot_the_dlami_from_its_ssm_parameter():
    aws = _launcher("aws")
    assert aws["auth"]["ssh_user"] == "ubuntu"  # the DLAMI Ubuntu user (Amazon Linux would be ec2-user)
    for name, t in aws["available_node_types"].items():
        assert t["node_config"]["ImageId"] == DLAMI, name
        assert t["node_config"]["BlockDeviceMappings"][0]["DeviceName"] == "/dev/sda1", name  # Ubuntu's root
    assert not re.search(r"ami-[0-9a-f]{8}", (CLUSTER / "launcher" / "aws.yaml").read_text())  # no hard-coded id


def _render(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run(
        [
            sys.executable,
            str(CLUSTER / "scripts" / "render_launcher.py"),
            str(CLUSTER / "launcher" / "aws.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_render_sets_one_region_for_provider_and_containers():
    r = _render("--region", "eu-central-1")
    assert r.returncode == 0, r.stderr
    out = yaml.safe_load(r.stdout)
    assert out["provider"]["region"] == "eu-central-1" and "availability_zone" not in out["provider"]
    opts = out["docker"]["run_options"]
    assert "--env AWS_DEFAULT_REGION=eu-central-1" in opts and not any("us-east-1" in o for o in opts)


def test_resolve_amis_writes_the_parameter_value_into_every_node_type(monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    sys_path = str(CLUSTER / "scripts")
    monkeypatch.syspath_prepend(sys_path)
    import render_launcher

    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_SESSION_TOKEN": "x"}.items():
        monkeypatch.setenv(k, v)
    # AWS reserves /aws/... names (moto too): a parameter of our own stands in for the public one
    config = render_launcher.render(_launcher("aws"), region="eu-central-1")
    for t in config["available_node_types"].values():
        t["node_config"]["ImageId"] = "resolve:ssm:/dinoscale-test/dlami"
    with moto.mock_aws():
        boto3.client("ssm", region_name="eu-central-1").put_parameter(
            Name="/dinoscale-test/dlami", Value="ami-0123456789abcdef0", Type="String"
        )
        found = render_launcher.resolve_amis(config)
        assert found == {"/dinoscale-test/dlami": "ami-0123456789abcdef0"}
        assert {t["node_config"]["ImageId"] for t in config["available_node_types"].values()} == {
            "ami-0123456789abcdef0"
        }
        # the public parameter is absent from the emulator: one message naming it, the region and the check
        config = render_launcher.render(_launcher("aws"), region="eu-central-1")
        with pytest.raises(
            render_launcher.RenderError, match="base-oss-nvidia-driver.*eu-central-1.*aws ssm get-parameter"
        ):
            render_launcher.resolve_amis(config)


def _gpu_with_driver(tmp_path: Path, version: str) -> dict:
    env = _gpu_node(tmp_path, nvidia=True, smi_fails=0)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(
        f'#!/bin/sh\ncase "$*" in *driver_version*) echo "{version}" ;; *) echo "GPU 0: NVIDIA L4 (UUID: GPU-x)" ;; esac\n'
    )
    return env


def _wait(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(SCRIPTS / "wait-for-gpu.sh")], env=env, capture_output=True, text=True, timeout=60)


def test_wait_for_gpu_stops_a_node_whose_driver_is_too_old(tmp_path):
    r = _wait(_gpu_with_driver(tmp_path, "550.90.07"))  # the floor comes from cluster.env beside the script
    assert r.returncode == 1 and "550.90.07 is older than 580" in r.stderr


def test_wait_for_gpu_accepts_a_new_enough_driver(tmp_path):
    r = _wait(_gpu_with_driver(tmp_path, "580.65.06"))
    assert r.returncode == 0, r.stderr
    assert "driver 580.65.06 (>= 580)" in r.stdout


def test_image_working_directory_belongs_to_the_runtime_user():
    """Jobs run in the image's WORKDIR (Ray keeps `ray start`'s folder) and write reports/ there: a
    WORKDIR made as root with `USER 1000` after it failed every cluster sweep at its last step."""
    text = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    user = re.search(r"^USER (\d+):(\d+)", text, re.M)
    chown = re.search(rf"chown {user.group(1)}:{user.group(2)} {re.escape(workdir)}\b", text)
    assert chown and chown.start() < user.start(), "chown the WORKDIR to the runtime user before USER"
