"""The prepared form of every dataset, and the one place that knows its manifest's columns.

A dataset adapter (a module of ``dinoscale.data`` with a function decorated by ``@register_dataset``)
returns a ``PreparedDataset``: a manifest of files on disk with patient-level splits. The dataset
then says what shape it has (2D images or volumes, bags, extra channels, masks) and hands out its
units in the two forms the sweep needs: ``sources(split)`` for extraction (what the readers open,
row by row) and ``units(split)`` for trials (what is scored: images, volumes or slides, with their
patients, labels, masks and feature rows). Nothing outside ``dinoscale.data`` reads manifest columns.

Adapters are found by name: every module of the ``dinoscale.data`` package is imported once, so a
new adapter is one file (plus its test).
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.data.errors import DataError  # noqa: F401  (re-exported: raised by every adapter)
from dinoscale.data.refs import REF_SEP, hdf5_ref, is_hdf5_ref, npz_ref  # noqa: F401  (re-exported)
from dinoscale.data.volumes import VolumeGrid, VolumeInput, channel_map, native_geometry, resampled_shape, resolve_grid
from dinoscale.provenance import is_synthetic

SPLITS = ("train", "val", "test")
# Columns beyond the 2D core, in the manifest where a dataset kind needs them:
#   n_slices (3D volumes), mask_path (segmentation / instance ids), pet_path (PET of a PET/CT pair,
#   path is the CT), bag_id (WSI: the slide a tile belongs to; one row per tile), z_start/z_stop
#   (a block of sections of one EM volume), volume_key/mask_key (HDF5 dataset names), tile_label
#   (phantom-wsi ground truth per tile), npz_key/npz_index (MedMNIST+: the .npz array and the row in it), sample (a group
#   reported on its own, e.g. CREMI's A / B / C), fold (cross-validation fold of a train / val unit).
EXTRA_COLUMNS = (
    "n_slices",
    "mask_path",
    "pet_path",
    "bag_id",
    "z_start",
    "z_stop",
    "volume_key",
    "mask_key",
    "npz_key",
    "npz_index",
    "sample",
    "fold",
)
# the centre (hospital) a row comes from, where a dataset states it (a slide table's 'center' column): metadata that
# changes no feature and no label, so not in the manifest digest; external test sets select centres by it
CENTER_COLUMN = "center"
FILE_COLUMNS = ("mask_path", "pet_path")
# Extra co-registered inputs of a row, by name -> manifest column (the row's ``path`` is the first channel).
CHANNEL_COLUMNS = {"pet": "pet_path"}


def slice_row_ids(sample_ids, n_slices) -> list[str]:
    """Feature-row ids of the slices of volumes: ``<volume>#<k>``."""
    return [f"{sid}#{k}" for sid, n in zip(sample_ids, n_slices) for k in range(int(n))]


@dataclass(frozen=True)
class RowSources:
    """One split as extraction reads it: one entry per image or volume, in manifest order."""

    ids: list[str]
    items: list[str]  # what the reader opens: a file, a DICOM series folder, an HDF5 block ``file::dataset::z0:z1``
    n_slices: list[int] | None = None  # volumes: slices along the slice axis
    channels: dict[str, list[str]] = field(default_factory=dict)  # extra co-registered inputs, e.g. {"pet": [...]}
    volume: VolumeInput | None = None  # volumes: channel map and grid (None: grey, each on its own grid)

    def row_ids(self, view: str) -> list[str]:
        """The ids of the stored feature rows: one per image / volume, or ``<volume>#<slice>`` per slice."""
        return slice_row_ids(self.ids, self.n_slices) if view == "slices" else list(self.ids)

    def forward_passes(self) -> list[int]:
        """Backbone inputs per entry: its slices for volumes, else 1."""
        return [int(n) for n in self.n_slices] if self.n_slices is not None else [1] * len(self.ids)

    def part(self, start: int, stop: int) -> RowSources:
        """Entries ``start:stop`` (a shard of a feature set: contiguous in manifest order)."""
        return RowSources(
            self.ids[start:stop],
            self.items[start:stop],
            self.n_slices[start:stop] if self.n_slices is not None else None,
            {k: v[start:stop] for k, v in self.channels.items()},
            self.volume,
        )


