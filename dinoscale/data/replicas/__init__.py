"""Replicas of real datasets in their exact published layout, written small, for rehearsals and tests.

A replica is what a user would download, shrunk: the same file names, folder structure, CSV columns,
split lists, array shapes and dtypes, spacings and header fields, with few cases and small images. A
rehearsal (``dinoscale rehearse SPEC``) writes the replica of its spec's dataset and runs the paper
spec itself against it, through the same adapter, readers, probes, metrics and analysis: what the
replica reproduces of the real layout is what the rehearsal proves.

One module per dataset family in this package registers its writers with ``@register_replica``; the
package is discovered like the adapters (every module is imported once).

A writer: ``fn(root: Path, spec: DatasetSpec, variant: str = "ok", seed: int = 0) -> Replica``. It writes
the layout under ``root`` (the folder the spec's ``dataset.root`` then points at) and says what it wrote.
``variant``: ``ok``, or a broken replica — ``corrupt_file`` (one unreadable image), ``bad_label`` (a label
outside the class list), ``mask_shape`` (a mask whose shape differs from its image; datasets with masks).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def save_nifti(path: Path, arr, affine) -> None:
    """A NIfTI file as scanners' converters write it: qform and sform set (code 1), units mm."""
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def ellipsoid(shape, centre, radii):
    """A boolean ellipsoid (a ball when the radii are equal) in an array of ``shape``."""

    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


VARIANTS = ("ok", "corrupt_file", "bad_label", "mask_shape")
BROKEN = VARIANTS[1:]


@dataclass
class Replica:
    root: Path  # what ``dataset.root`` points at
    dataset: str  # adapter name
    reproduces: list[str] = field(default_factory=list)  # what of the published layout it reproduces
    leaves_out: list[str] = field(default_factory=list)  # what it does not (sizes, content, ...)
    broken: str | None = None  # the variant's broken file or row, named
    subset: str | None = None  # the spec's dataset.subset the replica was written for


@dataclass(frozen=True)
class ReplicaDef:
    dataset: str
    write: Callable[..., Replica]
    variants: tuple[str, ...] = BROKEN  # the broken variants it can write


_REPLICAS: dict[str, ReplicaDef] = {}
_DISCOVERED = False


def register_replica(dataset: str, variants: tuple[str, ...] = BROKEN):
    """Decorate the writer of ``dataset``'s replica (``dataset``: the adapter name of ``@register_dataset``)."""

    def deco(fn):
        _REPLICAS[dataset] = ReplicaDef(dataset, fn, tuple(variants))
        return fn

    return deco


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")


def get_replica(dataset: str) -> ReplicaDef:
    _discover()
    if dataset not in _REPLICAS:
        raise KeyError(dataset)
    return _REPLICAS[dataset]


def replica_names() -> list[str]:
    _discover()
    return sorted(_REPLICAS)
