"""References to a block of sections inside an HDF5 file (CREMI), in a leaf module: the dataset writes them
and the readers open them without importing each other (``dinoscale.data.dataset`` re-exports them)."""

from __future__ import annotations

REF_SEP = "::"


def hdf5_ref(path: str, key: str, z_start: int, z_stop: int) -> str:
    """A block of sections of an HDF5 dataset as one volume: ``<file>::<dataset>::<z0>:<z1>``."""
    return f"{path}{REF_SEP}{key}{REF_SEP}{int(z_start)}:{int(z_stop)}"


def is_hdf5_ref(ref) -> bool:
    return isinstance(ref, str) and ref.count(REF_SEP) == 2
