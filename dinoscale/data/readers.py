"""Reading medical images through MONAI's readers (imported lazily: MONAI takes ~10 s to import).

- DICOM (PydicomReader): RescaleSlope/Intercept applied (CT in Hounsfield units), MONOCHROME1
  inverted so that dense tissue is bright, as for MONOCHROME2 and PNG radiographs.
- Volumes (``read_volume``: NIfTI through NibabelReader, DICOM series folders through PydicomReader,
  HDF5 blocks): reoriented to RAS with MONAI's ``Orientation``, optional resampling to a voxel
  spacing, the spacing returned with the array; layout [C, X, Y, Z] (axial slice k is ``vol[..., k]``).
- PNG / JPEG / TIFF (PILReader): [rows, cols] for grey files, [rows, cols, C] for colour ones (C = 3, or 4
  with alpha, 2 for grey + alpha): the file's channels. Readers never decide colour: the feature recipe
  does (``dinoscale.features.recipe``: grey replicated, RGB kept, alpha dropped; ``data.preprocess.to_channels``).
- Items of ``.npz`` arrays (MedMNIST+, ``read_npz_ref``): one image [rows, cols] (or [rows, cols, 3]) or
  one volume, memory-mapped from the (uncompressed) archive: reading an item never loads the array.

``declared_range`` is the value range a 2D file's encoding declares (its bit depth; a DICOM's VOI window or
stored bits), read from the header: the recipe's 'range' intensity mapping.

Everything returns plain float32 numpy arrays in the file's physical units (HU for CT); windowing,
scaling to [0, 1], resizing, grey to 3 channels and the backbone's normalisation are the transforms
of ``dinoscale.data.preprocess`` (the one path extraction and fine-tuning take).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from dinoscale.data.errors import DataError
from dinoscale.data.refs import REF_SEP, is_hdf5_ref, is_npz_ref, parse_npz_ref

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def file_kind(path: str | Path) -> str:
    if is_npz_ref(path):
        return "npz_item"
    name = str(path).lower()
    if name.endswith(".dcm") or name.endswith(".dicom"):
        return "dicom"
    if name.endswith(_VOLUME_SUFFIXES):
        return "nifti"
    if name.endswith(_RASTER_SUFFIXES):
        return "raster"
    if name.endswith((".h5", ".hdf", ".hdf5")):
        return "hdf5"
    if name.endswith(".npz"):
        return "npz"
    return "dicom" if _has_dicom_preamble(path) else "unknown"


def _has_dicom_preamble(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


# Each kind is read by one MONAI reader, named in errors with the format it reads.
_READERS = {
    "dicom": "the DICOM reader (MONAI PydicomReader)",
    "dicom_series": "the DICOM series reader (MONAI PydicomReader)",
    "nifti": "the NIfTI reader (MONAI NibabelReader)",
    "raster": "the PNG/JPEG/TIFF reader (MONAI PILReader)",
}
BAD_FILE_HINT = "replace or remove the file (or set dataset.on_bad_file: skip to drop unreadable files, recorded)"


@cache
def _loader(kind: str):
    """(LoadImage, its reader) for a kind of file. The reader is passed at call time so that MONAI uses it
    alone: a LoadImage built with a reader falls back to every other registered reader when it fails, and
    then reports the last fallback's complaint (a truncated PNG ended as pydicom's 'DICM prefix missing')."""
    from monai.data import NibabelReader, PILReader, PydicomReader
    from monai.transforms import LoadImage

    if kind == "dicom":
        # swap_ij=False keeps [rows, cols] (display order) for a single 2D file
        reader, first = PydicomReader(swap_ij=False, prune_metadata=False), False
    elif kind == "nifti":
        reader, first = NibabelReader(), True
    elif kind == "dicom_series":  # a folder: slices sorted by position, rescale slope/intercept applied
        reader, first = PydicomReader(), True
    else:
        reader, first = PILReader(reverse_indexing=False), False
    return LoadImage(image_only=True, reader=reader, ensure_channel_first=first), reader


def _cause(e: BaseException) -> str:
    """The exception's type and the first line of its message (MONAI and pydicom add paragraphs of advice)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0][:400] if lines else '(no message)'}"


