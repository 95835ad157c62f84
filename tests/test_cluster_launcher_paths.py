"""The launcher YAMLs, set up node by node the way `ray up` and the autoscaler do it with `docker:` set,
and every path a command reads checked where the command runs (host or container).

Ray's own NodeUpdater runs here (its do_update: file mounts, initialization commands, `docker run`,
setup and start commands) through Ray's own DockerCommandRunner; only the SSH layer underneath is a
recorder, which answers the few questions Ray asks the node (is docker installed, the image's
environment, the container runtimes). From what Ray sent we build the two file systems of a node:
  host       the files Ray rsynced (to its mount prefix /tmp/ray_tmp_mount/<cluster>/...) and the
             folders earlier host commands created
  container  the bind mounts of Ray's `docker run` (pointing into the host), the image's files
             (cluster/Dockerfile COPY), and the folders earlier container commands created
and check, in order, that every absolute path a YAML command (or a `docker run` option) names
exists there, and that every $VARIABLE it uses is defined where it runs: on the host only what
the command sources itself, in the container what `docker run --env-file/--env` and the image set.
The head is set up as `ray up` does; a worker of every GPU type as the head's autoscaler does
(its file mounts come from the head's container)."""

from __future__ import annotations

import json
import re
import shlex
import types
from pathlib import Path, PurePosixPath
from typing import ClassVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = sorted((CLUSTER / "launcher").glob("*.yaml"))
IMAGE_WORKDIR = "/opt/dinoscale"


def _cluster_env() -> dict[str, str]:
    out = {}
    for line in (CLUSTER / "cluster.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _image() -> tuple[dict[str, str], dict[str, Path]]:
    """The runtime image's environment (ENV lines) and files (COPY into WORKDIR), from the Dockerfile."""
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(CLUSTER / "Dockerfile"))
    env = {"PATH": "/opt/conda/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/root"}
    files: dict[str, Path] = {}
    workdir = "/"
    for i in df.structure:
        if i["instruction"] == "ENV":
            for tok in shlex.split(i["value"]):
                k, _, v = tok.partition("=")
                env[k] = v
        elif i["instruction"] == "WORKDIR":
            workdir = i["value"]
        elif i["instruction"] == "COPY":
            *srcs, dst = i["value"].split()
            for src in srcs:
                target = PurePosixPath(workdir) / dst / (Path(src).name if dst.endswith("/") or dst == "./" else "")
                files[str(target).rstrip("/") if src not in ("./",) else workdir] = ROOT / src
    return env, files


class Recorder:
    """Stands in for Ray's SSHCommandRunner under its DockerCommandRunner: records, answers."""

    def __init__(self, cluster_name: str, ssh_user: str, image_env: dict[str, str], gpu: bool):
        self.cluster_name, self.ssh_user = cluster_name, ssh_user
        self.image_env, self.gpu = image_env, gpu
        self.calls: list[tuple] = []

    def run(
        self,
        cmd,
        timeout=120,
        exit_on_fail=False,
        port_forward=None,
        with_output=False,
        environment_variables=None,
        run_env="auto",
        ssh_options_override_ssh_key="",
        shutdown_after_run=False,
        silent=False,
    ):
        self.calls.append(("run", cmd))
        if not with_output:
            return b""
        if cmd.startswith("command -v docker"):
            return b"/usr/bin/docker"
        if ".State.Running" in cmd:
            return b""  # no container yet: Ray starts one
        if "json .Config.Env" in cmd:
            return json.dumps([f"{k}={v}" for k, v in self.image_env.items()]).encode()
        if "printenv HOME" in cmd:
            return self.image_env["HOME"].encode()
        if "{{.Runtimes}}" in cmd:
            return (
                b"map[io.containerd.runc.v2:{} nvidia:{nvidia-container-runtime} runc:{}]"
                if self.gpu
                else b"map[runc:{}]"
            )
        return b""

    def run_rsync_up(self, source, target, options=None):
        self.calls.append(("rsync_up", source, target))

    def run_rsync_down(self, source, target, options=None):
        self.calls.append(("rsync_down", source, target))


class Provider:
    provider_config: ClassVar[dict] = {}  # empty: NodeUpdater skips its CloudWatch set-up (AWS)

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def get_command_runner(
        self, log_prefix, node_id, auth_config, cluster_name, process_runner, use_internal_ip, docker_config=None
    ):
        from ray.autoscaler._private.command_runner import DockerCommandRunner

        runner = DockerCommandRunner(
            docker_config,
            log_prefix=log_prefix,
            node_id=node_id,
            provider=self,
            auth_config=auth_config,
            cluster_name=cluster_name,
            process_runner=process_runner,
            use_internal_ip=use_internal_ip,
        )
        runner.ssh_command_runner = self.recorder
        return runner

    def set_node_tags(self, node_id, tags):
        pass

    def node_tags(self, node_id):
        return {}

    def is_terminated(self, node_id):
        return False


