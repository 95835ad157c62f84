"""Datasets: one registry, one prepared form (a manifest of files on disk with patient-level splits).

Adding a dataset is one module in this package with a function decorated by ``@register_dataset``
(``dinoscale.data.dataset``); it returns a ``PreparedDataset`` whose manifest lists every image or
volume with its patient, split and labels, and which then describes its own shape and units.
"""

from __future__ import annotations

from pathlib import Path

from dinoscale.data.dataset import (  # noqa: F401
    EXTRA_COLUMNS,
    FILE_COLUMNS,
    SPLITS,
    DataError,
    PreparedDataset,
    PublishedSize,
    RowSources,
    SplitUnits,
    dataset_names,
    get_dataset,
    register_dataset,
    slice_row_ids,
)
from dinoscale.datasettings import DatasetSettings


def dataset_task(name: str) -> str:
    """The task a dataset serves (known before its data is prepared, for planning)."""
    return get_dataset(name).task


def dataset_replicates(name: str) -> str:
    """How replicates vary the dataset's split: 'resplit' or 'fixed' (known before its data is prepared)."""
    return get_dataset(name).replicates


def published_images(name: str) -> int | None:
    return get_dataset(name).published_images


def published_size(name: str, subset: str | None = None) -> PublishedSize | None:
    """What the dataset holds as published (units, typical slices / tiles / sections), for plans without data."""
    return get_dataset(name).published_size(subset)


def is_phantom(name: str) -> bool:
    return get_dataset(name).phantom


def prepare_dataset(spec: DatasetSettings, storage: Path) -> PreparedDataset:
    """Index (real) or generate (phantom) the dataset and assign patient-level splits."""
    from dinoscale.data.splits import check_no_leakage

    ds = get_dataset(spec.name).prepare(spec, storage)
    if getattr(spec, "on_bad_file", "error") == "skip":
        from dinoscale.data.checks import drop_unreadable

        drop_unreadable(ds)
    check_no_leakage(ds.manifest)
    for s in SPLITS:
        if not (ds.manifest["split"] == s).any():
            raise DataError(f"dataset '{spec.name}': split '{s}' is empty; more patients are needed")
    ds.resolve_volumes(spec)  # channel map and common grid of volumes (dinoscale.data.volumes)
    ds.color = resolve_color(spec, ds.color, ds.volumetric)
    return ds


def dataset_color(spec: DatasetSettings) -> str:
    """The colour model of a dataset before it is prepared: the spec's ``dataset.color``, else the adapter's."""
    return resolve_color(spec, "", False)


def resolve_color(spec: DatasetSettings, found: str, volumetric: bool) -> str:
    """The colour model 2D images reach the encoder in (grey | rgb): the spec's ``dataset.color`` unless 'auto',
    else what the adapter found in the files (``found``), else its declaration. Volumes: grey (their channel
    map says what the encoder sees)."""
    wanted = getattr(spec, "color", "auto")
    if volumetric:
        if wanted == "rgb":
            raise DataError(
                f"dataset '{spec.name}' holds volumes; dataset.color applies to 2D images "
                "(multi-channel volumes: dataset.channels)"
            )
        return "grey"
    if wanted != "auto":
        return wanted
    return found or get_dataset(spec.name).declared_color(getattr(spec, "subset", None))
