"""Where a command's tracking store, storage and Ray cluster come from: one precedence, for every command.

    command-line flag  >  DINOSCALE_* variable  >  the ecosystem's variable  >  the spec

=============  ========================  =======================  ======================  ===============
setting        flag                      dinoscale variable       ecosystem variable      spec key
=============  ========================  =======================  ======================  ===============
tracking URI   ``--tracking-uri``        DINOSCALE_TRACKING_URI   MLFLOW_TRACKING_URI     ``tracking.uri``
storage        ``--storage``             DINOSCALE_STORAGE        -                       ``storage.path``
Ray cluster    ``--address``             DINOSCALE_RAY_ADDRESS    RAY_ADDRESS             ``ray.address``
reports        ``analyze --out``         DINOSCALE_REPORTS        -                       -
=============  ========================  =======================  ======================  ===============

Reports go to ``<project>/reports/<spec name>/`` on a laptop. A sweep that joins a cluster (a Ray address from
any of the above) writes them under its storage instead, ``<storage>/reports/<spec name>/``: the storage is
the one path every node and the user see, while the driver's folder on a cluster is a container's, a pod's
or a batch node's (the Slurm job's, the Ray job's working copy) and may be gone or unwritable when the sweep
ends. The last line of every sweep names the folder; the report is also attached to the parent run.

The command line hands its flags to ``apply_flags``, which sets the DINOSCALE_* variables of this process:
every module below (runner, pre-flight, rehearsal) then reads the same answer here, without a flag
threaded through it, and a flag beats the variable it overwrites. No Ray address anywhere means an
embedded Ray started for the sweep (``ray.init(address="local")``, which ignores RAY_ADDRESS: the address
is decided here, once).

A leaf: standard library only, so the command line resolves these before any heavy import.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from dinoscale.errors import UserError

TRACKING_VARS = ("DINOSCALE_TRACKING_URI", "MLFLOW_TRACKING_URI")
STORAGE_VARS = ("DINOSCALE_STORAGE",)
REPORTS_VARS = ("DINOSCALE_REPORTS",)
RAY_VARS = ("DINOSCALE_RAY_ADDRESS", "RAY_ADDRESS")
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"  # the spec's default (TrackingSpec.uri)
DEFAULT_STORAGE = ".dinoscale"  # the spec's default (StorageSpec.path)
CONNECT_TIMEOUT_S = 5.0


class RayAddressError(UserError):
    """The Ray cluster named by --address / DINOSCALE_RAY_ADDRESS / RAY_ADDRESS / ray.address cannot be used."""

    kind = "ray"


def _pick(flag: str | None, names: tuple[str, ...], spec_value, spec_key: str, flag_name: str):
    """(value, where it came from) by the one precedence."""
    if flag:
        return flag, flag_name
    for name in names:
        if os.environ.get(name):
            return os.environ[name], name
    return spec_value, f"{spec_key} in the spec"


def tracking_uri(spec_uri: str | None, flag: str | None = None) -> str:
    """The MLflow tracking URI (relative sqlite paths are made absolute by ``tracking.resolve_tracking_uri``)."""
    return _pick(flag, TRACKING_VARS, spec_uri or DEFAULT_TRACKING_URI, "tracking.uri", "--tracking-uri")[0]


def tracking_uri_source(flag: str | None = None) -> str:
    """Where ``tracking_uri`` found its answer, for messages ("from MLFLOW_TRACKING_URI")."""
    where = _pick(flag, TRACKING_VARS, None, "tracking.uri", "--tracking-uri")[1]
    return "from --tracking-uri / DINOSCALE_TRACKING_URI" if where == TRACKING_VARS[0] else f"from {where}"


def storage(spec_path: str | None, flag: str | None = None) -> str:
    """The storage root as written (a path, ``~`` and ``$VARS`` not yet expanded)."""
    return _pick(flag, STORAGE_VARS, spec_path or DEFAULT_STORAGE, "storage.path", "--storage")[0]


def storage_root(spec_path: str | None, flag: str | None = None, project_dir: Path | None = None) -> Path:
    """The storage root as an absolute path (relative paths: the project folder)."""
    p = Path(os.path.expandvars(storage(spec_path, flag))).expanduser()
    return (p if p.is_absolute() else (project_dir or Path.cwd()) / p).resolve()


def reports_root(storage_root: Path | None, on_cluster: bool, project_dir: Path | None = None) -> Path:
    """The folder that holds ``<spec name>/`` reports (see the module's docstring)."""
    if os.environ.get(REPORTS_VARS[0]):
        p = Path(os.path.expandvars(os.environ[REPORTS_VARS[0]])).expanduser()
        return (p if p.is_absolute() else (project_dir or Path.cwd()) / p).resolve()
    return (
        storage_root / "reports" if on_cluster and storage_root else (project_dir or Path.cwd()).resolve() / "reports"
    )


def ray_address(spec_address: str | None, flag: str | None = None) -> str | None:
    """The Ray cluster to join, or None: an embedded Ray of this process."""
    return _pick(flag, RAY_VARS, spec_address, "ray.address", "--address")[0] or None


def ray_address_source(spec_address: str | None, flag: str | None = None) -> str:
    return _pick(flag, RAY_VARS, spec_address, "ray.address", "--address")[1]


def apply_flags(tracking_uri: str | None = None, storage: str | None = None, address: str | None = None) -> None:
    """A command's flags, as the DINOSCALE_* variables of this process (see the module's docstring)."""
    for name, value in (
        (TRACKING_VARS[0], tracking_uri),
        (STORAGE_VARS[0], storage),
        (RAY_VARS[0], address),
    ):
        if value:
            os.environ[name] = value


def check_ray_address(address: str, source: str) -> None:
    """A cluster address that cannot work, refused in seconds (``ray.init`` retries an unreachable one for
    minutes): a dashboard / job-submission URL, or a host:port nothing answers on. ``auto`` and ``local``
    are Ray's own and pass."""
    where = f"Ray address {address!r} ({source})"
    if address in ("auto", "local"):
        return
    u = urlparse(address if "://" in address else f"gcs://{address}")
    if u.scheme in ("http", "https"):
        raise RayAddressError(
            f"{where} is a dashboard / job-submission URL: a sweep joins a cluster as a driver, at its GCS "
            "address (head-ip:6379), 'auto' on one of its nodes, or ray://head-ip:10001; to run the sweep as a "
            "Ray job on that cluster use `make cluster-submit` (or unset the variable for an embedded local Ray)"
        )
    try:
        host, port = u.hostname, u.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise RayAddressError(f"{where}: expected host:port, ray://host:port, 'auto' or 'local'")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise RayAddressError(
            f"{where}: nothing answers at {host}:{port} ({e.strerror or type(e).__name__}); start the cluster "
            "(ray start --head) or give its address; without one the sweep starts an embedded local Ray"
        ) from None
