"""Content-addressed feature store: one entry per backbone forward pass over one dataset split.

The key hashes everything that changes the features (see ``FeatureKey``), so two resolutions,
two weight files or two preprocessing choices never collide.

**Layout (format 3): an entry is a list of ``.npy`` shards.** A feature set is cut into contiguous
shards of the split's manifest (``shard-00003-of-00008``), each extracted by its own task and written
as one ``.npy`` file, row by row, so neither extraction nor reading ever holds a whole split::

    <root>/<dd>/<digest>/shard-00003-of-00008-<sha12>.npy   the rows of one shard
    <root>/<dd>/<digest>/shard-00003-of-00008.json          commits that shard (file, rows, sha256, ids)
    <root>/<dd>/<digest>/meta.json                          commits the entry (every shard, in order)

Why ``.npy``: numpy reads and writes it natively (no new dependency, nothing to unpickle:
``allow_pickle=False``), its header is a fixed text block followed by the raw C-ordered rows, so a
writer can stream rows to their offsets as they come and a reader can map any window of rows
(``mmap``) without parsing more than the header; the file is the array, readable by any tool.
safetensors would do the same for one tensor per file but brings nothing ``.npy`` lacks here; zarr
adds chunk compression (patch tokens barely compress) and a dependency with its own store semantics
that would have to be reconciled with the atomicity below.

Reading maps windows of a shard (``FeatureRows``): the page cache keeps a feature set warm for every
trial on a node, while each process's resident set and address space stay bounded by the window and
the batch it asks for, whatever the size of the split.

What a reader can rely on, and why:

- **Local / shared POSIX path** (NFS, Lustre, a mounted volume): a shard is written to a private
  ``.tmp-*`` file, fsynced, renamed to its content-addressed name, then committed by its ``.json``
  (written to a temporary name and ``os.replace``-d: atomic). The entry is committed last by
  ``meta.json`` the same way, once every shard is. A killed writer leaves a ``.tmp-*`` file (removed by
  ``dinoscale cache rm --stale``) and no commit: nothing readable; the shards committed before it are
  kept, so a rerun extracts only what is missing.
- **Object stores** (S3, GCS, Azure through fsspec): a single object PUT is atomic and (S3 since 2020,
  GCS) strongly read-after-write consistent. A shard is written to a local file, then uploaded under
  its content-addressed name, then committed by its ``.json`` PUT; the entry by ``meta.json``. Shards
  are read by download into a local cache (``cache_dir``, named by their sha256) and mapped there.
- Two writers of one shard or one entry both produce complete, verified data; the last commit wins
  and the other data file becomes an unreferenced orphan (``cache rm --stale`` removes it).

Every shard is verified against the sha256 of its commit when a process first opens it (once per
process and file: ``verify=False`` skips it). Entries of format 2 (one ``features.npy`` written whole)
are still read.

A local store that cannot be written (its file system full or read-only, a permission, its folder gone)
raises ``StorageError`` naming the file being written, the free space and the bytes the shard needs
(``dinoscale.errors.environment_error``), never a bare ``OSError``: the partial file is removed, the shards
committed before are kept, and a rerun once there is room extracts only the rest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

from dinoscale.digest import sha256_file
from dinoscale.errors import StorageError, UserError, environment_error
from dinoscale.features.recipe import EXTRACTOR_VERSION, FeatureRecipe  # noqa: F401  (EXTRACTOR_VERSION re-exported)

FORMAT = 3  # 3: .npy shards committed one by one, then meta.json; 2: one features.npy per entry
LEGACY_DATA_FILE = "features.npy"  # format 2
META = "meta.json"
SHARD_PREFIX = "shard-"
# Rows are read through mmap windows of at most this many bytes (at least one row): the most a read
# adds to a process's resident set and address space, whatever the size of the shard.
READ_WINDOW_BYTES = 16 << 20


class FeatureStoreError(UserError, RuntimeError):
    """A feature-store entry that is missing or damaged; the message names it and how to remove it."""

    kind = "storage"


@dataclass(frozen=True)
class FeatureKey:
    """A feature set's store key: its recipe (everything that turns a unit into features,
    ``dinoscale.features.recipe``) applied to the rows of one manifest split. Two recipes that differ in any
    field, or two different sets of rows, never share an entry."""

    recipe: FeatureRecipe
    manifest_digest: str

    @property
    def digest(self) -> str:
        blob = json.dumps({"recipe": self.recipe.digest, "rows": self.manifest_digest}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    @property
    def weights_digest(self) -> str:
        return self.recipe.weights_digest

    @property
    def dtype(self) -> str:
        return self.recipe.dtype

    def as_dict(self) -> dict:
        """What an entry's ``meta.json`` records of its key: the recipe's fields, its digest and the rows'."""
        return {**self.recipe.as_dict(), "recipe_digest": self.recipe.digest, "manifest_digest": self.manifest_digest}


