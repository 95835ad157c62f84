"""cluster/kuberay/ against what KubeRay accepts, as closely as it can be checked without an API server:

- the CRD's OpenAPI schema of KubeRay v1.7.0 (vendored: tests/fixtures/kuberay-v1.7.0-rayjob-crd-schema.json.gz,
  source and commit inside), with unknown fields rejected as `kubectl apply`'s strict field
  validation does and int-or-string fields typed;
- the operator's own validation rules (ray-operator/controllers/ray/utils/validation.go, v1.7.0) that
  the manifests touch: names, replicas, authOptions (token mode needs rayVersion >= 2.52), RayJob
  fields;
- the token path: authOptions with a Secret holding `auth_token`, and no RAY_AUTH_TOKEN by envFrom
  (which the autoscaler sidecar and the wait-for-GCS init container never get);
- `make cluster-job`, run with a stand-in kubectl: each submission a NEW RayJob (KubeRay never reruns
  a finished one) that validates too, --resume when RESUME=1.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
FIXTURE = Path(__file__).parent / "fixtures" / "kuberay-v1.7.0-rayjob-crd-schema.json.gz"
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47  # utils/constant.go
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _strict(schema):
    """As the API server with strict field validation: unknown fields are errors; int-or-string typed."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string"):
            schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    doc = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    assert "v1.7.0" in doc["source"] and "ray.io_rayjobs.yaml" in doc["source"]
    rayjob = _strict(doc["openAPIV3Schema"])
    top = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
    raycluster = {
        "type": "object",
        "properties": {**top, "spec": rayjob["properties"]["spec"]["properties"]["rayClusterSpec"]},
        "additionalProperties": False,
    }
    rayjob = {**rayjob, "properties": {**rayjob["properties"], **top}}
    rayjob["properties"].pop("status", None)
    raycluster["properties"].pop("status", None)
    return {"RayCluster": raycluster, "RayJob": rayjob}


def _validate(schemas, doc: dict) -> None:
    v = jsonschema.Draft7Validator(schemas[doc["kind"]])
    errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _operator_rules(spec: dict, where: str) -> None:
    """ValidateRayClusterSpec (v1.7.0), the parts these manifests touch."""
    assert spec["headGroupSpec"]["template"]["spec"]["containers"], (
        f"{where}: headGroupSpec should have at least one container"
    )
    for g in spec.get("workerGroupSpecs", []):
        assert g["template"]["spec"]["containers"], f"{where}: workerGroupSpec should have at least one container"
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        assert 0 <= lo <= hi, f"{where}: worker group {g['groupName']}: 0 <= minReplicas <= maxReplicas"
        assert lo <= g.get("replicas", lo) <= hi
    auth = spec.get("authOptions") or {}
    if auth.get("mode", "token" if auth else None) == "token":
        assert spec.get("rayVersion"), f"{where}: authOptions.mode is 'token' but rayVersion was not specified"
        assert _version(spec["rayVersion"]) >= (2, 52, 0), f"{where}: token auth needs Ray >= 2.52.0"
    if auth.get("enableK8sTokenAuth"):
        assert not auth.get("secretName"), f"{where}: enableK8sTokenAuth and secretName are exclusive"


def _containers(spec: dict):
    for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        for c in g["template"]["spec"].get("initContainers", []) + g["template"]["spec"]["containers"]:
            yield g, c


def _token_by_auth_options(spec: dict, where: str) -> str:
    auth = spec.get("authOptions")
    assert auth and auth.get("mode") == "token", f"{where}: the Ray token goes through authOptions (mode: token)"
    assert auth.get("secretName"), f"{where}: authOptions.secretName (a Secret with the key auth_token)"
    for _, c in _containers(spec):
        names = {e.get("name") for e in c.get("env", [])}
        assert "RAY_AUTH_TOKEN" not in names, f"{where}: RAY_AUTH_TOKEN set by hand in {c['name']}: KubeRay sets it"
    return auth["secretName"]


