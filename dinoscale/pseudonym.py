"""Identifiers leave the data root only pseudonymised.

Per-sample predictions (``predictions/test.csv`` on every cell run) carry ``sample_id`` and
``patient_id`` as the manifest has them; for a hospital's own data these can be record or accession
numbers, and a tracking server is often shared. With ``tracking.pseudonymize`` on (``auto``: on for
every dataset that is neither a phantom nor a registered public dataset, i.e. the generic manifest
and user datasets) each is replaced by a keyed hash, ``p-`` + the first 24 hex digits of
HMAC-SHA256(key, id). The key is 32 random bytes in a file created on first use (mode 0600):
``DINOSCALE_PSEUDONYM_KEY`` if set, else ``.dinoscale-pseudonym.key`` in the data root, else (a
read-only data root) ``pseudonym.key`` in the storage path. The same id maps to the same pseudonym in
every cell and sweep with that key, so the analysis joins cells as before, and results are joined
back to the manifest only where the key is: ``dinoscale.pseudonym.pseudonymize_ids(ids, key)``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

ID_COLUMNS = ("sample_id", "patient_id")
KEY_FILE = ".dinoscale-pseudonym.key"
STORAGE_KEY_FILE = "pseudonym.key"
PREFIX = "p-"


def enabled(spec) -> bool:
    """Whether ``spec``'s identifiers are pseudonymised (``tracking.pseudonymize``)."""
    from dinoscale.data.dataset import get_dataset  # the registry imports every adapter: only when asked

    mode = spec.tracking.pseudonymize
    if mode != "auto":
        return mode == "on"
    try:
        d = get_dataset(spec.dataset.name)
    except KeyError:
        return True
    return not (d.phantom or d.published is not None)


def key_path(spec, storage: Path) -> Path:
    env = os.environ.get("DINOSCALE_PSEUDONYM_KEY")
    if env:
        return Path(env).expanduser()
    if spec.dataset.root:
        root = Path(os.path.expandvars(spec.dataset.root)).expanduser()
        if (root / KEY_FILE).is_file() or (root.is_dir() and os.access(root, os.W_OK)):
            return root / KEY_FILE
    return Path(storage) / STORAGE_KEY_FILE


def load_key(path: Path) -> bytes:
    """The key in ``path``, created (0600, exclusively: two drivers agree on one) on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    text = path.read_text().strip()
    if not text:  # created by another process that has not written yet
        raise RuntimeError(f"pseudonym key {path} is empty; remove it and rerun")
    return bytes.fromhex(text)


def key_for(spec, storage: Path) -> bytes | None:
    """The sweep's key, or None when its identifiers are kept as they are."""
    return load_key(key_path(spec, storage)) if enabled(spec) else None


def pseudonymize_ids(ids, key: bytes) -> list[str]:
    return [PREFIX + hmac.new(key, str(v).encode(), hashlib.sha256).hexdigest()[:24] for v in ids]


def pseudonymize_frame(df, key: bytes | None):
    """A copy of ``df`` with its identifier columns pseudonymised (``df`` itself when key is None)."""
    if key is None:
        return df
    out = df.copy()
    for c in ID_COLUMNS:
        if c in out.columns:
            out[c] = pseudonymize_ids(out[c], key)
    return out