def _read(kind: str, path):
    load, reader = _loader(kind)
    try:
        return load(str(path), reader=reader)
    except DataError:
        raise
    except Exception as e:  # name the file, the reader and the real cause
        raise DataError(f"{path}: {_READERS.get(kind, kind)} failed: {_cause(e)}; {BAD_FILE_HINT}") from e


def read_dicom(path: str | Path) -> np.ndarray:
    """One DICOM file -> float32 [rows, cols] in modality units (HU for CT), MONOCHROME1 inverted."""
    img = _read("dicom", path)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    photometric = (
        str(img.meta.get("00280004", {}).get("Value", [""])[0]) if isinstance(img.meta.get("00280004"), dict) else ""
    )
    if photometric == "MONOCHROME1":  # low values are bright: flip within the image's own range
        arr = arr.max() + arr.min() - arr
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """A 2D image of any supported kind -> float32 [rows, cols] (grey) or [rows, cols, C] (the file's colour
    channels, alpha included: the recipe decides what reaches the encoder)."""
    kind = file_kind(path)
    if kind == "dicom":
        arr = read_dicom(path)
    elif kind == "raster":
        arr = np.asarray(_read("raster", path), dtype=np.float32)
    elif kind == "npz_item":
        arr = read_npz_ref(str(path)).astype(np.float32)  # MedMNIST+ colour sets: [H, W, 3]
    else:
        what = "no reader for this file type" if kind == "unknown" else f"a {kind} file is a volume, not a 2D image"
        raise DataError(f"{path}: {what} (2D images: {', '.join(_RASTER_SUFFIXES)}, .dcm)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (2, 3, 4))):
        raise DataError(
            f"{path}: expected a 2D image (grey, or 3 / 4 colour channels last), got shape {tuple(arr.shape)}"
        )
    return arr


def read_volume(
    item: str | Path | Sequence[str | Path],
    orientation: str | None = "RAS",
    spacing: Sequence[float] | None = None,
    mode: str = "bilinear",
    dtype=np.float32,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """The one volume reader: extraction, label maps and tests all read volumes through it.

    ``item``: a NIfTI / MetaImage / NRRD file, a DICOM series folder, an HDF5 block
    (``file::dataset::z0:z1``, see ``hdf5_ref``), or a list of co-registered files stacked as channels.
    Returns ([C, X, Y, Z] float32 in the file's units, voxel spacing in mm): C is 1 for a grey volume, the
    file's channels for a multi-channel file stored channels last ((x, y, z, C), e.g. MSD BrainTumour's four
    MRI sequences, or NIfTI's vector form (x, y, z, 1, C)), and the files' channels stacked for a list. Files are reoriented to
    ``orientation`` (RAS: axial slice k is ``vol[..., k]``, whatever order the file stores its axes in;
    None keeps the file's) and resampled to ``spacing`` in mm if given (``mode`` 'nearest' for label
    maps). HDF5 blocks carry no orientation: sections are the last axis; spacing from the dataset's
    ``resolution`` attribute (CREMI: [z, y, x] in nm, returned [x, y, z]), else (1, 1, 1).
    ``dtype``: of the returned array (None keeps an HDF5 block's own, e.g. uint64 neuron ids).
    """
    from monai.transforms import Orientation, Spacing

    if is_hdf5_ref(item):
        arr = read_hdf5_ref(str(item))[None]
        return (arr if dtype is None else arr.astype(dtype)), hdf5_spacing(str(item)) or (1.0, 1.0, 1.0)
    if is_npz_ref(item):  # MedMNIST+ 3D: an item [x, y, z] of a .npz array, no spacing recorded
        arr = np.asarray(read_npz_ref(str(item)))[None]
        if arr.ndim != 4:
            raise DataError(f"{item}: expected a 3D volume, got shape {tuple(arr.shape[1:])}")
        return (arr if dtype is None else arr.astype(dtype)), (1.0, 1.0, 1.0)
    paths = [item] if isinstance(item, (str, Path)) else list(item)
    chans = []
    for p in paths:
        img = _read(volume_kind(p), p)
        if img.ndim == 5 and img.shape[-1] == 1:  # [1, X, Y, Z, 1]
            img = img[..., 0]
        if img.ndim == 3:  # a 2D NIfTI: add a singleton Z
            img = img[..., None]
        if img.ndim != 4:
            raise DataError(f"{p}: expected a 3D volume, got shape {tuple(img.shape[1:])}")
        if orientation:
            img = Orientation(axcodes=orientation)(img)
        if spacing is not None:
            img = Spacing(pixdim=tuple(spacing), mode=mode)(img)
        chans.append(img)
    if len({tuple(c.shape[1:]) for c in chans}) > 1:
        raise DataError(f"volumes {[str(p) for p in paths]} differ in shape {[tuple(c.shape[1:]) for c in chans]}")
    vox = tuple(float(x) for x in chans[0].pixdim[:3])
    return np.concatenate([np.asarray(c, dtype=dtype or np.float32) for c in chans], axis=0), vox


def volume_spacing(item: str | Path) -> tuple[float, ...] | None:
    """A volume's voxel spacing as ``read_volume`` returns it (RAS order; HDF5 blocks [x, y, z]) from its
    header alone: NIfTI through nibabel (the affine's column norms, permuted as the reorientation to RAS
    permutes the axes), HDF5 from the ``resolution`` attribute (None when the file records none), anything
    else (DICOM series, MetaImage) by reading it."""
    if is_hdf5_ref(item):
        return hdf5_spacing(str(item))
    if volume_kind(item) == "nifti" and str(item).lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            affine = nib.load(str(item)).affine
        except Exception as e:  # a header nibabel cannot parse: name the file
            raise DataError(f"{item}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
        out = [1.0, 1.0, 1.0]
        for axis, (target, _flip) in enumerate(nib.orientations.io_orientation(affine)):
            out[int(target)] = float(zooms[axis])
        return tuple(out)
    return read_volume(item)[1]


def hdf5_spacing(ref: str) -> tuple[float, float, float] | None:
    """The ``resolution`` attribute ([z, y, x], CREMI: nm) of an HDF5 block's dataset as [x, y, z]; None if absent."""

    path, key, _ = ref.split(REF_SEP)
    try:
        with h5py.File(path, "r") as f:
            res = f[key].attrs.get("resolution")
    except (OSError, KeyError) as e:
        raise DataError(f"{path}: cannot read dataset '{key}' ({type(e).__name__}: {e})") from e
    if res is None or len(res) != 3:
        return None
    z, y, x = (float(v) for v in res)
    return (x, y, z)


def volume_kind(path: str | Path) -> str:
    """The reader of a volume: 'dicom_series' for a folder of DICOM files, else 'nifti' (MONAI's NibabelReader,
    which also opens .mha / .nrrd through nibabel where it can)."""
    return "dicom_series" if Path(path).is_dir() else "nifti"


# ---------------------------------------------------------------- HDF5 volumes (CREMI)


def read_hdf5_ref(ref: str) -> np.ndarray:
    """The sections [z0, z1) of an HDF5 dataset stored [z, y, x] -> an array [x, y, z] (NIfTI's layout:
    section k is ``vol[..., k]``), so images and masks read this way stay voxel-aligned."""

    path, key, zz = ref.split(REF_SEP)
    z0, z1 = (int(v) for v in zz.split(":"))
    try:
        with h5py.File(path, "r") as f:
            arr = f[key][z0:z1]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(
            f"{path}: the HDF5 reader (h5py) failed on dataset '{key}' sections {z0}-{z1}: {_cause(e)}; {BAD_FILE_HINT}"
        ) from e
    if arr.ndim != 3 or arr.shape[0] != z1 - z0:
        raise DataError(f"{path}: dataset '{key}' sections {z0}-{z1} have shape {arr.shape}; expected [z, y, x]")
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))


# ---------------------------------------------------------------- .npz arrays (MedMNIST+)


def npz_member(path: str | Path, key: str) -> np.ndarray:
    """The array ``key`` of a ``.npz`` file, memory-mapped when the archive stores it uncompressed (``np.savez``,
    as MedMNIST+ does), else loaded (``np.savez_compressed``); errors name the file and the array."""
    return _npz_member(str(path), key, Path(path).stat().st_mtime_ns)


@cache
def _npz_member(path: str, key: str, _mtime: int) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(f"{key}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with z.open(info) as f:
                    return np.lib.format.read_array(f, allow_pickle=False)
        with open(path, "rb") as f:  # the member's data starts after its local header
            f.seek(info.header_offset)
            local = f.read(30)
            start = (
                info.header_offset
                + 30
                + int.from_bytes(local[26:28], "little")
                + int.from_bytes(local[28:30], "little")
            )
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if dtype.hasobject:
            raise ValueError("object arrays are not read (no pickles)")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except KeyError:
        raise DataError(f"{path}: no array '{key}' in this .npz; {BAD_FILE_HINT}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: the .npz reader (numpy) failed on '{key}': {_cause(e)}; {BAD_FILE_HINT}") from e


def read_npz_ref(ref: str) -> np.ndarray:
    """One item of a ``.npz`` array (``dinoscale.data.refs.npz_ref``), e.g. a MedMNIST+ image [H, W] (or
    [H, W, 3]) or volume [D, H, W] as stored."""
    path, key, index = parse_npz_ref(ref)
    arr = npz_member(path, key)
    if not 0 <= index < len(arr):
        raise DataError(f"{path}: '{key}' has {len(arr)} items, index {index} is out of range")
    return np.array(arr[index])


# PIL modes with a fixed sample depth; 'I' (32-bit) and 'F' (float) state none: PNG / TIFF say their bit depth
_PIL_DEPTH = {"1": 1, "L": 8, "LA": 8, "P": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16}
_PIL_DEPTH |= {"I;16B": 16, "I;16L": 16}


def declared_range(path: str | Path) -> tuple[float, float]:
    """The value range a 2D file's encoding declares, in the units ``read_image`` returns: [0, 2^bits - 1] of
    a PNG / TIFF / JPEG / BMP (its bit depth) or of an integer ``.npz`` array; for DICOM its VOI window
    (Window Center / Width, 0028,1050 / 0028,1051: the first, linear, PS3.3 C.11.2.1.2) where stated, else
    the range of its stored bits (0028,0101; signed per 0028,0103) through Rescale Slope / Intercept. A file
    that declares none (float TIFF or arrays) is a DataError naming it and the mappings that need no range."""
    kind = file_kind(path)
    if kind == "dicom":
        return _dicom_range(path)
    depth = None
    if kind == "npz_item":
        dtype = read_npz_ref(str(path)).dtype
        depth = np.iinfo(dtype).bits if np.issubdtype(dtype, np.unsignedinteger) else None
    elif kind == "raster":
        depth = _raster_depth(path)
    if depth is None:
        raise DataError(
            f"{path}: its encoding declares no value range (floating point or 32-bit samples), which "
            "dataset.intensity 'range' needs; set dataset.intensity: percentiles or minmax"
        )
    return 0.0, float(2**depth - 1)


def _raster_depth(path) -> int | None:
    try:
        with Image.open(path) as im:
            mode, tags = im.mode, getattr(im, "tag_v2", {})
            if im.format == "PNG":
                with open(path, "rb") as f:  # IHDR: the bit depth is byte 24 of every PNG
                    return int(f.read(25)[24]) if mode not in ("1", "P") else 8
            if im.format == "TIFF" and 258 in tags:
                bits = tags[258]
                return int(bits[0] if isinstance(bits, tuple) else bits) if tags.get(339, 1) == 1 else None
            return _PIL_DEPTH.get(mode)
    except OSError as e:
        raise DataError(f"{path}: {_READERS['raster']} failed: {_cause(e)}; {BAD_FILE_HINT}") from e


def _dicom_range(path) -> tuple[float, float]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise DataError(f"{path}: {_READERS['dicom']} failed: {_cause(e)}; {BAD_FILE_HINT}") from e
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w >= 1:
            return c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], ends[1]
