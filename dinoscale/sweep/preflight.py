"""Pre-flight: what a sweep needs from its surroundings, checked before Ray or any extraction starts.

In order, cheapest first, each failure one ``UserError`` naming the thing, what was expected and what to do:

1. **storage**: the storage path is a folder this process can write (not under a file, not read-only);
   with ``--resume``, a sweep of this spec to resume. Once the plan is built (step 4), its file system has
   room for the feature sets still to extract (the plan's predicted bytes, with a margin).
2. **tracking, reachable**: the MLflow server accepts a TCP connection (a SQLite / folder store: its path
   is not under a file). A server that is down or unroutable is reported in at most 5 s instead of
   MLflow's minutes of retries. Nothing is written yet.
3. **weights**: each backbone takes 2D images (a 3D encoder such as CT-FM is refused); its weights resolve (file, or the Hugging Face cache / a reachable hub) and
   fit its architecture: names and shapes are compared on the meta device with the file memory-mapped,
   so a multi-GB checkpoint is not read into the driver's memory.
4. **data**: the data root holds the adapter's layout (the plan prepares the dataset, which checks it),
   every probe and strategy fits the dataset's task (``check_runnable``), a sample of each split's
   files decodes (``dinoscale.data.checks.decode_sample``), every class of a macro metric can be scored
   on the test split (``macro_class_set_words``), and a CT window fits the data it is applied to
   (``check_window``: the modality the dataset states, the share of decoded voxels it saturates).
5. **tracking, writable**: the store answers as MLflow (one request, 5 s, no retries) and takes a write:
   the sweep's experiment is created if needed and tagged ``dinoscale.preflight``. Last, so that a sweep
   refused for its spec or data leaves nothing in the record.

``check_storage_on_nodes`` runs once Ray is up, on clusters of several nodes: each node must see the
storage path (a sentinel file written by the driver is read back on every node).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from dinoscale import record, settings
from dinoscale.data.errors import DataError
from dinoscale.errors import StorageError, TrackingError, UserError, environment_error, free_space, size_text
from dinoscale.features import FeatureStore  # lazy: the CLI imports this module before anything heavy
from dinoscale.strategies.registry import training_kinds
from dinoscale.sweep.state import ResumeError, SweepState

CONNECT_TIMEOUT_S = 5.0  # a tracking host that does not accept a TCP connection in this time is down
REQUEST_TIMEOUT_S = 5  # one MLflow request during pre-flight (no retries): a server that hangs fails in 5 s


@dataclass
class PreflightReport:
    checks: dict[str, str] = field(default_factory=dict)  # name -> what was found
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def line(self) -> str:
        total = sum(self.seconds.values())
        return f"Pre-flight ok in {total:.1f}s: " + "; ".join(
            f"{k} {v} ({self.seconds.get(k, 0):.1f}s)" for k, v in self.checks.items()
        )


# ---------------------------------------------------------------- storage


STORAGE_HINT = "set storage.path in the spec (or DINOSCALE_STORAGE) to a writable folder"


def check_storage(root: Path, what: str = "storage path", hint: str = STORAGE_HINT, write: bool = True) -> str:
    """``root`` is (or can be made) a folder this process can write; raises ``StorageError``.
    ``write=False`` (dry runs): only that no part of the path is a file; nothing is created."""
    root = Path(root)
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise StorageError(
                    f"{what} '{root}': '{parent}' is a file, not a folder; {hint}"
                    if parent != root
                    else f"{what} '{root}' is a file, not a folder; {hint}"
                )
            break
    if not write:
        return str(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".dinoscale-preflight-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise StorageError(f"{what} '{root}' is not writable ({e.strerror or type(e).__name__}); {hint}") from e
    return str(root)


FREE_SPACE_MARGIN = 1.1  # the plan predicts the rows' bytes; commits, headers and Tune's state need a little more


def bytes_to_extract(plan, store=None) -> tuple[int, int]:
    """(predicted bytes, feature sets) the extraction still has to write: the plan's missing feature sets, less
    the shards the store holds already (an interrupted or failed extraction)."""

    store = store or FeatureStore(plan.storage / "features")
    need = sets = 0
    for fs in plan.missing:
        if fs.key is None or store.has(fs.key):
            continue
        count = len(fs.shards) or 1
        done = len(store.shards_committed(fs.key, count))
        need += fs.nbytes * (count - done) // count
        sets += 1
    return need, sets


def check_free_space(plan) -> str:
    """The storage path's file system has room for the features still to extract (``FREE_SPACE_MARGIN`` x the
    plan's prediction); raises ``StorageError`` with needed vs free. A store that cannot tell its free space
    passes (the writers name a full disk when they meet it)."""
    need, sets = bytes_to_extract(plan)
    usage = free_space(plan.storage)
    if usage is None or not need:
        return ""
    free, total = usage
    if need * FREE_SPACE_MARGIN > free:
        raise StorageError(
            f"storage path '{plan.storage}' has {size_text(free)} free (of {size_text(total)}) on its file system, "
            f"but the extraction needs ~{size_text(need * FREE_SPACE_MARGIN)} ({size_text(need)} predicted for "
            f"{sets} feature set(s), + {FREE_SPACE_MARGIN - 1:.0%}); free space there, or set storage.path (or "
            "DINOSCALE_STORAGE) to a larger file system. Nothing was started"
        )
    return f"{size_text(free)} free for ~{size_text(need)} of features"


def with_room_needed(error, plan, store=None):
    """A full storage met by an extraction (``error.reason == 'full'``), told again from the driver once the
    other jobs stopped: the file it was writing, the free space now and the bytes the feature sets not yet
    stored need (the plan's prediction). Any other error is returned unchanged."""
    if getattr(error, "reason", "") != "full" or not getattr(error, "code", None):
        return error
    try:
        need, sets = bytes_to_extract(plan, store)
    except OSError:
        return error
    told = environment_error(
        OSError(error.code, os.strerror(error.code)),
        error.path,
        plan.storage,
        need,
        f"the {sets} feature set(s) not yet stored" if sets else "",
    )
    return told or error


def check_storage_on_nodes(root: Path, timeout_s: float = 120.0, min_nodes: int = 2) -> str | None:
    """On a Ray cluster of ``min_nodes`` or more alive nodes, every node reads back a sentinel file the
    driver wrote under ``root``: a node that does not see the storage path would write its features and
    Tune state where no other node finds them. Raises ``StorageError`` naming the nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < min_nodes:
        return None
    token = uuid.uuid4().hex
    sentinel = Path(root) / f".dinoscale-nodes-{token[:8]}"
    sentinel.write_text(token)
    try:
        seen = ray.remote(num_cpus=0)(_reads_token)
        refs = {
            n["NodeManagerAddress"]: seen.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(sentinel), token)
            for n in nodes
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        blind = [ip for ip, r in refs.items() if r not in ready or not ray.get(r)]
    finally:
        sentinel.unlink(missing_ok=True)
    if blind:
        raise StorageError(
            f"storage path '{root}' is not seen by node(s) {', '.join(blind)} of the Ray cluster (a file written by "
            "the driver is not there); on a cluster the storage path must be shared storage every node mounts "
            "at the same path (NFS, a mounted volume): set storage.path or DINOSCALE_STORAGE to it"
        )
    return f"seen by all {len(nodes)} nodes"


def _reads_token(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


# ---------------------------------------------------------------- tracking


def redact(uri: str) -> str:
    """The URI without its password (``user:***@host``), for messages."""
    u = urlparse(uri)
    if u.password:
        netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return urlunparse(u._replace(netloc=netloc))
    return uri


def _uri_source() -> str:
    return settings.tracking_uri_source()


_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _reachable(uri: str) -> None:
    """A TCP connection to the tracking host within ``CONNECT_TIMEOUT_S``, for network stores."""
    u = urlparse(uri)
    scheme = u.scheme.split("+")[0]
    if scheme not in _DEFAULT_PORTS or not u.hostname:
        return
    port = u.port or _DEFAULT_PORTS[scheme]
    t0 = time.perf_counter()
    try:
        with socket.create_connection((u.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise TrackingError(
            f"cannot reach the MLflow tracking server {redact(uri)} ({_uri_source()}): connecting to "
            f"{u.hostname}:{port} {why} after {time.perf_counter() - t0:.1f}s. Start the server (or check the "
            "address and port), or track locally with --tracking-uri sqlite:///mlruns.db"
        ) from e


def _local_store(uri: str, write: bool = True) -> None:
    """A SQLite database or a local folder store: its folder can be made and written (``write=False``:
    no part of its path is a file; nothing is created)."""
    u = urlparse(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        folder, what = db.parent, f"folder of the tracking database {db.name}"
        if db.exists() and not db.is_file():
            raise TrackingError(f"tracking database '{db}' ({_uri_source()}) is a folder, not a SQLite file")
    elif u.scheme in ("", "file") and not uri.startswith("databricks"):
        folder, what = Path(u.path if u.scheme == "file" else uri), "tracking folder"
    else:
        return
    try:
        check_storage(folder, what, f"set the tracking URI ({_uri_source()}) to a store in a writable folder", write)
    except StorageError as e:
        raise TrackingError(str(e)) from None


def check_tracking_server(uri: str) -> None:
    """Only the network part (no file system, nothing imported): a tracking server answers a TCP
    connection within ``CONNECT_TIMEOUT_S``. Local stores pass; the pre-flight checks them."""
    _reachable(uri)


def check_tracking_reachable(uri: str) -> None:
    """The server answers a TCP connection within seconds (or the local store's path is not under a file),
    instead of MLflow's minutes of retries against a server that is down. Writes nothing: for the commands
    that only read the record (``analyze``), and first thing in the pre-flight."""
    _local_store(uri, write=False)
    _reachable(uri)


@contextmanager
def no_retries():
    """MLflow's HTTP client retries a failed request for minutes by default; pre-flight asks once."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(REQUEST_TIMEOUT_S)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """The tracking store answers and accepts a write (the sweep's experiment exists or is created, and
    gets a tag with the time of this check). Raises ``TrackingError`` naming the URI and what to do."""
    _local_store(uri)
    _reachable(uri)
    from mlflow.tracking import MlflowClient

    from dinoscale.tracking import ensure_experiment

    with no_retries():
        try:
            client = MlflowClient(uri)
            exp_id = ensure_experiment(client, experiment, artifact_location)
            client.set_experiment_tag(exp_id, record.PREFLIGHT, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        except Exception as e:  # noqa: BLE001 - MLflow raises MlflowException, requests and SQLAlchemy errors
            raise TrackingError(_tracking_failure(uri, e)) from e
    return f"{redact(uri)} (experiment '{experiment}')"


def _tracking_failure(uri: str, e: Exception) -> str:
    text = str(e)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    first = (lines[0].split(" Response body:")[0][:300] if lines else "") or type(e).__name__
    where = f"the MLflow tracking store {redact(uri)} ({_uri_source()})"
    if any(code in text for code in ("401", "403", "Unauthorized", "PERMISSION_DENIED", "Permission denied")):
        return (
            f"{where} refused the credentials or the permission to write ({first}). Set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a user who may write to the experiment"
        )
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (
            f"{where} did not answer within {REQUEST_TIMEOUT_S}s (connected, then no response). Check that the server is up and "
            "not overloaded (its /health page), or track locally with --tracking-uri sqlite:///mlruns.db"
        )
    if "database is locked" in text or "readonly" in text.lower() or "read-only" in text.lower():
        return f"{where} cannot be written ({first}); check the database file's permissions and free space"
    return (
        f"{where} did not answer as an MLflow tracking store ({type(e).__name__}: {first}). Check the URI "
        "(an http(s):// MLflow server, sqlite:///file.db, postgresql://...), or track locally with "
        "--tracking-uri sqlite:///mlruns.db"
    )


def tracking_failure_of(exc: BaseException, uri: str, run_id: str | None = None) -> TrackingError | None:
    """The tracking store failing mid-sweep (after the pre-flight wrote to it), as one ``TrackingError`` naming
    the URI and what became of the store: a SQLite database deleted or its folder removed, a server that stopped
    answering, a database that cannot be written (full disk, permissions). ``resumable`` is True when the runs
    recorded so far are still there once the store is back (a SQLite store must still hold ``run_id``, the
    sweep's parent run: MLflow creates a deleted database anew, empty); None when ``exc`` is not such a failure
    (a bug)."""
    found = tracking_store_failure(exc)
    if found is None:
        return None
    where, lost = f"the MLflow tracking store {redact(uri)}", False
    first = failure_line(found)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.parent.is_dir():
            what, lost = f"its folder '{db.parent}' is gone (removed, or its file system unmounted)", True
        elif not db.is_file() or db.stat().st_size == 0:
            what, lost = f"the database file '{db}' is gone (deleted or replaced)", True
        elif run_id and not _sqlite_holds_run(db, run_id):
            what, lost = f"the database file '{db}' no longer holds this sweep's runs (deleted and made anew?)", True
        elif any(x in str(found).lower() for x in _SQLITE_TROUBLE):
            what = f"the database cannot be written ({first}); check its free space and permissions"
        else:
            return None  # the store is there and said something else: not its surroundings
    else:
        try:
            _reachable(uri)
            if not any(x in str(found).lower() for x in _SERVER_TROUBLE):
                return None
            what = f"the server failed a request ({first})"
        except TrackingError as gone:
            what = "the server stopped answering: " + str(gone).split(": ", 1)[-1].split(". Start the server")[0]
    if lost:
        todo = (
            "; the runs it held are lost with it: restore the database from a backup and continue with --resume, "
            "or start the sweep again without --resume (the feature sets already stored are not extracted again)"
        )
    else:
        todo = ""  # the sweep says what was kept and how to continue
    err = TrackingError(f"{where} failed mid-sweep: {what}{todo}")
    err.resumable = not lost
    return err


def _sqlite_holds_run(db: Path, run_id: str) -> bool:
    """Read directly (not through MLflow's pooled connections, which may still read a deleted file)."""

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT 1 FROM runs WHERE run_uuid = ?", (run_id,)).fetchone() is not None
    except sqlite3.Error as e:  # a database that is not there or holds no tables: lost; busy or else: not known
        return not any(x in str(e) for x in ("no such table", "unable to open", "not a database"))


def failure_line(e: BaseException) -> str:
    """The line of a store's exception that says what failed (SQLAlchemy puts a note about autoflush first)."""
    said = [x.strip() for x in str(e).splitlines() if x.strip()]
    found = next((x for x in said if "sqlite3." in x or "Error:" in x or "Errno" in x or "Max retries" in x), "")
    return found[:300] or f"{type(e).__name__}: {said[0][:300] if said else ''}"


_SQLITE_TROUBLE = ("readonly database", "disk is full", "unable to open", "disk i/o", "locked", "no such table")
_SERVER_TROUBLE = ("connection", "timed out", "timeout", "max retries", " 502", " 503", " 504", "unavailable")
# MlflowException codes that are a wrong request (a bug), not a store that failed
_REQUEST_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}


def tracking_store_failure(exc: BaseException | None, depth: int = 0) -> BaseException | None:
    """The exception in ``exc``'s chain that may say the tracking store failed: an ``MlflowException`` other than
    a wrong request, a ``requests`` connection error, a SQLAlchemy / sqlite ``OperationalError`` (a candidate:
    ``tracking_failure_of`` looks at the store itself before it says so)."""
    if exc is None or depth > 8:
        return None
    name, module = type(exc).__name__, type(exc).__module__
    if name == "MlflowException" or (module.startswith("mlflow") and hasattr(exc, "error_code")):
        if getattr(exc, "error_code", "") not in _REQUEST_ERRORS:
            return exc
    if (module.startswith(("requests", "urllib3")) and "Connection" in name) or name == "OperationalError":
        return exc
    for inner in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        if isinstance(inner, BaseException) and inner is not exc:
            found = tracking_store_failure(inner, depth + 1)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------- weights


def check_dimensions(spec) -> None:
    """Every backbone takes 2D images: the extraction feeds images and slices of volumes. A 3D encoder (a family
    with ``spatial_dims`` 3, e.g. CT-FM) is declared, built and its weights checked, but cannot be swept yet:
    refused here, all such backbones in one message."""
    from dinoscale.models.backbones import families, get_backbone

    volume = [
        b.name
        for b in spec.backbones
        if getattr(families.find_family(get_backbone(b.name).family), "spatial_dims", 2) == 3
    ]
    if volume:
        two_d = [
            f.name for f in families.FAMILIES if f.spatial_dims == 2 and f.domain in ("radiology", "ct", "general")
        ]
        raise UserError(
            f"backbone(s) {', '.join(volume)} encode 3D volumes, and dinoscale's extraction feeds encoders 2D images "
            "and slices of volumes: they cannot be swept yet. Remove them from backbones / encoders in the spec "
            f"(2D families for CT slices: {', '.join(two_d)}; `dinoscale backbones` lists all)"
        )


def check_fine_tunable(spec) -> None:
    """The strategies that train the encoder (lora, full) are written for timm ViT blocks (``blocks.<i>.attn.qkv``
    / ``.mlp``: LoRA's targets, layer-wise decay). A backbone without them (a transformers model, a CNN, a 3D
    encoder) is refused here, all of them in one message naming their families and the fine-tunable ones."""
    from dinoscale.models.backbones import backbone_facts, families, get_backbone

    training = [s for s in spec.strategies if s in training_kinds()]
    if not training:
        return
    bad = [b.name for b in spec.backbones if not backbone_facts(b.name).vit_blocks]
    if not bad:
        return
    named = [f"{n} (family {get_backbone(n).family or 'none'}, {get_backbone(n).loader})" for n in bad]
    ok = [
        f.name
        for f in families.FAMILIES
        if f.domain != "demo"
        and f.loader not in (families.TRANSFORMERS, families.MONAI)
        and backbone_facts(f.sizes[0].backbone).vit_blocks
    ]
    raise UserError(
        f"strategies {', '.join(training)} train the encoder through timm ViT blocks (blocks.<i>.attn / mlp), "
        f"which backbone(s) {'; '.join(named)} do not have: fine-tuning them is not supported yet. Run them with "
        f"strategies: [frozen], or fine-tune a family that has them: {', '.join(ok)}"
    )


def check_all_weights(spec) -> str:
    """Each backbone's weights resolve and fit its architecture (``dinoscale.models.check_weights``). Every
    missing set is named in one message, each with what fetches it (``dinoscale weights SPEC`` lists them all):
    a file that is not there, a loader package that is not installed, hub weights not in the cache when
    HF_HUB_OFFLINE says the hub cannot be reached (otherwise the extraction downloads them)."""
    from dinoscale.models import check_weights
    from dinoscale.models.backbones import hub_offline, missing_weights_error, weights_need

    offline = hub_offline()
    needs = [weights_need(b.name, b.weights) for b in spec.backbones]
    missing = [n for n in needs if not n.found and (n.weights != "hub" or offline or n.where.startswith("loader "))]
    error = missing_weights_error(missing)
    if error is not None:
        raise error
    found = [f"{b.name}: {check_weights(b.name, b.weights)}" for b in spec.backbones if b.weights != "random"]
    n_random = sum(b.weights == "random" for b in spec.backbones)
    return ", ".join(found + ([f"{n_random} random init"] if n_random else []))


# ---------------------------------------------------------------- science: what the data lets the numbers mean

# A CT window that saturates more than this share of the sampled voxels to white (above its top) leaves too little
# of the data to read: CT holds little above any preset's top (bone, contrast, metal: a few %), data in other
# units (MRI, already-normalised arrays) much more.
WINDOW_SATURATED_MAX = 0.5
_CT_NAMES = ("ct",)  # how a dataset that states its modality (MSD's dataset.json) names CT


def macro_class_set_words(ds, k: int) -> str | None:
    """The classes a macro metric can average on the test split (each needs a positive and a negative test
    patient; ``k`` of each to be in the class set), in words for the report line. Raises ``DataError`` when no
    class has both - the metric would be undefined and every cell would fail after extraction. None for dense
    tasks."""
    from dinoscale.metrics import macro_class_set
    from dinoscale.tasks import get_task

    if get_task(ds.task).dense or not ds.classes:
        return None
    df = ds.split("test")
    y, ids = df[ds.classes].to_numpy(dtype=float) > 0, df["patient_id"].astype(str).to_numpy()
    n_patients = len(set(ids))
    rule = get_task(ds.task).negatives
    full, any_ = macro_class_set(y, ids, k, rule), macro_class_set(y, ids, 1, rule)
    pos = {c: len(set(ids[y[:, j]])) for j, c in enumerate(ds.classes)}
    if not any_.any():
        counts = ", ".join(f"{c} ({pos[c]} positive, {n_patients - pos[c]} negative)" for c in ds.classes)
        raise DataError(
            f"dataset '{ds.name}': no class has both a positive and a negative patient in the test split "
            f"({n_patients} patients): {counts}; macro AUROC would be undefined in every cell. Enlarge the test "
            "split (dataset.split.test_fraction) or add patients"
        )
    words = f"macro AUROC over {int(full.sum()) or int(any_.sum())} of {len(ds.classes)} classes"
    left = [c for j, c in enumerate(ds.classes) if not any_[j]]
    if left:
        words += f" (no positive or no negative test patient, per class only: {', '.join(left)})"
    return words


def check_window(plan) -> str | None:
    """A CT window (HU) against the data it is applied to: refused where the dataset states a modality other
    than CT (MSD's dataset.json), or where it saturates more than ``WINDOW_SATURATED_MAX`` of the voxels of a
    decoded sample (one volume per split). Returns the clipped share in words (None: no window)."""
    from dinoscale.data.checks import sample_rows
    from dinoscale.data.readers import read_volume
    from dinoscale.sweep.plan import volume_window

    window, ds = volume_window(plan.spec.dataset), plan.dataset
    if window is None or not ds.volumetric:
        return None
    lo, hi = window
    low = high = total = 0
    for row in sample_rows(ds, 1):
        vol, _ = read_volume(str(ds.manifest.at[row, "path"]))
        low, high, total = low + int((vol < lo).sum()), high + int((vol > hi).sum()), total + vol.size
    clipped, saturated = (low + high) / max(total, 1), high / max(total, 1)
    name = plan.spec.dataset.window
    what = f"dataset.window {name if isinstance(name, str) else list(name)} = [{lo:g}, {hi:g}] HU"
    stated = [c for c in ds.channel_names if c]
    where = f"dataset '{ds.name}'" + (f" ({plan.spec.dataset.subset})" if plan.spec.dataset.subset else "")
    sample = f"it clips {clipped:.0%} of the sampled voxels ({saturated:.0%} to white)"
    if stated and not any(c.lower() in _CT_NAMES for c in stated):
        raise DataError(
            f"{what} is a CT window, but {where} states its modality as {', '.join(stated)}, not CT; {sample}. "
            "Remove dataset.window (each volume is then scaled by its own min-max)"
        )
    if saturated > WINDOW_SATURATED_MAX:
        raise DataError(
            f"{what} saturates {saturated:.0%} of the sampled voxels of {where} (more than "
            f"{WINDOW_SATURATED_MAX:.0%}): the data are not in Hounsfield units for this window. Remove "
            "dataset.window or choose one that fits the data's units"
        )
    return f"window clips {clipped:.0%} of sampled voxels"


# ---------------------------------------------------------------- all of it


def preflight(spec, project_dir: Path, tracking_uri: str, resume: bool = False):
    """Run the checks in order and return (the plan, the report). The plan is built here because it
    prepares the dataset: the data root's layout is checked by the dataset's adapter."""
    # here, not at module level: the CLI imports this module to try the tracking server before torch, timm and
    # MONAI are imported (the plan imports them; ~3 s on an idle core, BENCHMARKS.md "tracking pre-flight")
    from dinoscale.data.checks import colour_files_under_grey, decode_sample, range_barely_used
    from dinoscale.sweep.plan import build_plan, check_runnable, storage_root
    from dinoscale.tracking import default_artifact_location

    report, found = PreflightReport(), None
    with report.step("storage"):
        root = storage_root(spec.storage, project_dir)
        report.checks["storage"] = check_storage(root)
        if resume:  # there is a sweep of this spec to resume (ResumeError names what is missing or changed)
            found = SweepState.for_resume(root, spec.name, spec.digest())
            report.checks["storage"] += f", sweep {found.sweep_id} to resume"
    with report.step("tracking"):  # reachable now (seconds); written to last, once the sweep can run
        check_tracking_reachable(tracking_uri)
    with report.step("weights"):
        check_dimensions(spec)
        check_fine_tunable(spec)
        report.checks["weights"] = check_all_weights(spec)
    with report.step("data"):
        plan = build_plan(spec, project_dir, require_data=True)
        check_runnable(plan)
        n = decode_sample(plan.dataset)
        report.checks["data"] = f"{len(plan.dataset.manifest)} rows, {n} sample file(s) decoded"
        for label, ext in plan.externals.items():  # each external test set's files, as the internal ones
            m = decode_sample(ext.dataset)
            report.checks["data"] += f"; external '{label}': {len(ext.dataset.manifest)} rows, {m} file(s) decoded"
        colour = colour_files_under_grey(plan.dataset)
        if colour:  # a grey pipeline would average the hue of colour files away: said before anything runs
            report.checks["data"] += (
                f"; WARNING: {len(colour)} sampled file(s) are colour (first: {colour[0]}) but dataset "
                f"'{plan.dataset.name}' reaches the encoder as grey: set dataset.color: rgb to keep colour"
            )
        flat = range_barely_used(plan.dataset) if _intensity_of(plan) == "range" else None
        if flat:  # 'range' over a container much wider than the data: nearly flat inputs, said before extraction
            report.checks["data"] += (
                f"; WARNING: the sampled images span at most {flat[0]:.1%} of the value range their files declare "
                f"(e.g. {flat[1]}): under dataset.intensity 'range' the encoder sees nearly flat images; set "
                "dataset.intensity: percentiles (or a CT window)"
            )
        # science: the macro metric's class set on the test split, the CT window against the data's units
        for words in (macro_class_set_words(plan.dataset, spec.metrics.macro_min_patients), check_window(plan)):
            if words:
                report.checks["data"] += f"; {words}"
        from dinoscale.sweep.inputs import prepare_label_maps

        if prepare_label_maps(plan):  # labels outside the probe's classes named before extraction
            report.checks["data"] += "; label maps checked"
    with report.step("storage"):  # room for what the plan will extract: known once the plan is built
        room = check_free_space(plan)
        report.checks["storage"] += f", {room}" if room else ""
    with report.step("tracking"):
        artifacts = spec.tracking.artifact_location or default_artifact_location(tracking_uri)
        report.checks["tracking"] = check_tracking(tracking_uri, spec.experiment_name, artifacts)
        if found is not None:
            check_parent_run(tracking_uri, found)
    return plan, report


def _intensity_of(plan) -> str | None:
    """The 2D feature sets' intensity mapping (None without 2D feature sets)."""
    return next((fs.recipe.intensity for fs in plan.feature_sets if fs.recipe and fs.view == "images"), None)


def check_parent_run(uri: str, state) -> None:
    """``--resume``: the sweep's parent run is in the tracking store (a store deleted or replaced since, or
    another URI, holds none); raises ``ResumeError`` saying how to start again."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with no_retries():
        try:
            MlflowClient(uri).get_run(state.parent_run_id)
            return
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise TrackingError(_tracking_failure(uri, e)) from e
    raise ResumeError(
        f"sweep {state.sweep_id} cannot be resumed: its parent run {state.parent_run_id} is not in the tracking store "
        f"{redact(uri)} (it was recorded in {redact(state.tracking_uri)}; deleted or replaced since?). Track to that "
        "store, or start the sweep again without --resume: feature sets already stored are not extracted again"
    )