@dataclass
class SplitUnits:
    """One split as a trial scores it: one entry per unit (an image, a volume or a slide)."""

    sample_ids: list[str]
    patient_ids: np.ndarray
    labels: np.ndarray  # (n, C); (n, 0) for segmentation tasks
    items: list[str] = field(default_factory=list)  # what the image reader opens (strategies that train the encoder)
    members: list[list[str]] | None = None  # bags (slides): the feature rows (tiles) of each unit
    n_slices: list[int] | None = None  # volumes: slices per volume (feature rows '<id>#<k>')
    masks: list[str] | None = None  # segmentation: what the mask reader opens per unit
    spacing: list[tuple[float, ...] | None] | None = None  # dense volumes: voxel spacing as read_volume gives it
    groups: list[str] | None = None  # a group reported on its own (CREMI sample A / B / C)
    folds: np.ndarray | None = None  # cross-validation fold per unit, where the dataset has folds
    volume: VolumeInput | None = None  # volumes: channel map and common grid (label maps are on that grid)
    native: list[tuple] | None = None  # volumes on a common grid: each one's native (shape, spacing), RAS order

    def take(self, idx) -> SplitUnits:
        """The units at positions ``idx`` (a replicate's train or val split)."""
        idx = [int(i) for i in idx]

        def pick(v):
            if v is None:
                return None
            if isinstance(v, np.ndarray):
                return v[idx]
            return [v[i] for i in idx] if v else v

        return SplitUnits(
            [self.sample_ids[i] for i in idx],
            self.patient_ids[idx],
            self.labels[idx],
            pick(self.items),
            pick(self.members),
            pick(self.n_slices),
            pick(self.masks),
            pick(self.spacing),
            pick(self.groups),
            pick(self.folds),
            self.volume,
            pick(self.native),
        )

    @staticmethod
    def concat(a: SplitUnits, b: SplitUnits) -> SplitUnits:
        """``a``'s units then ``b``'s (train + val, regrouped by a replicate)."""

        def join(u, v):
            if u is None or v is None:
                return None
            return np.concatenate([u, v]) if isinstance(u, np.ndarray) else list(u) + list(v)

        return SplitUnits(
            a.sample_ids + b.sample_ids,
            np.concatenate([a.patient_ids, b.patient_ids]),
            np.concatenate([a.labels, b.labels]),
            list(a.items) + list(b.items),
            join(a.members, b.members),
            join(a.n_slices, b.n_slices),
            join(a.masks, b.masks),
            join(a.spacing, b.spacing),
            join(a.groups, b.groups),
            join(a.folds, b.folds),
            a.volume,
            join(a.native, b.native),
        )

    def row_groups(self, view: str) -> list[list[str]]:
        """The feature-store row ids that make up each unit, for a feature set of ``view``."""
        if view == "slices":
            return [slice_row_ids([sid], [n]) for sid, n in zip(self.sample_ids, self.n_slices)]
        if self.members is not None:
            return self.members
        return [[sid] for sid in self.sample_ids]


def _items(df: pd.DataFrame, column: str = "path", key_column: str = "volume_key") -> list[str]:
    """What the readers open for each row: the file, for HDF5 blocks (CREMI) ``file::dataset::z0:z1``, for
    items of .npz arrays (MedMNIST+) ``file::array[index]``."""
    if column == "path" and key_column == "volume_key" and "npz_index" in df.columns:
        return [npz_ref(p, k, i) for p, k, i in zip(df["path"], df["npz_key"], df["npz_index"])]
    if key_column not in df.columns:
        return df[column].tolist()
    return [hdf5_ref(p, k, z0, z1) for p, k, z0, z1 in zip(df[column], df[key_column], df["z_start"], df["z_stop"])]