def _prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load(path.read_text()))


def _update(config: dict, *, head: bool, node_type: str, file_mounts: dict, image_env: dict) -> Recorder:
    """One node's set-up through Ray's NodeUpdater.do_update, recorded."""
    from ray.autoscaler._private import command_runner
    from ray.autoscaler._private.autoscaler import StandardAutoscaler
    from ray.autoscaler._private.updater import NodeUpdater
    from ray.autoscaler._private.util import with_head_node_ip
    from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

    gpu = config["available_node_types"][node_type]["resources"].get("GPU", 0) > 0
    rec = Recorder(config["cluster_name"], config["auth"]["ssh_user"], image_env, gpu)
    if head:  # as commands.get_or_create_head_node (ray up) does
        init, setup, start = (
            config["initialization_commands"],
            config["head_setup_commands"],
            config["head_start_ray_commands"],
        )
        docker = config["docker"]
    else:  # as StandardAutoscaler.spawn_updater (on the head) does
        stub = types.SimpleNamespace(
            config=config,
            available_node_types=config["available_node_types"],
            provider=types.SimpleNamespace(node_tags=lambda _id: {TAG_RAY_USER_NODE_TYPE: node_type}),
        )
        stub._get_node_type_specific_fields = types.MethodType(StandardAutoscaler._get_node_type_specific_fields, stub)
        init = with_head_node_ip(stub._get_node_type_specific_fields("w", "initialization_commands"), "10.0.0.1")
        setup = with_head_node_ip(stub._get_node_type_specific_fields("w", "worker_setup_commands"), "10.0.0.1")
        start = with_head_node_ip(config["worker_start_ray_commands"], "10.0.0.1")
        docker = StandardAutoscaler._get_node_specific_docker_config(stub, "w")
    login = command_runner.is_using_login_shells()
    command_runner.set_using_login_shells(False)  # plain `docker exec ... bash -c CMD`: easier to read back
    try:
        updater = NodeUpdater(
            node_id="n",
            provider_config=config["provider"],
            provider=Provider(rec),
            auth_config=config["auth"],
            cluster_name=config["cluster_name"],
            file_mounts=file_mounts,
            initialization_commands=init,
            setup_commands=setup,
            ray_start_commands=start,
            runtime_hash="h",
            file_mounts_contents_hash="f",
            is_head_node=head,
            docker_config=docker,
            rsync_options={"rsync_exclude": config.get("rsync_exclude")},
        )
        updater.do_update()
    finally:
        command_runner.set_using_login_shells(login)
    rec.yaml_commands = {"host": list(init), "container": list(setup) + list(start)}
    return rec


VAR = re.compile(r"(?<!\$)\$(?:\{(\w+)[^}]*\}|(\w+))")
PATH = re.compile(r"(?:^|(?<=[\s=:'\"(>]))(~?/[\w.\-/]*[\w.\-])")


def _paths(cmd: str) -> list[str]:
    cmd = re.sub(r"\$\([^)]*\)", " ", cmd)  # command substitutions
    cmd = re.sub(r"python -c \"[^\"]*\"", " ", cmd)  # python snippets
    return [p for p in PATH.findall(cmd) if not p.startswith("//")]


def _vars(cmd: str) -> set[str]:
    cmd = re.sub(r"\$\([^)]*\)", " ", cmd)
    return {a or b for a, b in VAR.findall(cmd)} - {"?", "0"}


