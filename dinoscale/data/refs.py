"""References to items inside container files, in a leaf module: the dataset writes them and the readers
open them without importing each other (``dinoscale.data.dataset`` re-exports them). A block of sections
of an HDF5 dataset (CREMI): ``<file>::<dataset>::<z0>:<z1>``; one image or volume of a ``.npz`` array
(MedMNIST+): ``<file>::<array>[<index>]``."""

from __future__ import annotations

REF_SEP = "::"


def hdf5_ref(path: str, key: str, z_start: int, z_stop: int) -> str:
    """A block of sections of an HDF5 dataset as one volume: ``<file>::<dataset>::<z0>:<z1>``."""
    return f"{path}{REF_SEP}{key}{REF_SEP}{int(z_start)}:{int(z_stop)}"


def is_hdf5_ref(ref) -> bool:
    return isinstance(ref, str) and ref.count(REF_SEP) == 2


def npz_ref(path: str, key: str, index: int) -> str:
    """Item ``index`` of the array ``key`` of a ``.npz`` file (MedMNIST+: ``train_images``) as one image."""
    return f"{path}{REF_SEP}{key}[{int(index)}]"


def is_npz_ref(ref) -> bool:
    return isinstance(ref, str) and ref.count(REF_SEP) == 1 and ref.endswith("]")


def parse_npz_ref(ref: str) -> tuple[str, str, int]:
    path, rest = ref.split(REF_SEP)
    key, index = rest[:-1].split("[")
    return path, key, int(index)