@dataclass
class PreparedDataset:
    name: str
    task: str  # one of dinoscale.tasks; "multilabel" (binary is multilabel with one class)
    classes: list[str]
    manifest: pd.DataFrame  # columns: sample_id, patient_id, path (absolute), split, one 0/1 column per class
    # (+ per kind: n_slices, mask_path, pet_path, bag_id, z_start/z_stop, ...; see EXTRA_COLUMNS)
    provenance: dict[str, str]  # MLflow tags: data.source = phantom|real, generator+seed or dataset+root
    root: Path
    mask_labels: dict[int, str] = field(default_factory=dict)  # segmentation: mask value -> structure name
    skipped: list[dict] = field(default_factory=list)  # on_bad_file=skip: {"path", "reason"} per dropped file
    # How replicates vary the data (dinoscale.data.splits.replicate_indices): "resplit" redraws train / val by
    # patient; "fixed" keeps them (a protocol split, e.g. CREMI's first sections train); folds, where the
    # manifest has a fold column, give each replicate its own validation fold.
    replicates: str = "resplit"
    replicates_reason: str = ""
    channel_names: tuple[str, ...] = ()  # volumes: the channels of each image file (MSD: dataset.json's modality)
    volume: VolumeInput | None = None  # set from the spec when prepared (dinoscale.data.volumes)
    # 2D images: the colour model the encoder sees, grey | rgb ('' = the adapter's declaration, DatasetDef.color);
    # resolved with the spec's dataset.color when prepared (dinoscale.data.prepare_dataset)
    color: str = ""
    geometry: dict[str, tuple] = field(
        default_factory=dict
    )  # volumes on a common grid: sample id -> native (shape, spacing)
    # HDF5 label blocks whose file records no ``resolution``: their spacing [x, y, z] as the publication states it
    # (AC3/AC4: 6 x 6 x 29 nm), for metrics in physical units (the CREMI border mask)
    stated_spacing: tuple[float, float, float] | None = None
    _digests: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- shape

    @property
    def volumetric(self) -> bool:
        """Rows are 3D volumes read slice by slice (else 2D images)."""
        return "n_slices" in self.manifest.columns

    @property
    def bagged(self) -> bool:
        """Rows come in bags scored as one unit (the tiles of a slide)."""
        return "bag_id" in self.manifest.columns

    @property
    def channels(self) -> tuple[str, ...]:
        """Extra co-registered inputs fused into the encoder's channels (e.g. ('pet',) for PET/CT)."""
        return tuple(name for name, col in CHANNEL_COLUMNS.items() if col in self.manifest.columns)

    @property
    def volume_channels(self) -> tuple[str, ...]:
        """A volume's channels as read: its file's own (named by the dataset, else 'ct' beside a PET, else
        'image'), then the extra co-registered files."""
        own = self.channel_names or (("ct",) if "pet" in self.channels else ("image",))
        return tuple(own) + self.channels

    def resolve_volumes(self, spec) -> None:
        """Fix the channel map and the common grid of the volumes from the spec's dataset part
        (``dataset.channels``, ``dataset.spacing``, ``dataset.grid``; see ``dinoscale.data.volumes``)."""

        if not self.volumetric:
            if getattr(spec, "channels", None) is not None or getattr(spec, "spacing", None) is not None:
                raise DataError(f"dataset '{self.name}' holds 2D images; dataset.channels / spacing apply to volumes")
            return
        cmap = channel_map(self.volume_channels, getattr(spec, "channels", None))
        spacing, shape = getattr(spec, "spacing", None), getattr(spec, "grid", None)
        hdf5 = "volume_key" in self.manifest.columns
        grid = None
        if hdf5 and (spacing is not None or shape is not None):
            raise DataError(
                f"dataset '{self.name}': dataset.spacing / grid apply to NIfTI and DICOM volumes, not HDF5 blocks"
            )
        if not hdf5 and (spacing is not None or shape is not None or self.has_masks):
            items = _items(self.manifest)
            geometry = [native_geometry(it) for it in items]
            grid = resolve_grid(geometry, self.manifest["split"].tolist(), spacing, shape)
            if grid is not None:
                self.geometry = dict(zip(self.manifest["sample_id"].astype(str), geometry))
        self.volume = None if (cmap.grey and grid is None) else VolumeInput(cmap, grid)

    @property
    def grid(self) -> VolumeGrid | None:
        return self.volume.grid if self.volume is not None else None

    def _slices(self, df: pd.DataFrame) -> list[int]:
        """Slices per volume as extraction and trials see them: the common grid's depth, else the manifest's."""
        g = self.grid
        if g is None:
            return df["n_slices"].astype(int).tolist()
        if g.shape is not None:
            return [int(g.shape[2])] * len(df)

        return [resampled_shape(*self.geometry[str(sid)], g.spacing)[2] for sid in df["sample_id"]]

    @property
    def has_masks(self) -> bool:
        return "mask_path" in self.manifest.columns or "mask_key" in self.manifest.columns

    @property
    def is_phantom(self) -> bool:
        """Generated data (a phantom, or synthetic labels on real anatomy): never results about patients."""
        return is_synthetic(self.provenance)

    # ---------------------------------------------------------------- units

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name].reset_index(drop=True)

    def labels(self, name: str):
        return self.split(name)[self.classes].to_numpy(dtype="float32")

    def sources(self, split: str) -> RowSources:
        """What extraction reads for a split, row by row."""
        df = self.split(split)
        return RowSources(
            df["sample_id"].astype(str).tolist(),
            _items(df),
            self._slices(df) if self.volumetric else None,
            {name: df[col].tolist() for name, col in CHANNEL_COLUMNS.items() if col in df.columns},
            self.volume,
        )

    def forward_passes(self, split: str, view: str) -> int:
        """Backbone inputs to extract one split in a view: slices for volume views, else images."""
        df = self.split(split)
        return int(sum(self._slices(df))) if view != "images" and self.volumetric else len(df)

    def units(self, split: str) -> SplitUnits:
        """What a trial scores: rows of the manifest, or bags (slides) of tile rows."""
        df = self.split(split)
        ids = df["sample_id"].astype(str)
        if self.bagged:
            df = df.assign(bag_id=df["bag_id"].astype(str), sample_id=ids)
            mixed = df.groupby("bag_id")[self.classes].nunique().gt(1).any(axis=1)
            if mixed.any():
                raise DataError(
                    f"dataset '{self.name}': bag(s) {list(mixed.index[mixed])[:5]} have rows with different labels"
                )
            first = df.drop_duplicates("bag_id")  # bags in order of first appearance
            members = df.groupby("bag_id", sort=False)["sample_id"].apply(list)
            return SplitUnits(
                first["bag_id"].tolist(),
                first["patient_id"].astype(str).to_numpy(),
                first[self.classes].to_numpy(dtype="float32"),
                members=members.loc[first["bag_id"]].tolist(),
                folds=first["fold"].astype(int).to_numpy() if "fold" in first.columns else None,
            )
        masks = None
        if "mask_key" in df.columns:  # HDF5 label blocks: in the image's file (CREMI) or their own (AC3/AC4)
            masks = _items(df, "mask_path" if "mask_path" in df.columns else "path", "mask_key")
        elif "mask_path" in df.columns:
            masks = df["mask_path"].tolist()
        spacing, native, grid = None, None, self.grid
        if masks is not None and self.volumetric:  # metrics in physical units: each volume's own spacing
            from dinoscale.data.readers import volume_spacing

            spacing = [volume_spacing(m) or self.stated_spacing for m in masks]
            if grid is not None:  # label maps on the grid; test scored on each volume's native grid
                native = [self.geometry[str(sid)] for sid in ids]
                if grid.spacing is not None:
                    spacing = [tuple(grid.spacing)] * len(df)
        return SplitUnits(
            ids.tolist(),
            df["patient_id"].astype(str).to_numpy(),
            df[self.classes].to_numpy(dtype="float32") if self.classes else np.zeros((len(df), 0), np.float32),
            _items(df),
            n_slices=self._slices(df) if self.volumetric else None,
            masks=masks,
            spacing=spacing,
            groups=df["sample"].astype(str).tolist() if "sample" in df.columns else None,
            folds=df["fold"].astype(int).to_numpy() if "fold" in df.columns else None,
            volume=self.volume,
            native=native,
        )

    @property
    def folds(self) -> int:
        """Cross-validation folds of the train / val units (0: the dataset has none)."""
        if "fold" not in self.manifest.columns:
            return 0
        return int(self.manifest.loc[self.manifest["split"] != "test", "fold"].nunique())

    def manifest_digest(self, split: str) -> str:
        """Digest of what a split contains: ids, patients, labels, and each file's path and size."""
        if split not in self._digests:
            df = self.split(split)
            extra = [c for c in EXTRA_COLUMNS if c in df.columns]
            h = hashlib.sha256()
            h.update(f"{self.name}|{','.join(self.classes)}|{split}\n".encode())
            # by position: class names need not be identifiers (CT-RATE's 'Medical material')
            at = {c: i for i, c in enumerate(df.columns)}
            for row in df.itertuples(index=False, name=None):
                p = Path(row[at["path"]])
                size = _size(p)
                labels = "".join(str(int(row[at[c]])) for c in self.classes) if self.classes else ""
                h.update(f"{row[at['sample_id']]}|{row[at['patient_id']]}|{p.name}|{size}|{labels}\n".encode())
                for col in extra:  # only for manifests that have them: 2D digests are unchanged
                    v = row[at[col]]
                    if col in FILE_COLUMNS and isinstance(v, str) and v:
                        q = Path(v)
                        v = f"{q.name}:{_size(q)}"
                    h.update(f"{col}={v}\n".encode())
            self._digests[split] = h.hexdigest()[:16]
        return self._digests[split]

    def files(self) -> list[tuple[int, str]]:
        """(row, file) for every file the manifest names: images and their masks / extra channels."""
        cols = ["path"] + [c for c in FILE_COLUMNS if c in self.manifest.columns]
        return [(i, v) for i, row in self.manifest[cols].iterrows() for v in row if isinstance(v, str) and v]

    def drop_rows(self, rows: list[int]) -> None:
        self.manifest = self.manifest.drop(index=rows).reset_index(drop=True)
        self._digests.clear()