def shard_name(index: int, count: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}-of-{count:05d}"


# ---------------------------------------------------------------- reading rows without loading them


@dataclass(frozen=True)
class _Shard:
    path: str  # a local file
    start: int  # first row of the entry held by this shard
    stop: int
    offset: int  # bytes of the .npy header


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise FeatureStoreError(f"{path}: Fortran-ordered array; the store writes C order")
        if dtype.hasobject:
            raise FeatureStoreError(f"{path}: object arrays are never read (nothing is unpickled)")
        return tuple(shape), dtype, f.tell()


class FeatureRows:
    """The rows of a feature set, read on demand from its ``.npy`` shards through bounded mmap windows.

    Behaves like a read-only array for what trials need: ``shape``, ``dtype``, ``len``, ``rows[i]``,
    ``rows[a:b]``, ``rows[index_array]`` (an in-memory copy of just those rows, in the stored dtype) and
    ``blocks(max_bytes)``; ``np.asarray(rows)`` loads everything (what small splits do)."""

    def __init__(self, shards: Sequence[_Shard], dtype: np.dtype, row_shape: tuple[int, ...]):
        self.shards = list(shards)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self._starts = np.array([s.start for s in self.shards] + [self.shards[-1].stop if self.shards else 0])
        self.n = int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.n * self.row_bytes

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"FeatureRows(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.n if key < 0 else 0)
            if not 0 <= k < self.n:
                raise IndexError(f"row {key} out of range for {self.n} rows")
            return self.take(np.array([k]))[0]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(self.n)))
        return self.take(np.asarray(key))

    def __array__(self, dtype=None, copy=None):
        out = self.take(np.arange(self.n))
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def blocks(self, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
        """Consecutive rows, at most ``max_bytes`` (at least one row) at a time."""
        step = max(1, int(max_bytes) // max(1, self.row_bytes))
        for a in range(0, self.n, step):
            yield self.take(np.arange(a, min(self.n, a + step)))

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed) as an in-memory array of the stored dtype."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((len(index), *self.row_shape), dtype=self.dtype)
        if not len(index):
            return out
        if index.min() < 0 or index.max() >= self.n:
            raise IndexError(f"rows out of range for {self.n} rows")
        order = np.argsort(index, kind="stable")
        rows = index[order]
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            shard = self.shards[s]
            out[order[sel]] = self._read(shard, rows[sel] - shard.start)
        return out

    def _read(self, shard: _Shard, local: np.ndarray) -> np.ndarray:
        """Sorted local rows of one shard, one mmap window at a time (unmapped before the next)."""
        rb = self.row_bytes
        out = np.empty((len(local), *self.row_shape), dtype=self.dtype)
        if rb == 0:
            return out
        per_window = max(1, READ_WINDOW_BYTES // rb)
        gran = mmap.ALLOCATIONGRANULARITY
        with open(shard.path, "rb") as f:
            i = 0
            while i < len(local):
                first = int(local[i])
                j = int(np.searchsorted(local, first + per_window, side="left"))
                last = int(local[j - 1])
                start = shard.offset + first * rb
                aligned = start - start % gran
                length = shard.offset + (last + 1) * rb - aligned
                with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=aligned) as mm:
                    view = np.frombuffer(
                        mm,
                        dtype=self.dtype,
                        count=(last - first + 1) * (rb // self.dtype.itemsize),
                        offset=start - aligned,
                    ).reshape(last - first + 1, *self.row_shape)
                    out[i:j] = view[local[i:j] - first]
                    del view  # release the buffer before the window is unmapped
                i = j
        return out


@dataclass
class FeatureSet:
    rows: FeatureRows
    ids: list[str]  # one per manifest row extracted (image, tile or volume), in row order
    rows_per_id: list[int] | None  # None: one row per id; else rows of each id (slices of a volume)
    meta: dict

    @property
    def features(self) -> FeatureRows:
        """The rows (``np.asarray(fs.features)`` loads them; trials read batches)."""
        return self.rows

    @property
    def sample_ids(self) -> list[str]:
        """One id per row: the id itself, or ``<id>#<k>`` for the k-th row (slice) of an id."""
        if self.rows_per_id is None:
            return list(self.ids)
        from dinoscale.data import slice_row_ids

        return slice_row_ids(self.ids, self.rows_per_id)


# ---------------------------------------------------------------- the store


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) checked in this process


def _verify_file(path: str, sha: str, what: str, digest: str) -> None:
    st = os.stat(path)
    memo = (path, st.st_size, st.st_mtime_ns, sha)
    if memo in _VERIFIED:
        return
    if sha256_file(path) != sha:
        raise FeatureStoreError(
            f"{what}: checksum mismatch; remove the entry (dinoscale cache rm {digest}) and extract again"
        )
    _VERIFIED.add(memo)


@contextmanager
def _storage_errors(root, path, needed: int = 0):
    """An ``OSError`` of the machine's storage while writing ``path`` (full, read-only, not permitted, the root
    gone) becomes one ``StorageError`` naming it; any other error passes unchanged."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        err = environment_error(e, path, root, needed)
        if err is None:
            raise
        raise err from e


def _write_atomic_local(path: Path, data: bytes, root=None) -> None:
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    with _storage_errors(root or path.parent, path, len(data)):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)  # a full disk must not keep the half-written commit
            raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the file system went away or read-only: nothing more to clean


class FeatureStore:
    """Entries by key; see the module docstring for the layout and what a reader can rely on.

    ``cache_dir``: where shards of an object store are downloaded to be mapped (default
    ``$DINOSCALE_FEATURE_CACHE``, else ``<tmp>/dinoscale-feature-cache``); label maps cached for trials
    live under ``<root>/labels`` locally, under ``cache_dir`` for object stores."""

    def __init__(self, root: str | Path, storage_options: dict | None = None, cache_dir: str | Path | None = None):
        self.url = str(root)
        self.fs, path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        self.root: Path | str = Path(path) if self.local else path.rstrip("/")
        # a local root seen when the store was opened and gone when it writes is the storage path removed or
        # unmounted under a running sweep: a writer says so instead of making the folders again (on another disk)
        self.root_existed = self.local and Path(path).is_dir()
        default_cache = (
            os.environ.get("DINOSCALE_FEATURE_CACHE") or Path(tempfile.gettempdir()) / "dinoscale-feature-cache"
        )
        self.cache_dir = Path(cache_dir or default_cache)

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r})"

    @property
    def local_dir(self) -> Path:
        """A local folder for derived caches (label maps): under the root when it is local."""
        return Path(self.root) if self.local else self.cache_dir

    # -- layout
    def _dir(self, digest: str) -> str:
        return f"{self.root}/{digest[:2]}/{digest}"

    def has(self, key: FeatureKey | str) -> bool:
        digest = key if isinstance(key, str) else key.digest
        return self.fs.isfile(f"{self._dir(digest)}/{META}")

    def has_shard(self, key: FeatureKey | str, index: int, count: int) -> bool:
        digest = key if isinstance(key, str) else key.digest
        return self.fs.isfile(f"{self._dir(digest)}/{shard_name(index, count)}.json")

    def shards_committed(self, key: FeatureKey | str, count: int) -> list[int]:
        """Indices of the committed shards of an entry cut into ``count`` shards."""
        digest = key if isinstance(key, str) else key.digest
        d = self._dir(digest)
        if not self.fs.isdir(d):
            return []
        suffix = f"-of-{count:05d}.json"
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False)]
        return sorted(
            int(n[len(SHARD_PREFIX) : len(SHARD_PREFIX) + 5])
            for n in names
            if n.startswith(SHARD_PREFIX) and n.endswith(suffix)
        )

    # -- write
    def shard_writer(
        self,
        key: FeatureKey,
        index: int,
        count: int,
        n_rows: int,
        ids: Sequence[str],
        rows_per_id: Sequence[int] | None = None,
        extra: dict | None = None,
    ) -> ShardWriter:
        """A writer of shard ``index`` of ``count``: ``n_rows`` rows (for ``ids``, with ``rows_per_id`` rows
        each when an id has several), given in any order by ``write(rows, values)``; ``close()`` commits."""
        return ShardWriter(self, key, index, count, n_rows, ids, rows_per_id, extra)

    def commit(self, key: FeatureKey, count: int, extra: dict | None = None) -> Path | str:
        """Commit an entry whose ``count`` shards are all committed: write its ``meta.json``."""
        final = self._dir(key.digest)
        if self.has(key):
            return Path(final) if self.local else final
        shards = []
        for i in range(count):
            p = f"{final}/{shard_name(i, count)}.json"
            try:
                shards.append(json.loads(self.fs.cat_file(p)))
            except FileNotFoundError:
                raise FeatureStoreError(f"feature set {key.digest}: shard {i} of {count} is not committed") from None
        ids = [i for s in shards for i in s["ids"]]
        rpi = None
        if any(s.get("rows_per_id") is not None for s in shards):
            rpi = [r for s in shards for r in (s.get("rows_per_id") or [1] * len(s["ids"]))]
        start, table = 0, []
        for s in shards:
            table.append(
                {"file": s["file"], "rows": [start, start + s["n_rows"]], "sha256": s["sha256"], "bytes": s["bytes"]}
            )
            start += s["n_rows"]
        shapes = {tuple(s["shape"][1:]) for s in shards if s["n_rows"]}
        if len(shapes) > 1:
            raise FeatureStoreError(f"feature set {key.digest}: shards disagree on the row shape: {sorted(shapes)}")
        row_shape = list(next(iter(shapes))) if shapes else list(shards[0]["shape"][1:])
        meta = {
            "format": FORMAT,
            "key": key.as_dict(),
            "digest": key.digest,
            "shape": [start, *row_shape],
            "dtype": shards[0]["dtype"],
            "ids": ids,
            "rows_per_id": rpi,
            "shards": table,
            "n_shards": count,
            "bytes": sum(s["bytes"] for s in shards),
            "created": time.time(),
            **{k: v for s in shards for k, v in (s.get("extra") or {}).items() if k not in ("seconds",)},
            "seconds": sum((s.get("extra") or {}).get("seconds", 0.0) for s in shards),
            **(extra or {}),
        }
        blob = json.dumps(meta).encode()
        if self.local:
            _write_atomic_local(Path(final) / META, blob, self.root)
            return Path(final)
        self.fs.pipe_file(f"{final}/{META}", blob)  # the commit
        return final

    def put(
        self, key: FeatureKey, features: np.ndarray, sample_ids: list[str], extra: dict | None = None
    ) -> Path | str:
        """Store ``features`` (cast to ``key.dtype``) under ``key`` as one shard, in blocks; returns the entry's
        location (a ``Path`` on a local root, a path inside the object store otherwise)."""
        final = self._dir(key.digest)
        if self.has(key):
            return Path(final) if self.local else final
        n = len(features)
        if n != len(sample_ids):
            raise FeatureStoreError(f"{n} feature rows but {len(sample_ids)} sample ids")
        with self.shard_writer(key, 0, 1, n, sample_ids, extra=extra) as w:
            step = max(1, (64 << 20) // max(1, int(np.prod(features.shape[1:], dtype=np.int64)) * 4))
            for a in range(0, n, step):
                w.write(np.arange(a, min(n, a + step)), features[a : a + step].astype(key.dtype))
            if n == 0:
                w.write(np.arange(0), features.astype(key.dtype))
        return self.commit(key, 1)

    # -- read
    def meta(self, digest: str) -> dict:
        path = f"{self._dir(digest)}/{META}"
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise FeatureStoreError(f"feature set {digest} is not in the store at {self.url}") from None

    @staticmethod
    def _table(meta: dict) -> list[dict]:
        if "shards" in meta:
            return meta["shards"]
        n = meta["shape"][0]  # format 2: one file
        return [{"file": meta.get("data_file", LEGACY_DATA_FILE), "rows": [0, n], "sha256": meta["sha256"]}]

    def _local_copy(self, digest: str, entry: dict) -> str:
        """The shard as a local file: in place for local roots, downloaded (verified, by sha256) otherwise."""
        src = f"{self._dir(digest)}/{entry['file']}"
        if self.local:
            if not os.path.isfile(src):
                raise FeatureStoreError(f"{src}: data missing for a committed entry; remove it and extract again")
            return src
        dst = self.cache_dir / "shards" / f"{entry['sha256']}.npy"
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.parent / f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}"
            try:
                self.fs.get_file(src, str(tmp))  # streamed to disk, never whole in memory
            except FileNotFoundError:
                raise FeatureStoreError(
                    f"{src}: data missing for a committed entry; remove it and extract again"
                ) from None
            if sha256_file(tmp) != entry["sha256"]:
                tmp.unlink(missing_ok=True)
                raise FeatureStoreError(
                    f"{src}: checksum mismatch; remove the entry (dinoscale cache rm {digest}) and extract again"
                )
            os.replace(tmp, dst)
        return str(dst)

    def get(self, key: FeatureKey | str, verify: bool = True) -> FeatureSet:
        """Open an entry by key or digest: rows are read on demand (``FeatureSet.rows``); ``verify`` checks
        each shard's sha256 (once per process and file)."""
        digest = key if isinstance(key, str) else key.digest
        meta = self.meta(digest)
        shards, dtype, row_shape = [], np.dtype(meta["dtype"]), tuple(meta["shape"][1:])
        for entry in self._table(meta):
            path = self._local_copy(digest, entry)
            if verify:
                _verify_file(path, entry["sha256"], f"{self._dir(digest)}/{entry['file']}", digest)
            shape, dt, offset = _npy_header(path)
            a, b = entry["rows"]
            if shape != (b - a, *row_shape) or dt != dtype:
                raise FeatureStoreError(f"{path}: shape {shape} {dt} does not match its metadata")
            shards.append(_Shard(path, a, b, offset))
        ids = meta.get("ids", meta.get("sample_ids", []))
        rows = FeatureRows(shards, dtype, row_shape)
        rpi = meta.get("rows_per_id")
        if (sum(rpi) if rpi is not None else len(ids)) != rows.n:
            raise FeatureStoreError(f"feature set {digest}: {rows.n} rows but its ids describe another number")
        return FeatureSet(rows, list(ids), rpi, meta)

    def entries(self) -> list[dict]:
        """Metadata of every committed entry (sorted by digest)."""
        if not self.fs.isdir(str(self.root)):
            return []
        out = []
        for p in sorted(self.fs.glob(f"{self.root}/*/*/{META}")):
            try:
                out.append(json.loads(self.fs.cat_file(p)))
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # removed meanwhile, or not ours
        return out

    def nbytes(self, digest: str) -> int:
        """Bytes of an entry's data files on disk (its shards)."""
        meta = self.meta(digest)
        if "bytes" in meta:
            return int(meta["bytes"])
        return sum(self.fs.size(f"{self._dir(digest)}/{e['file']}") for e in self._table(meta))

    # -- maintenance (dinoscale cache ...)
    def verify(self, digest: str) -> str | None:
        """None when every shard of the entry reads back intact (sha256, header, shape), else what is wrong."""
        try:
            meta = self.meta(digest)
            for entry in self._table(meta):
                path = self._local_copy(digest, entry)
                if sha256_file(path) != entry["sha256"]:
                    return f"{self._dir(digest)}/{entry['file']}: checksum mismatch; remove the entry and extract again"
            self.get(digest, verify=False)
            return None
        except FeatureStoreError as e:
            return str(e)
        except (ValueError, OSError) as e:
            return f"{self._dir(digest)}: unreadable ({type(e).__name__}: {e})"

    def remove(self, digest: str) -> bool:
        """Remove one entry (and its uncommitted shards); ``meta.json`` goes first so that the entry
        disappears at once for readers."""
        d = self._dir(digest)
        if not self.fs.exists(d):
            return False
        if self.local:
            trash = Path(d).parent / f".tmp-rm-{digest}-{uuid.uuid4().hex[:8]}"
            os.rename(d, trash)  # atomic: readers see the whole entry or nothing
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if self.fs.exists(f"{d}/{META}"):
                self.fs.rm_file(f"{d}/{META}")
            self.fs.rm(d, recursive=True)
        return True

    def _referenced(self, d: str) -> set[str]:
        names = set()
        for p in self.fs.glob(f"{d}/*.json"):
            try:
                m = json.loads(self.fs.cat_file(p))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if "file" in m:
                names.add(m["file"])
            names.update(e["file"] for e in m.get("shards", []))
            if "data_file" in m:
                names.add(m["data_file"])
            if m.get("format", 2) < 3 and "shards" not in m:
                names.add(m.get("data_file", LEGACY_DATA_FILE))
        return names

    def stale(self, older_than_s: float = 3600.0) -> list[str]:
        """Leftovers of killed or losing writers older than ``older_than_s`` (younger ones may be in flight):
        ``.tmp-*`` files and folders, and data files that no commit (shard ``.json`` or ``meta.json``) names."""
        now, out = time.time(), []
        if not self.fs.isdir(str(self.root)):
            return out

        def age(p: str) -> float:
            try:
                return now - (os.stat(p).st_mtime if self.local else self.fs.modified(p).timestamp())
            except (NotImplementedError, AttributeError, OSError):
                return float("inf")

        if self.local:
            for p in [*Path(self.root).glob("*/.tmp-*"), *Path(self.root).glob("*/*/.tmp-*")]:
                if age(str(p)) > older_than_s:
                    out.append(str(p))
        for d in self.fs.glob(f"{self.root}/*/*"):
            name = d.rsplit("/", 1)[-1]
            if name.startswith(".") or not self.fs.isdir(d):
                continue
            referenced = self._referenced(d)
            for p in self.fs.glob(f"{d}/*.npy"):
                name = p.rsplit("/", 1)[-1]
                if not name.startswith(".") and name not in referenced and age(p) > older_than_s:
                    out.append(p)
        return list(dict.fromkeys(out))

    def remove_path(self, path: str) -> None:
        if self.local:
            p = Path(path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        else:
            self.fs.rm(path, recursive=True)


class ShardWriter:
    """Streams the rows of one shard to a ``.npy`` file at their offsets, then commits it.

    Memory: the rows of one ``write`` call (the writer keeps nothing but a bitmap of the rows written).
    The header is written once the first rows give the row shape; rows may come in any order (volumes
    finish out of order with several loader workers). ``close()`` checks that every row was written,
    fsyncs, hashes the file (streamed), moves it to its content-addressed name and writes the shard's
    commit ``.json``; leaving the ``with`` block on an error removes the partial file (a killed process
    leaves a ``.tmp-*`` file that nothing reads)."""

    def __init__(
        self, store: FeatureStore, key: FeatureKey, index: int, count: int, n_rows: int, ids, rows_per_id, extra
    ):
        self.store, self.key, self.index, self.count, self.n_rows = store, key, index, count, int(n_rows)
        self.ids, self.rows_per_id, self.extra = (
            list(ids),
            (list(map(int, rows_per_id)) if rows_per_id is not None else None),
            extra,
        )
        expected = sum(self.rows_per_id) if self.rows_per_id is not None else len(self.ids)
        if expected != self.n_rows:
            raise FeatureStoreError(f"shard {index} of {count}: {self.n_rows} rows but its ids describe {expected}")
        self.dtype = np.dtype(key.dtype)
        self.name = shard_name(index, count)
        d = Path(store._dir(key.digest)) if store.local else store.cache_dir / "uploads" / key.digest
        self._root = store.root if store.local else store.cache_dir
        self.tmp = d / f".tmp-{self.name}-{uuid.uuid4().hex[:8]}.npy"
        if store.local and store.root_existed and not Path(store.root).is_dir():  # gone: not made anew here
            raise environment_error(FileNotFoundError(errno.ENOENT, "gone"), self.tmp, Path(store.root).parent)
        with _storage_errors(self._root, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
            self._f = open(self.tmp, "wb")
        self._offset: int | None = None
        self._row_shape: tuple[int, ...] | None = None
        self._written = np.zeros(self.n_rows, bool)
        self.bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()  # e.g. the disk filled at the flush: the partial file goes, nothing is committed
                raise
        else:
            self.abort()

    def _start(self, row_shape: tuple[int, ...]) -> None:
        self._row_shape = tuple(row_shape)
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.n_rows, *row_shape),
        }
        with _storage_errors(self._root, self.tmp):
            np.lib.format.write_array_header_1_0(self._f, header)  # 64-byte aligned, as np.save writes it
            self._offset = self._f.tell()
            self._f.truncate(self._offset + self.n_rows * self._row_bytes)

    @property
    def _needed(self) -> int:
        """Bytes of the whole shard file once its rows are known (0 before)."""
        return 0 if self._offset is None else self._offset + self.n_rows * self._row_bytes

    @property
    def _row_bytes(self) -> int:
        return int(np.prod(self._row_shape, dtype=np.int64)) * self.dtype.itemsize

    def write(self, rows, values: np.ndarray) -> None:
        """Rows ``rows`` (indices within the shard) get ``values`` (cast to the key's dtype)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.ascontiguousarray(np.asarray(values).astype(self.dtype, copy=False))
        if len(rows) != len(values):
            raise FeatureStoreError(f"{len(rows)} rows but {len(values)} values")
        if self._offset is None:
            self._start(values.shape[1:])
        elif values.shape[1:] != self._row_shape:
            raise FeatureStoreError(f"rows of shape {values.shape[1:]} after rows of shape {self._row_shape}")
        if not len(rows):
            return
        if rows.min() < 0 or rows.max() >= self.n_rows:
            raise FeatureStoreError(f"rows outside 0..{self.n_rows - 1}")
        rb, fd = self._row_bytes, self._f.fileno()
        order = np.argsort(rows, kind="stable")
        r, v = rows[order], values[order]
        cut = np.flatnonzero(np.diff(r) != 1) + 1  # contiguous runs: one pwrite each
        with _storage_errors(self._root, self.tmp, self._needed):
            for a, b in zip(np.r_[0, cut], np.r_[cut, len(r)]):
                os.pwrite(fd, v[a:b].tobytes(), self._offset + int(r[a]) * rb)
        self._written[r] = True

    def close(self) -> str:
        if self._offset is None:
            raise FeatureStoreError(f"shard {self.index} of {self.count}: nothing was written")
        if not self._written.all():
            missing = np.flatnonzero(~self._written)
            raise FeatureStoreError(f"shard {self.index} of {self.count}: rows {missing[:10].tolist()} never written")
        with _storage_errors(self._root, self.tmp, self._needed):  # a full disk may only show at the flush
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        sha = sha256_file(self.tmp)
        self.bytes = self.tmp.stat().st_size
        file = f"{self.name}-{sha[:12]}.npy"
        store, d = self.store, self.store._dir(self.key.digest)
        commit = {
            "file": file,
            "index": self.index,
            "count": self.count,
            "n_rows": self.n_rows,
            "shape": [self.n_rows, *self._row_shape],
            "dtype": str(self.dtype),
            "sha256": sha,
            "bytes": self.bytes,
            "ids": self.ids,
            "rows_per_id": self.rows_per_id,
            "created": time.time(),
            "extra": self.extra or {},
        }
        try:
            if store.local:
                with _storage_errors(self._root, Path(d) / file):
                    os.replace(self.tmp, Path(d) / file)
                try:
                    _write_atomic_local(Path(d) / f"{self.name}.json", json.dumps(commit).encode(), self._root)
                except BaseException:
                    if not self.store.has_shard(self.key, self.index, self.count):  # no other writer committed it
                        _unlink_quietly(Path(d) / file)  # uncommitted data would only hold the space
                    raise
            else:
                store.fs.put_file(str(self.tmp), f"{d}/{file}")  # one PUT: complete or absent
                store.fs.pipe_file(f"{d}/{self.name}.json", json.dumps(commit).encode())  # the shard's commit
        finally:
            _unlink_quietly(self.tmp)
        return file

    def abort(self) -> None:
        """Drop the partial file; quietly, as it runs while another error (often a full disk) is on its way."""
        try:
            self._f.close()  # flushes what is buffered: may fail again on a full disk
        except OSError:
            pass
        finally:
            _unlink_quietly(self.tmp)