def _cluster_checks(spec: dict, where: str) -> None:
    _operator_rules(spec, where)
    secret = _token_by_auth_options(spec, where)
    readme = (ROOT / "cluster" / "README.md").read_text()
    assert f"create secret generic {secret} --from-literal=auth_token=" in readme, (
        f"{where}: cluster/README.md tells how to create the Secret {secret} with the key auth_token"
    )
    claims = {
        d["metadata"]["name"] for d in _load_all(KUBERAY / "storage.yaml") if d["kind"] == "PersistentVolumeClaim"
    }
    for g, c in _containers(spec):
        vols = {v["name"]: v for v in g["template"]["spec"].get("volumes", [])}
        for m in c.get("volumeMounts", []):
            assert m["name"] in vols, f"{where}: volumeMount {m['name']} has no volume"
            pvc = vols[m["name"]].get("persistentVolumeClaim")
            assert pvc is None or pvc["claimName"] in claims, f"{where}: claim {pvc} is not in storage.yaml"
        refs = [e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])]
        assert "dinoscale-config" in refs, f"{where}: settings come from the dinoscale-config ConfigMap (cluster.env)"
        assert c.get("securityContext", {}).get("runAsNonRoot") is True, f"{where}: {c['name']} runs as non-root"
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1, f"{where}: GPU workers have one GPU each"
    if spec.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"]), "autoscaling has room"