def _size(p: Path) -> str | int:
    """A file's size; for a folder (a DICOM series) its file count and total size; -1 when missing."""
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file()]
        return f"{len(files)}files:{sum(f.stat().st_size for f in files)}"
    return p.stat().st_size if p.exists() else -1


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class PublishedSize:
    """A dataset's size as published, in the units a backbone reads: what the plan counts without data.

    ``units`` images, volumes, slides or blocks (as the adapter's manifest lists them); ``per_unit`` the
    backbone inputs of one: typical slices of a volume along the slice axis, sections of a block, tissue
    tiles of a slide at ``mpp`` microns per pixel and ``tile`` px; ``pixels`` the typical in-plane size of
    an input (label maps, volumes read by a loader). Typical counts are approximations with their
    ``source``; the plan says so wherever it shows them."""

    units: int
    unit: str = "image"  # image | volume | slide | block
    per_unit: float = 1.0
    pixels: tuple[int, int] = (0, 0)
    mpp: float | None = None  # slides: magnification per_unit counts tiles at (0.5 = 20x)
    tile: int | None = None  # slides: tile side in pixels
    source: str = ""

    @property
    def volumetric(self) -> bool:
        return self.unit in ("volume", "block")

    @property
    def bagged(self) -> bool:
        return self.unit == "slide"

    def inputs_per_unit(self, mpp: float | None = None) -> float:
        """Backbone inputs of one unit; slides scale with the area at the asked magnification."""
        if self.bagged and mpp and self.mpp:
            return self.per_unit * (self.mpp / mpp) ** 2
        return self.per_unit

    def describe(self, mpp: float | None = None) -> str:
        n = self.inputs_per_unit(mpp)
        what = {"volume": "slices", "block": "sections", "slide": "tiles", "image": "image"}[self.unit]
        if self.unit == "image":
            return f"{self.units:,} images"
        at = f" at {mpp or self.mpp:g} um/px, {self.tile} px" if self.bagged else ""
        return f"{self.units:,} {self.unit}s x ~{n:,.0f} {what}{at}"


