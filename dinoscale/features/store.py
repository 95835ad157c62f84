"""Content-addressed feature store: one entry per backbone forward pass over one dataset split.

The key hashes everything that changes the features (see ``FeatureKey``), so two resolutions,
two weight files or two preprocessing choices never collide.

The root is a local path or any fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://`` in
tests). What a reader can rely on, and why:

- **Local / shared POSIX path** (NFS, Lustre, a mounted volume): an entry is written into a private
  temporary folder and renamed into place. ``rename`` of a directory is atomic on POSIX file
  systems, so a killed writer leaves nothing readable (only a ``.tmp-*`` folder, removed by
  ``dinoscale cache rm --stale``), and of two concurrent writers of one key the first rename wins
  while the second discards its copy.
- **Object stores** (S3, GCS, Azure through fsspec): there are no directories and no rename, but a
  single object PUT is atomic (readers see the whole object or none) and, on S3 since 2020 and on
  GCS, strongly read-after-write consistent. A writer uploads its data under a name unique to it
  (``features-<uuid>.npy``) and then ``meta.json``, which names that file and its sha256: an entry
  exists only once its ``meta.json`` does, and a ``meta.json`` always refers to a complete object.
  Two concurrent writers may both upload; the last ``meta.json`` wins and points to its own complete
  data, the other data object becomes an unreferenced orphan (``cache rm --stale`` removes it).
  A killed writer leaves at most an orphan, never a readable entry.

Every read verifies the sha256 recorded in ``meta.json`` (``verify=False`` skips it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dinoscale.digest import sha256_file
from dinoscale.errors import UserError

EXTRACTOR_VERSION = "2"  # 2: torch anti-aliased resize instead of MONAI Gaussian pre-smoothing
DATA_FILE = "features.npy"  # local layout; object stores use features-<uuid>.npy named in meta.json


class FeatureStoreError(UserError, RuntimeError):
    """A feature-store entry that is missing or damaged; the message names it and how to remove it."""

    kind = "storage"


@dataclass(frozen=True)
class FeatureKey:
    backbone: str  # timm architecture id (with overrides)
    weights_digest: str
    resolution: int
    interpolation: str
    normalisation: str  # mean/std as text
    tokens: str
    manifest_digest: str
    dtype: str
    extractor_version: str = EXTRACTOR_VERSION

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


@dataclass
class FeatureSet:
    features: np.ndarray  # (n, d) or (n, d, h, w), stored dtype
    sample_ids: list[str]
    meta: dict


class FeatureStore:
    def __init__(self, root: str | Path, storage_options: dict | None = None):
        import fsspec

        self.url = str(root)
        self.fs, path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        self.root: Path | str = Path(path) if self.local else path.rstrip("/")

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r})"

    # -- layout
    def _dir(self, digest: str) -> str:
        return f"{self.root}/{digest[:2]}/{digest}"

    def has(self, key: FeatureKey | str) -> bool:
        digest = key if isinstance(key, str) else key.digest
        return self.fs.isfile(f"{self._dir(digest)}/meta.json")

    # -- write
    def put(
        self, key: FeatureKey, features: np.ndarray, sample_ids: list[str], extra: dict | None = None
    ) -> Path | str:
        """Store ``features`` (cast to ``key.dtype``) under ``key``; returns the entry's location
        (a ``Path`` on a local root, a path inside the object store otherwise)."""
        final = self._dir(key.digest)
        if self.has(key):
            return Path(final) if self.local else final
        if self.local:
            return self._put_local(key, features, sample_ids, extra)
        return self._put_object(key, features, sample_ids, extra)

    def _meta(self, key: FeatureKey, arr: np.ndarray, sha: str, sample_ids, extra, data_file: str) -> dict:
        if arr.shape[0] != len(sample_ids):
            raise FeatureStoreError(f"{arr.shape[0]} feature rows but {len(sample_ids)} sample ids")
        return {
            "key": asdict(key),
            "digest": key.digest,
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "sha256": sha,
            "data_file": data_file,
            "sample_ids": list(sample_ids),
            "created": time.time(),
            **(extra or {}),
        }

    def _put_local(self, key, features, sample_ids, extra) -> Path:
        final = Path(self._dir(key.digest))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key.digest}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            arr = np.ascontiguousarray(features.astype(key.dtype))
            with open(tmp / DATA_FILE, "wb") as f:
                np.save(f, arr, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            meta = self._meta(key, arr, sha256_file(tmp / DATA_FILE), sample_ids, extra, DATA_FILE)
            # meta.json is written last: its presence marks a complete entry.
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another writer won; its entry is equivalent
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _put_object(self, key, features, sample_ids, extra) -> str:
        final = self._dir(key.digest)
        arr = np.ascontiguousarray(features.astype(key.dtype))
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        raw = buf.getvalue()
        data_file = f"features-{uuid.uuid4().hex}.npy"
        meta = self._meta(key, arr, hashlib.sha256(raw).hexdigest(), sample_ids, extra, data_file)
        self.fs.pipe_file(f"{final}/{data_file}", raw)  # one PUT: complete or absent
        if self.has(key):  # another writer committed meanwhile: keep its entry, drop our data
            self.fs.rm_file(f"{final}/{data_file}")
            return final
        self.fs.pipe_file(f"{final}/meta.json", json.dumps(meta).encode())  # the commit
        return final

    # -- read
    def meta(self, digest: str) -> dict:
        path = f"{self._dir(digest)}/meta.json"
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise FeatureStoreError(f"feature set {digest} is not in the store at {self.url}") from None

    def get(self, key: FeatureKey | str, verify: bool = True) -> FeatureSet:
        """Read an entry by key or by its digest; ``verify`` checks the stored checksum."""
        digest = key if isinstance(key, str) else key.digest
        meta = self.meta(digest)
        data = f"{self._dir(digest)}/{meta.get('data_file', DATA_FILE)}"
        try:
            raw = self.fs.cat_file(data)
        except FileNotFoundError:
            raise FeatureStoreError(
                f"{data}: data missing for a committed entry; remove it and extract again"
            ) from None
        if verify and hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            raise FeatureStoreError(
                f"{data}: checksum mismatch; remove the entry (dinoscale cache rm {digest}) and extract again"
            )
        feats = np.load(io.BytesIO(raw), allow_pickle=False)
        if list(feats.shape) != meta["shape"] or len(meta["sample_ids"]) != feats.shape[0]:
            raise FeatureStoreError(f"{data}: shape {feats.shape} does not match its metadata")
        return FeatureSet(feats, meta["sample_ids"], meta)

    def entries(self) -> list[dict]:
        """Metadata of every committed entry (sorted by digest)."""
        if not self.fs.isdir(str(self.root)):
            return []
        out = []
        for p in sorted(self.fs.glob(f"{self.root}/*/*/meta.json")):
            try:
                out.append(json.loads(self.fs.cat_file(p)))
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # removed meanwhile, or not ours
        return out

    # -- maintenance (dinoscale cache ...)
    def verify(self, digest: str) -> str | None:
        """None when the entry reads back intact, else what is wrong."""
        try:
            self.get(digest, verify=True)
            return None
        except FeatureStoreError as e:
            return str(e)

    def remove(self, digest: str) -> bool:
        """Remove one entry; ``meta.json`` goes first so that the entry disappears at once for readers."""
        d = self._dir(digest)
        if not self.fs.exists(d):
            return False
        if self.local:
            trash = Path(d).parent / f".tmp-rm-{digest}-{uuid.uuid4().hex[:8]}"
            os.rename(d, trash)  # atomic: readers see the whole entry or nothing
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if self.fs.exists(f"{d}/meta.json"):
                self.fs.rm_file(f"{d}/meta.json")
            self.fs.rm(d, recursive=True)
        return True

    def stale(self, older_than_s: float = 3600.0) -> list[str]:
        """Leftovers of killed writers older than ``older_than_s`` (younger ones may still be in flight):
        local ``.tmp-*`` folders; in object stores, data objects no ``meta.json`` refers to."""
        now, out = time.time(), []
        if not self.fs.isdir(str(self.root)):
            return out
        if self.local:
            for p in Path(self.root).glob("*/.tmp-*"):
                if now - p.stat().st_mtime > older_than_s:
                    out.append(str(p))
            return out
        referenced = {f"{self._dir(m['digest'])}/{m.get('data_file', DATA_FILE)}" for m in self.entries()}
        for p in self.fs.glob(f"{self.root}/*/*/features-*.npy"):
            if p in referenced:
                continue
            try:
                age = now - self.fs.modified(p).timestamp()
            except (NotImplementedError, AttributeError, OSError):
                age = float("inf")
            if age > older_than_s:
                out.append(p)
        return out

    def remove_path(self, path: str) -> None:
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
        else:
            self.fs.rm(path, recursive=True)
