"""The node scripts of cluster/scripts/, run for real:
with-secrets.sh   against a local AWS API emulator (moto's server): a real boto3 client reads the
                  secrets, with the region from the environment or from an emulated instance
                  metadata service (IMDSv2), as on an EC2 node where boto3 finds no region itself
registry-login.sh with stand-in aws / gcloud / docker commands that record what they are asked
wait-for-gpu.sh   with a stand-in sysfs, nvidia-smi and docker
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "cluster" / "scripts"
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(tmp_path: Path, **extra) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "AWS_CONFIG_FILE": str(home / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


# ---------------------------------------------------------------- with-secrets.sh against moto


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory):
    exe = shutil.which("moto_server", path=str(VENV_BIN))
    if exe is None:
        msg = "moto's server is not installed (pip install 'moto[server]'; it is in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    port = _free_port()
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/moto-api/", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, "moto_server exited"
            time.sleep(0.3)
        else:
            raise AssertionError("moto_server did not start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


AWS_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
TRICKY = "pa ss'w\"ord $HOME `x`"  # survives the shell round trip untouched


def _create_secrets(url: str, region: str, prefix: str) -> dict[str, str]:
    import boto3

    client = boto3.client(
        "secretsmanager", region_name=region, endpoint_url=url, **{k.lower(): v for k, v in AWS_KEYS.items()}
    )
    values = {
        "dinoscale-mlflow-username": f"{prefix}-user",
        "dinoscale-mlflow-password": TRICKY,
        "dinoscale-ray-token": f"{prefix}-token",
    }
    for name, value in values.items():
        try:
            client.create_secret(Name=name, SecretString=value)
        except client.exceptions.ResourceExistsException:
            client.put_secret_value(SecretId=name, SecretString=value)
    return values


SHOW = [
    "sh",
    "-c",
    'printf "%s|%s|%s|%s" "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD" "$RAY_AUTH_TOKEN" "$RAY_AUTH_MODE"',
]


def _with_secrets(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPTS / "with-secrets.sh"), *SHOW], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_with_secrets_reads_aws_secrets_manager_in_the_configured_region(moto_server, tmp_path):
    values = _create_secrets(moto_server, "us-east-1", "east")
    env = _base_env(
        tmp_path, DINOSCALE_SECRETS="aws", AWS_ENDPOINT_URL=moto_server, AWS_DEFAULT_REGION="us-east-1", **AWS_KEYS
    )
    r = _with_secrets(env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"east-user|{TRICKY}|east-token|token"
    assert values["dinoscale-ray-token"] == "east-token"


class _IMDS(http.server.BaseHTTPRequestHandler):
    """The two IMDSv2 calls botocore makes for the region: a session token, then the zone."""

    zone = "eu-west-1b"

    def do_PUT(self):
        ok = self.path.rstrip("/") == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._reply(200 if ok else 400, "imds-token")

    def do_GET(self):
        ok = (
            self.path.rstrip("/") == "/latest/meta-data/placement/availability-zone"
            and self.headers.get("X-aws-ec2-metadata-token") == "imds-token"
        )
        self._reply(200 if ok else 401, self.zone)

    def _reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _IMDS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_with_secrets_takes_the_region_from_instance_metadata_when_none_is_set(moto_server, imds, tmp_path):
    """On an EC2 node boto3 finds no region by itself (NoRegionError): the script asks the instance
    metadata service, and the secrets of THAT region are read."""
    _create_secrets(moto_server, "us-east-1", "east")
    _create_secrets(moto_server, "eu-west-1", "west")
    env = _base_env(
        tmp_path,
        DINOSCALE_SECRETS="aws",
        AWS_ENDPOINT_URL=moto_server,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds,
        **AWS_KEYS,
    )
    r = _with_secrets(env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("west-user|") and "|west-token|" in r.stdout


def test_with_secrets_without_any_region_stops_with_a_clear_message(moto_server, tmp_path):
    env = _base_env(
        tmp_path,
        DINOSCALE_SECRETS="aws",
        AWS_ENDPOINT_URL=moto_server,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:{_free_port()}",
        **AWS_KEYS,
    )
    r = _with_secrets(env)
    assert r.returncode == 2 and "no AWS region" in r.stderr and "with-secrets.sh" in r.stderr, r.stderr
    assert r.stdout == ""


def test_with_secrets_refuses_to_start_without_them(tmp_path):
    env = _base_env(tmp_path, DINOSCALE_SECRETS="env")
    r = subprocess.run([str(SCRIPTS / "with-secrets.sh"), "true"], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "MLFLOW_TRACKING_USERNAME" in r.stderr
    env.update(MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD="p", RAY_AUTH_TOKEN="t")
    r = subprocess.run([str(SCRIPTS / "with-secrets.sh"), *SHOW], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout == "u|p|t|token", "the token comes with RAY_AUTH_MODE=token"


# ---------------------------------------------------------------- registry-login.sh


def _stubs(tmp_path: Path, fail: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """aws, gcloud, docker, curl stand-ins that append `name argv... <stdin` to a log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, out in {"aws": "aws-secret", "gcloud": "gcloud-token", "docker": "", "curl": ""}.items():
        (bin_dir / name).write_text(
            "#!/bin/sh\n"
            f'stdin=""; if [ "{name}" = docker ]; then stdin="$(cat)"; fi\n'
            f'echo "{name} $* <$stdin" >> "{log}"\n'
            f"{'exit 1' if name in fail else f'printf %s {out}'}\n"
        )
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def _login(
    tmp_path: Path, cloud: str, image: str, env_lines: str = "", fail=()
) -> tuple[subprocess.CompletedProcess, list[str]]:
    # the layout on a node: <copy of cluster/>/scripts/registry-login.sh beside <copy>/cluster.env
    copy = tmp_path / "cluster"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / "registry-login.sh", copy / "scripts")
    (copy / "cluster.env").write_text((ROOT / "cluster" / "cluster.env").read_text() + env_lines)
    bin_dir, log = _stubs(tmp_path, fail)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "AWS_DEFAULT_REGION": "us-east-2"}
    r = subprocess.run(
        ["sh", str(copy / "scripts" / "registry-login.sh"), cloud, image],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return r, (log.read_text().splitlines() if log.exists() else [])


def test_registry_login_ecr_with_the_instance_profile(tmp_path):
    r, calls = _login(tmp_path, "aws", "123456789012.dkr.ecr.us-west-2.amazonaws.com/dinoscale:0.1")
    assert r.returncode == 0, r.stderr
    assert calls == [
        "aws ecr get-login-password --region us-west-2 <",
        "docker login --username AWS --password-stdin 123456789012.dkr.ecr.us-west-2.amazonaws.com <aws-secret",
    ]


def test_registry_login_artifact_registry_with_the_service_account(tmp_path):
    r, calls = _login(tmp_path, "gcp", "us-central1-docker.pkg.dev/proj/dinoscale/dinoscale:0.1")
    assert r.returncode == 0, r.stderr
    assert calls == [
        "gcloud auth print-access-token <",
        "docker login --username oauth2accesstoken --password-stdin us-central1-docker.pkg.dev <gcloud-token",
    ]


def test_registry_login_public_image_needs_nothing(tmp_path):
    r, calls = _login(tmp_path, "aws", "ghcr.io/your-org/dinoscale:latest")
    assert r.returncode == 0 and calls == [] and "anonymously" in r.stdout


@pytest.mark.parametrize(
    "cloud, reader",
    [
        ("aws", "aws secretsmanager get-secret-value --region us-east-2 --secret-id dinoscale-registry-password"),
        ("gcp", "gcloud secrets versions access latest --secret=dinoscale-registry-password"),
    ],
)
def test_registry_login_private_registry_with_a_stored_password(tmp_path, cloud, reader):
    r, calls = _login(tmp_path, cloud, "ghcr.io/your-org/dinoscale:latest", "DINOSCALE_REGISTRY_USER=ci-bot\n")
    assert r.returncode == 0, r.stderr
    assert calls[0].startswith(reader)
    assert calls[-1].startswith("docker login --username ci-bot --password-stdin ghcr.io <")


def test_registry_login_stops_when_the_credential_cannot_be_read(tmp_path):
    r, calls = _login(tmp_path, "aws", "123456789012.dkr.ecr.us-west-2.amazonaws.com/dinoscale:0.1", fail=("aws",))
    assert r.returncode != 0
    assert not any(c.startswith("docker") for c in calls), "no docker login with an empty password"


# ---------------------------------------------------------------- wait-for-gpu.sh


def _gpu_node(tmp_path: Path, nvidia: bool, smi_fails: int, docker_info: str = "Runtimes: nvidia runc") -> dict:
    sysfs = tmp_path / "sys"
    dev = sysfs / "bus" / "pci" / "devices" / "0000:00:1e.0"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text("0x10de\n" if nvidia else "0x1d0f\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    count = tmp_path / "smi-calls"
    (bin_dir / "nvidia-smi").write_text(
        f'#!/bin/sh\nn=$(($(cat "{count}" 2>/dev/null || echo 0) + 1)); echo $n > "{count}"\n'
        f'[ $n -gt {smi_fails} ] || exit 9\necho "GPU 0: NVIDIA L4 (UUID: GPU-x)"\n'
    )
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "{docker_info}"\n')
    (bin_dir / "sudo").write_text(f'#!/bin/sh\necho "sudo $*" >> "{tmp_path}/sudo.log"\n')
    (bin_dir / "nvidia-ctk").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "DINOSCALE_SYSFS": str(sysfs),
        "DINOSCALE_GPU_POLL_S": "0",
        "DINOSCALE_GPU_WAIT_S": "60",
    }


def _wait(env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(SCRIPTS / "wait-for-gpu.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_wait_for_gpu_returns_at_once_on_a_node_without_nvidia(tmp_path):
    r = _wait(_gpu_node(tmp_path, nvidia=False, smi_fails=99))
    assert r.returncode == 0 and "no NVIDIA device" in r.stdout
    assert not (tmp_path / "smi-calls").exists()


def test_wait_for_gpu_waits_until_the_driver_answers(tmp_path):
    r = _wait(_gpu_node(tmp_path, nvidia=True, smi_fails=3))
    assert r.returncode == 0, r.stderr
    assert "NVIDIA L4" in r.stdout and r.stdout.count("waiting for the NVIDIA driver") == 3


def test_wait_for_gpu_gives_up_with_a_message(tmp_path):
    env = _gpu_node(tmp_path, nvidia=True, smi_fails=10**6)
    env["DINOSCALE_GPU_WAIT_S"] = "0"
    r = _wait(env)
    assert r.returncode == 1 and "did not answer" in r.stderr


def test_wait_for_gpu_registers_the_nvidia_runtime_with_docker(tmp_path):
    r = _wait(_gpu_node(tmp_path, nvidia=True, smi_fails=0, docker_info="Runtimes: runc"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sudo.log").read_text().splitlines() == [
        "sudo nvidia-ctk runtime configure --runtime=docker",
        "sudo systemctl restart docker",
    ]