@dataclass(frozen=True)
class DatasetDef:
    name: str
    prepare: Callable[..., PreparedDataset]
    phantom: bool = False  # generated on the fly (no data root)
    task: str = "multilabel"  # what a trial does with it ('auto' when only the data tells, e.g. 'manifest')
    # the dataset's size as published, for cost estimates without data; by subset where it has parts
    published: PublishedSize | dict[str, PublishedSize] | None = None

    def published_size(self, subset: str | None = None) -> PublishedSize | None:
        if isinstance(self.published, dict):
            return self.published.get(subset or "")
        return self.published

    @property
    def published_images(self) -> int | None:
        size = self.published_size()
        return size.units if size is not None else None

    replicates: str = "resplit"  # how replicates vary its split (PreparedDataset.replicates), known before preparing
    # its colour model (grey | rgb), known before preparing: a value, or a function of dataset.subset
    # (MedMNIST+: by subset); the prepared dataset may say otherwise from its files (PreparedDataset.color)
    color: str | Callable[[str | None], str] = "grey"
    # a split the protocol fixes (AC3/AC4: which sections train, validate and test), in words; '' where the spec's
    # dataset.split draws it
    split_rule: str = ""

    def declared_color(self, subset: str | None = None) -> str:
        return self.color(subset) if callable(self.color) else self.color


