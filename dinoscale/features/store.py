"""Content-addressed feature store: one entry per backbone forward pass over one dataset split.

The key hashes everything that changes the features (see ``FeatureKey``), so two resolutions,
two weight files or two preprocessing choices never collide. Entries are written to a private
temporary folder and renamed into place: a killed writer leaves nothing readable, and of two
concurrent writers of one key the first rename wins while the second discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EXTRACTOR_VERSION = "1"


class FeatureStoreError(RuntimeError):
    pass


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
    features: np.ndarray  # (n, d), stored dtype
    sample_ids: list[str]
    meta: dict


class FeatureStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def has(self, key: FeatureKey) -> bool:
        return (self._dir(key.digest) / "meta.json").is_file()

    def put(self, key: FeatureKey, features: np.ndarray, sample_ids: list[str], extra: dict | None = None) -> Path:
        final = self._dir(key.digest)
        if (final / "meta.json").is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key.digest}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            arr = np.ascontiguousarray(features.astype(key.dtype))
            with open(tmp / "features.npy", "wb") as f:
                np.save(f, arr, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            meta = {
                "key": asdict(key),
                "digest": key.digest,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "sha256": _sha256(tmp / "features.npy"),
                "sample_ids": list(sample_ids),
                "created": time.time(),
                **(extra or {}),
            }
            # meta.json is written last: its presence marks a complete entry.
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another writer won; its entry is identical
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def get(self, key: FeatureKey | str, verify: bool = True) -> FeatureSet:
        """Read an entry by key or by its digest; ``verify`` checks the stored checksum."""
        digest = key if isinstance(key, str) else key.digest
        d = self._dir(digest)
        if not (d / "meta.json").is_file():
            raise FeatureStoreError(f"feature set {digest} is not in the store at {self.root}")
        meta = json.loads((d / "meta.json").read_text())
        if verify and _sha256(d / "features.npy") != meta["sha256"]:
            raise FeatureStoreError(f"{d / 'features.npy'}: checksum mismatch; remove the entry and extract again")
        feats = np.load(d / "features.npy", allow_pickle=False)
        if list(feats.shape) != meta["shape"] or len(meta["sample_ids"]) != feats.shape[0]:
            raise FeatureStoreError(f"{d}: shape {feats.shape} does not match its metadata")
        return FeatureSet(feats, meta["sample_ids"], meta)

    def entries(self) -> list[dict]:
        if not self.root.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*/*/meta.json"))]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