class Node:
    """The node's two file systems, replayed from what Ray sent, with the checks."""

    def __init__(self, rec: Recorder, image_files: dict[str, Path], image_env: dict[str, str], label: str):
        self.rec, self.label = rec, label
        self.host: dict[str, Path | None] = {}  # path -> repo source (None: a folder something created)
        self.mounts: dict[str, str] = {}  # container path -> host path
        self.image_files, self.image_env = image_files, image_env
        self.created: dict[str, set[str]] = {"host": set(), "container": set()}
        self.container_env: dict[str, str] = {}
        self.problems: list[str] = []
        self.docker_run: str | None = None
        self.order: list[str] = []

    # --- existence
    def _in_tree(self, path: str, table: dict[str, Path | None]) -> bool:
        for root, src in table.items():
            root = root.rstrip("/")
            if path == root:
                return True
            if path.startswith(root + "/") and src is not None and src.is_dir():
                return (src / path[len(root) + 1 :]).exists()
        return False

    def _created(self, path: str, where: str) -> bool:
        """A folder an earlier command created, or one of its parents (not what it may hold later)."""
        return any(path == c or c.startswith(path.rstrip("/") + "/") for c in self.created[where])

    def host_has(self, path: str) -> bool:
        return self._in_tree(path, self.host) or self._created(path, "host") or path in ("/dev/null",)

    def container_has(self, path: str) -> bool:
        home = self.image_env.get("HOME", "/root")
        path = path.replace("~", home, 1) if path.startswith("~") else path
        for dst, src in self.mounts.items():
            if path == dst or path.startswith(dst.rstrip("/") + "/"):
                return self.host_has(src + path[len(dst) :])
        return (
            self._in_tree(path, dict(self.image_files))
            or path in (f"{home}/ray_bootstrap_config.yaml", f"{home}/ray_bootstrap_key.pem")
            or self._created(path, "container")
        )

    # --- replay
    def replay(self) -> None:
        for call in self.rec.calls:
            if call[0] == "rsync_up":
                _, source, target = call
                self.host[target.rstrip("/")] = Path(source).resolve()
                continue
            cmd = call[1]
            self.order.append(cmd)
            if cmd.startswith("docker exec"):
                argv = shlex.split(cmd)
                if "-c" in argv:  # Ray's `docker exec <container> /bin/bash -c CMD` (else one of its own probes)
                    self._command(argv[argv.index("-c") + 1], "container")
            elif cmd.startswith("docker run"):
                self._docker_run(cmd)
            else:
                self._command(cmd, "host")

    def _docker_run(self, cmd: str) -> None:
        self.docker_run = cmd
        argv = shlex.split(cmd)
        env = dict(self.image_env)
        for i, a in enumerate(argv):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if a in ("-v", "--volume"):
                src, dst = nxt.split(":")[:2]
                src = re.sub("/+", "/", src)
                if not self.host_has(src):
                    self.problems.append(
                        f"{self.label}: docker run mounts {src} from the host, which does not exist there"
                    )
                self.mounts[dst] = src
            elif a == "--env-file":
                if not self.host_has(nxt) or self._host_source(nxt) is None:
                    self.problems.append(f"{self.label}: docker run --env-file {nxt}: no such file on the host")
                else:
                    env.update(_read_env(self._host_source(nxt)))
            elif a in ("-e", "--env"):
                k, _, v = nxt.partition("=")
                env[k] = v
        self.container_env = env

    def _host_source(self, path: str) -> Path | None:
        for root, src in self.host.items():
            root = root.rstrip("/")
            if src is not None and path == root:
                return src
            if src is not None and src.is_dir() and path.startswith(root + "/"):
                return src / path[len(root) + 1 :]
        return None

    def _command(self, cmd: str, where: str) -> None:
        ours = next((y for y in self.rec.yaml_commands[where] if y.split(";")[-1].strip()[:40] in cmd), None)
        if ours is not None:
            defined = set()
            if where == "host":
                for sourced in re.findall(r"(?:^|&&|;)\s*\.\s+(\S+)", cmd):  # `. file && ...`
                    if self.host_has(sourced) and self._host_source(sourced):
                        defined |= set(_read_env(self._host_source(sourced)))
                defined |= {"HOME", "USER", "PATH"}
            else:
                defined = set(self.container_env) | {"HOME", "PATH"}
            defined |= set(re.findall(r"export (\w+)=", cmd))
            for v in sorted(_vars(cmd) - defined):
                self.problems.append(f"{self.label} ({where}): `{ours.strip()[:90]}` uses ${v}, which is not set there")
            for p in _paths(cmd):
                if p.rstrip("/") in self.created[where]:
                    continue
                ok = self.host_has(p) if where == "host" else self.container_has(p)
                if not ok and not re.search(rf"mkdir -p[^;&|]*{re.escape(p)}", cmd):
                    self.problems.append(
                        f"{self.label} ({where}): `{ours.strip()[:90]}` reads {p}, which does not exist there"
                    )
        for m in re.finditer(r"mkdir -p ([^;&|]+)", cmd):
            for target in shlex.split(m.group(1)):
                target = _expand(target, self.container_env if where == "container" else {})
                if target.startswith("/"):
                    self.created[where].add(target.rstrip("/"))


