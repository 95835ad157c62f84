"""Datasets: one registry, one prepared form (a manifest of files on disk with patient-level splits).

Adding a dataset is one module with a function decorated by ``@register_dataset``; it returns a
``PreparedDataset`` whose manifest lists every image with its patient, split and labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd

if TYPE_CHECKING:
    from dinoscale.spec import DatasetSpec

SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """Data that cannot be used: the message names the file or folder and what to do."""


@dataclass
class PreparedDataset:
    name: str
    task: str  # "multilabel" (binary is multilabel with one class)
    classes: list[str]
    manifest: pd.DataFrame  # columns: sample_id, patient_id, path (absolute), split, one 0/1 column per class
    provenance: dict[str, str]  # MLflow tags: data.source = phantom|real, generator+seed or dataset+root
    root: Path
    _digests: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name].reset_index(drop=True)

    def labels(self, name: str):
        return self.split(name)[self.classes].to_numpy(dtype="float32")

    def manifest_digest(self, split: str) -> str:
        """Digest of what a split contains: ids, patients, labels, and each file's path and size."""
        if split not in self._digests:
            df = self.split(split)
            h = hashlib.sha256()
            h.update(f"{self.name}|{','.join(self.classes)}|{split}\n".encode())
            for row in df.itertuples(index=False):
                p = Path(row.path)
                size = p.stat().st_size if p.exists() else -1
                labels = "".join(str(int(getattr(row, c))) for c in self.classes) if self.classes else ""
                h.update(f"{row.sample_id}|{row.patient_id}|{p.name}|{size}|{labels}\n".encode())
            self._digests[split] = h.hexdigest()[:16]
        return self._digests[split]

    @property
    def is_phantom(self) -> bool:
        return self.provenance.get("data.source") == "phantom"


_REGISTRY: dict[str, tuple[Callable[..., PreparedDataset], bool]] = {}
_PUBLISHED_IMAGES: dict[str, int] = {}


def register_dataset(name: str, phantom: bool = False, published_images: int | None = None):
    """``published_images``: the dataset's size as published, for cost estimates when the data is not here."""

    def deco(fn: Callable[..., PreparedDataset]):
        _REGISTRY[name] = (fn, phantom)
        if published_images:
            _PUBLISHED_IMAGES[name] = published_images
        return fn

    return deco


def published_images(name: str) -> int | None:
    _load_adapters()
    return _PUBLISHED_IMAGES.get(name)


def _load_adapters() -> None:
    # Imported for their registration side effect; kept light (no torch, no MONAI).
    from dinoscale.data import nih, phantom  # noqa: F401


def dataset_names() -> list[str]:
    _load_adapters()
    return sorted(_REGISTRY)


def is_phantom(name: str) -> bool:
    _load_adapters()
    return _REGISTRY[name][1]


def prepare_dataset(spec: "DatasetSpec", storage: Path) -> PreparedDataset:
    """Index (real) or generate (phantom) the dataset and assign patient-level splits."""
    from dinoscale.data.splits import check_no_leakage

    _load_adapters()
    fn, _ = _REGISTRY[spec.name]
    ds = fn(spec, storage)
    check_no_leakage(ds.manifest)
    for s in SPLITS:
        if not (ds.manifest["split"] == s).any():
            raise DataError(f"dataset '{spec.name}': split '{s}' is empty; more patients are needed")
    return ds