def test_fixture_is_the_schema_with_authoptions():
    doc = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    auth = doc["openAPIV3Schema"]["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["authOptions"]
    assert auth["properties"]["mode"]["enum"] == ["disabled", "token"]
    assert auth["properties"]["secretName"]["type"] == "string"


def test_raycluster_matches_the_crd_and_the_operator(schemas):
    (rc,) = _load_all(KUBERAY / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    name = rc["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= MAX_RAYCLUSTER_NAME
    _validate(schemas, rc)
    _cluster_checks(rc["spec"], "RayCluster.spec")


def _rayjob_checks(schemas, job: dict) -> None:
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    name = job["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= MAX_RAYJOB_NAME, f"RayJob name {name!r}: DNS-1035 label, <= 47"
    _validate(schemas, job)
    s = job["spec"]
    assert s["ttlSecondsAfterFinished"] >= 0 and s.get("activeDeadlineSeconds", 1) > 0 and s.get("backoffLimit", 0) >= 0
    yaml.safe_load(s.get("runtimeEnvYAML", "{}"))
    assert s["shutdownAfterJobFinishes"] is True
    assert not (s["rayClusterSpec"].get("authOptions") or {}).get("enableK8sTokenAuth"), "not supported for RayJob"
    _cluster_checks(s["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    assert (
        "dinoscale sweep" in s["entrypoint"]
        and "--address auto" in s["entrypoint"]
        and "--tracking-uri" in s["entrypoint"]
    )
    spec_in_image = s["entrypoint"].split("dinoscale sweep ")[1].split()[0]
    assert (ROOT / spec_in_image).is_file(), "the entrypoint's spec is in the image"
    for c in s["submitterPodTemplate"]["spec"]["containers"]:
        assert not any("secretRef" in e for e in c.get("envFrom", [])), "the submitter gets the token from authOptions"


def test_rayjob_matches_the_crd_and_the_operator(schemas):
    (job,) = _load_all(KUBERAY / "rayjob.yaml")
    _rayjob_checks(schemas, job)


def test_the_schema_check_is_strict(schemas):
    """It catches what the API server would reject: a misspelt field, a string where an int goes."""
    (rc,) = _load_all(KUBERAY / "raycluster.yaml")
    bad = copy.deepcopy(rc)
    bad["spec"]["authOptions"]["secretname"] = "x"
    with pytest.raises(AssertionError, match="secretname"):
        _validate(schemas, bad)
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    with pytest.raises(AssertionError, match="maxReplicas"):
        _validate(schemas, bad)
    bad = copy.deepcopy(rc)
    bad["spec"]["authOptions"]["mode"] = "tokens"
    with pytest.raises(AssertionError, match="mode"):
        _validate(schemas, bad)
    bad = copy.deepcopy(rc)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(AssertionError, match="num-cpus"):
        _validate(schemas, bad)


def test_token_only_by_envfrom_is_refused():
    """The layout of issue 19: RAY_AUTH_TOKEN through envFrom only, no authOptions."""
    (rc,) = _load_all(KUBERAY / "raycluster.yaml")
    spec = copy.deepcopy(rc["spec"])
    spec.pop("authOptions")
    with pytest.raises(AssertionError, match="authOptions"):
        _token_by_auth_options(spec, "old")


def test_storage_claim_is_shared_by_all_nodes():
    (pvc,) = _load_all(KUBERAY / "storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.fixture
def fake_kubectl(tmp_path):
    """A kubectl that records its arguments and the manifest it is given, one file pair per call named by its
    start time (the two ends of a `kubectl ... | kubectl apply -f -` pipe start together: a count would collide)."""
    script = tmp_path / "kubectl"
    script.write_text(
        f"#!/bin/sh\nn=$(date +%s%N)-$$\n"
        f'printf "%s " "$@" > "{tmp_path}/call-$n.args"\ncat > "{tmp_path}/call-$n.yaml"\n'
    )
    script.chmod(0o755)
    return script


def _cluster_job(fake_kubectl, *args) -> tuple[str, dict]:
    r = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "cluster-job",
            f"KUBECTL={fake_kubectl}",
            "IMAGE=reg.example/dinoscale:7",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    d = fake_kubectl.parent
    last = max(d.glob("call-*.args"), key=lambda f: int(f.stem.split("-")[1]))  # the latest call
    return last.read_text().strip(), yaml.safe_load(last.with_suffix(".yaml").read_text())


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_cluster_job_submits_a_new_rayjob_every_time(schemas, fake_kubectl):
    args1, job1 = _cluster_job(fake_kubectl, "MODALITY=ct", "PROFILE=paper", "RESUME=1")
    _, job2 = _cluster_job(fake_kubectl, "MODALITY=ct", "PROFILE=paper", "RESUME=1")
    assert args1.split()[:3] == ["-n", "dinoscale", "create"], "create, not apply: a taken name fails loudly"
    n1, n2 = job1["metadata"]["name"], job2["metadata"]["name"]
    assert n1 != n2 and n1.startswith("dinoscale-ct-"), (n1, n2)
    for job in (job1, job2):
        _rayjob_checks(schemas, job)
        assert "dinoscale sweep sweeps/ct.yaml" in job["spec"]["entrypoint"] and "--resume" in job["spec"]["entrypoint"]
    _, fresh = _cluster_job(fake_kubectl, "MODALITY=xray", "PROFILE=paper")
    assert "--resume" not in fresh["spec"]["entrypoint"]
    # IMAGE= reaches every container (head, workers, submitter); the placeholder is gone
    assert _images(fresh) == {"reg.example/dinoscale:7"} and "your-org" not in yaml.safe_dump(fresh)


def _images(doc) -> set[str]:
    if isinstance(doc, dict):
        return {doc["image"]} if isinstance(doc.get("image"), str) else set().union(*map(_images, doc.values()))
    if isinstance(doc, list):
        return set().union(*map(_images, doc)) if doc else set()
    return set()


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_k8s_targets_refuse_without_an_image(fake_kubectl):
    for target in (["cluster-job"], ["cluster-up", "CLOUD=k8s", "CLUSTER_DEPS="]):
        r = subprocess.run(
            ["make", "-s", "-C", str(ROOT), *target, f"KUBECTL={fake_kubectl}", "IMAGE="],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 2 and "set IMAGE=" in r.stdout, (target, r.stdout, r.stderr)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_cluster_up_k8s_renders_image_in_cluster_tracking_uri_and_a_writable_volume(schemas, fake_kubectl):
    r = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "cluster-up", "CLOUD=k8s", "CLUSTER_DEPS=", f"KUBECTL={fake_kubectl}",
         "IMAGE=reg.example/dinoscale:7"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = fake_kubectl.parent
    calls = sorted(d.glob("call-*.args"), key=lambda f: int(f.stem.split("-")[1].split(".")[0]))
    args = [c.read_text() for c in calls]
    configmap = next(i for i, a in enumerate(args) if "configmap" in a)
    env_file = ROOT / ".dinoscale" / "cluster-k8s.env"
    assert f"--from-env-file={env_file.relative_to(ROOT)}" in args[configmap]
    assert "DINOSCALE_TRACKING_URI=http://mlflow.dinoscale.svc.cluster.local:5000" in env_file.read_text().splitlines()
    cluster = yaml.safe_load(calls[-1].with_suffix(".yaml").read_text())
    assert cluster["kind"] == "RayCluster" and _images(cluster) == {"reg.example/dinoscale:7"}
    pods = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for group in pods:  # a root-owned RWX share (Filestore) becomes writable by the image's uid 1000
        assert group["template"]["spec"]["securityContext"]["fsGroup"] == 1000