_REGISTRY: dict[str, DatasetDef] = {}
_LOADED = False


def register_dataset(
    name: str,
    phantom: bool = False,
    published_images: int | None = None,
    task: str = "multilabel",
    published: PublishedSize | dict[str, PublishedSize] | None = None,
    replicates: str = "resplit",
    color: str | Callable[[str | None], str] = "grey",
    split_rule: str = "",
):
    """Decorate an adapter ``fn(spec: DatasetSpec, storage: Path) -> PreparedDataset``. ``published``: its
    published size (``published_images``: the same for a set of 2D images); ``replicates``: 'fixed' where the
    protocol fixes the split (replicates then vary initialisation only); ``color``: its colour model, grey or
    rgb (or a function of ``dataset.subset``), what ``dataset.color: auto`` resolves to; ``split_rule``: a split the
    protocol fixes, in words (the protocol table states it instead of dataset.split)."""
    if published is None and published_images is not None:
        published = PublishedSize(published_images)

    def deco(fn: Callable[..., PreparedDataset]):
        _REGISTRY[name] = DatasetDef(name, fn, phantom, task, published, replicates, color, split_rule)
        return fn

    return deco


def load_adapters() -> None:
    """Import every module of ``dinoscale.data`` once (their ``@register_dataset`` fill the registry)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("dinoscale.data")
    for m in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"dinoscale.data.{m.name}")


def get_dataset(name: str) -> DatasetDef:
    load_adapters()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset '{name}'; known: {', '.join(dataset_names())}")
    return _REGISTRY[name]


def dataset_names() -> list[str]:
    load_adapters()
    return sorted(_REGISTRY)