def _expand(s: str, env: dict[str, str]) -> str:
    return VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), s)


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _head_and_workers(path: Path, monkeypatch) -> list[Node]:
    monkeypatch.chdir(ROOT)  # `make cluster-up` runs `ray up` from the repository root: file_mounts are relative to it
    config = _prepared(path)
    image_env, image_files = _image()
    nodes = []
    mounts = dict(config["file_mounts"])
    mounts["~/ray_bootstrap_config.yaml"] = str(path)  # what `ray up` adds for the head's autoscaler
    head = Node(
        _update(config, head=True, node_type=config["head_node_type"], file_mounts=mounts, image_env=image_env),
        image_files,
        image_env,
        "head",
    )
    head.replay()
    nodes.append(head)
    for name, t in config["available_node_types"].items():
        if name == config["head_node_type"] or t.get("resources", {}).get("GPU", 0) < 1:
            continue
        # The head's autoscaler syncs each mount from the head CONTAINER's copy (remote path = local path)
        worker_mounts = {}
        for remote in config["file_mounts"]:
            if not head.container_has(remote):
                head.problems.append(
                    f"head: the autoscaler syncs {remote} to workers, but the head container has no {remote}"
                )
            worker_mounts[remote] = str(ROOT / config["file_mounts"][remote])  # the same content
        w = Node(
            _update(config, head=False, node_type=name, file_mounts=worker_mounts, image_env=image_env),
            image_files,
            image_env,
            f"worker {name}",
        )
        w.replay()
        nodes.append(w)
    return nodes


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_every_path_a_launcher_command_reads_exists_where_it_runs(path, monkeypatch):
    nodes = _head_and_workers(path, monkeypatch)
    assert len(nodes) >= 2, "the head and at least one GPU worker type"
    problems = [p for n in nodes for p in n.problems]
    assert not problems, "\n".join(problems)
    for n in nodes:
        assert n.docker_run and n.rec.yaml_commands["container"], (
            f"{n.label}: Ray started the container and ran the set-up"
        )


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_gpu_workers_get_the_gpus_and_wait_for_driver_and_login_before_docker(path, monkeypatch):
    for n in _head_and_workers(path, monkeypatch):
        run_argv = shlex.split(n.docker_run)
        gpus = " ".join(" ".join(run_argv[i : i + 2]) for i in range(len(run_argv)) if run_argv[i] == "--gpus")
        if n.label == "head":
            assert not gpus, "the CPU head has no GPU: `--gpus all` would fail there"
        else:
            assert gpus == "--gpus all", f"{n.label}: docker run without --gpus all: {n.docker_run}"
        idx = {
            k: next((i for i, c in enumerate(n.order) if k in c), None)
            for k in ("registry-login.sh", "wait-for-gpu.sh", "docker pull", "docker run")
        }
        assert None not in idx.values(), idx
        assert idx["registry-login.sh"] < idx["docker pull"], f"{n.label}: log in to the registry before pulling"
        assert idx["wait-for-gpu.sh"] < idx["docker run"], (
            f"{n.label}: wait for the driver before Ray picks the runtime"
        )


def test_the_old_layout_is_caught(tmp_path, monkeypatch):
    """The layout this test was written for (issue 19): cluster.env mounted as a file at
    /home/ubuntu/dinoscale.env and read there on the host. With `docker:` set Ray puts it under
    /tmp/ray_tmp_mount/..., so the host commands and `--env-file` find nothing."""
    config = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    config["file_mounts"] = {"/home/ubuntu/dinoscale.env": "cluster/cluster.env"}
    prefix = "/tmp/ray_tmp_mount/dinoscale/opt/dinoscale-cluster/cluster.env"
    config["docker"]["run_options"] = [
        o.replace(prefix, "/home/ubuntu/dinoscale.env") for o in config["docker"]["run_options"]
    ]
    config["initialization_commands"] = [
        c.replace(prefix, "/home/ubuntu/dinoscale.env")
        for c in config["initialization_commands"]
        if "scripts/" not in c
    ]
    config["head_start_ray_commands"] = [
        c.replace("/opt/dinoscale-cluster/", "/opt/dinoscale/cluster/") for c in config["head_start_ray_commands"]
    ]
    config["worker_start_ray_commands"] = [
        c.replace("/opt/dinoscale-cluster/", "/opt/dinoscale/cluster/") for c in config["worker_start_ray_commands"]
    ]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(config))
    problems = [p for n in _head_and_workers(old, monkeypatch) for p in n.problems]
    assert any("--env-file /home/ubuntu/dinoscale.env" in p for p in problems), problems
    assert any("reads /home/ubuntu/dinoscale.env" in p for p in problems), problems
    assert any("uses $DINOSCALE_NFS" in p for p in problems), problems


@pytest.mark.parametrize("where", ["host", "container"])
def test_a_missing_file_under_the_synced_folder_is_caught(tmp_path, monkeypatch, where):
    config = yaml.safe_load((CLUSTER / "launcher" / "gcp.yaml").read_text())
    if where == "host":
        config["initialization_commands"].append(
            "sh /tmp/ray_tmp_mount/dinoscale/opt/dinoscale-cluster/scripts/nope.sh"
        )
    else:
        config["setup_commands"].append("sh /opt/dinoscale-cluster/scripts/nope.sh")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    problems = [p for n in _head_and_workers(bad, monkeypatch) for p in n.problems]
    assert problems and all("scripts/nope.sh, which does not exist there" in p for p in problems), problems
