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
TASKS = ("multilabel", "multiclass", "segmentation", "instance_segmentation", "mil")
# Columns beyond the 2D core, in the manifest where a dataset kind needs them:
#   n_slices (3D volumes), mask_path (segmentation / instance ids), pet_path (PET of a PET/CT pair,
#   path is the CT), bag_id (WSI: the slide a tile belongs to; one row per tile), z_start/z_stop
#   (a block of sections of one EM volume), volume_key/mask_key (HDF5 dataset names), tile_label
#   (phantom-wsi ground truth per tile), npz_index (MedMNIST+ row in the .npz array).
EXTRA_COLUMNS = ("n_slices", "mask_path", "pet_path", "bag_id", "z_start", "z_stop", "volume_key", "mask_key", "npz_index")
FILE_COLUMNS = ("mask_path", "pet_path")


class DataError(RuntimeError):
    """Data that cannot be used: the message names the file or folder and what to do."""


@dataclass
class PreparedDataset:
    name: str
    task: str  # one of TASKS; "multilabel" (binary is multilabel with one class)
    classes: list[str]
    manifest: pd.DataFrame  # columns: sample_id, patient_id, path (absolute), split, one 0/1 column per class
    # (+ per kind: n_slices, mask_path, pet_path, bag_id, z_start/z_stop, ...; see EXTRA_COLUMNS)
    provenance: dict[str, str]  # MLflow tags: data.source = phantom|real, generator+seed or dataset+root
    root: Path
    mask_labels: dict[int, str] = field(default_factory=dict)  # segmentation: mask value -> structure name
    skipped: list[dict] = field(default_factory=list)  # on_bad_file=skip: {"path", "reason"} per dropped file
    _digests: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name].reset_index(drop=True)

    def labels(self, name: str):
        return self.split(name)[self.classes].to_numpy(dtype="float32")

    def manifest_digest(self, split: str) -> str:
        """Digest of what a split contains: ids, patients, labels, and each file's path and size."""
        if split not in self._digests:
            df = self.split(split)
            extra = [c for c in EXTRA_COLUMNS if c in df.columns]
            h = hashlib.sha256()
            h.update(f"{self.name}|{','.join(self.classes)}|{split}\n".encode())
            for row in df.itertuples(index=False):
                p = Path(row.path)
                size = _size(p)
                labels = "".join(str(int(getattr(row, c))) for c in self.classes) if self.classes else ""
                h.update(f"{row.sample_id}|{row.patient_id}|{p.name}|{size}|{labels}\n".encode())
                for col in extra:  # only for manifests that have them: 2D digests are unchanged
                    v = getattr(row, col)
                    if col in FILE_COLUMNS and isinstance(v, str) and v:
                        q = Path(v)
                        v = f"{q.name}:{_size(q)}"
                    h.update(f"{col}={v}\n".encode())
            self._digests[split] = h.hexdigest()[:16]
        return self._digests[split]

    @property
    def is_phantom(self) -> bool:
        """Generated data (a phantom, or synthetic labels on real anatomy): never results about patients."""
        return self.provenance.get("data.source") in ("phantom", "semi-synthetic")


def _size(p: Path) -> str | int:
    """A file's size; for a folder (a DICOM series) its file count and total size; -1 when missing."""
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        return f"{len(files)}files:{sum(f.stat().st_size for f in files)}"
    return p.stat().st_size if p.exists() else -1


_REGISTRY: dict[str, tuple[Callable[..., PreparedDataset], bool]] = {}
_PUBLISHED_IMAGES: dict[str, int] = {}
_TASKS: dict[str, str] = {}


def register_dataset(name: str, phantom: bool = False, published_images: int | None = None, task: str = "multilabel"):
    """``published_images``: the dataset's size as published, for cost estimates when the data is not here.
    ``task``: what a trial does with it (one of TASKS; 'auto' when only the data tells, e.g. 'manifest')."""

    def deco(fn: Callable[..., PreparedDataset]):
        _REGISTRY[name] = (fn, phantom)
        _TASKS[name] = task
        if published_images:
            _PUBLISHED_IMAGES[name] = published_images
        return fn

    return deco


def dataset_task(name: str) -> str:
    """The task a dataset serves (known before its data is prepared, for planning)."""
    _load_adapters()
    return _TASKS[name]


def published_images(name: str) -> int | None:
    _load_adapters()
    return _PUBLISHED_IMAGES.get(name)


def _load_adapters() -> None:
    # Imported for their registration side effect; kept light (no torch, no MONAI).
    from dinoscale.data import adapters, manifest, nih, phantom, phantoms3d, semireal  # noqa: F401


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
    if getattr(spec, "on_bad_file", "error") == "skip":
        from dinoscale.data.checks import drop_unreadable

        drop_unreadable(ds)
    check_no_leakage(ds.manifest)
    for s in SPLITS:
        if not (ds.manifest["split"] == s).any():
            raise DataError(f"dataset '{spec.name}': split '{s}' is empty; more patients are needed")
    return ds
