"""Up-front file checks: the skip policy (``on_bad_file: skip``: nothing is dropped silently) and the
pre-flight sample (a few files of each split decoded before anything expensive starts).

Files are opened with the format's own library (Pillow, pydicom, nibabel, h5py: the libraries MONAI's
readers call), not through MONAI, whose import alone takes ~9 s in the driver.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from dinoscale.data.dataset import DataError, PreparedDataset
from dinoscale.data.readers import BAD_FILE_HINT, declared_range, read_image
from dinoscale.record import DATA_SKIPPED, DATA_SKIPPED_FILES

SMALL_DATASET = 64  # 2D rows: up to this many, the pre-flight decodes every file (well under a second)
SKIPPED_NAMED = 10  # skipped files named on the run (data.skipped_files); the count names them all


def unreadable_reason(path: str | Path, decode: bool = False) -> str | None:
    """Why a file cannot be used, or None. By default reads headers only (cheap); ``decode`` reads the
    pixels too (a truncated NIfTI / DICOM passes the header check and fails here)."""
    from dinoscale.data.readers import file_kind

    p = Path(path)
    if p.is_dir():  # a DICOM series folder: its first and last files
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            return "empty folder (a DICOM series folder needs its slice files)"
        for f in dict.fromkeys([files[0], files[-1]]):
            why = _file_reason(f, "dicom", decode)
            if why:
                return f"{f.name}: {why}"
        return None
    if not p.is_file():
        return "missing"
    if p.stat().st_size == 0:
        return "empty file"
    return _file_reason(p, file_kind(p), decode)


def _file_reason(p: Path, kind: str, decode: bool) -> str | None:
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(p))
            if decode and len(img.shape) >= 3:
                np.asarray(img.dataobj[..., -1])  # the last slice: a truncated .gz fails on its way there
            else:
                img.dataobj[(0,) * len(img.shape)]  # touches the data stream: a damaged .gz header fails here
        elif kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(str(p), stop_before_pixels=not decode)
            if decode:
                ds.pixel_array  # noqa: B018 - decodes the pixels (codec, truncation)
        elif kind == "raster":
            with Image.open(p) as im:
                if decode:
                    im.load()
                else:
                    im.verify()
        elif kind == "npz":
            from dinoscale.data.readers import npz_member

            with np.load(p, allow_pickle=False) as z:
                keys = [k for k in z.files if k.endswith("_images")]
            for k in keys:
                arr = npz_member(p, k)
                if decode and len(arr):
                    np.asarray(arr[-1])  # the last item: a truncated archive fails on its way there
        elif kind == "hdf5":
            with h5py.File(p, "r") as f:
                if decode:
                    f.visititems(_touch_last_element)
        else:
            return f"unknown file type '{p.suffix}'"
    except Exception as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
    return None


def _touch_last_element(name, obj) -> None:
    if isinstance(obj, h5py.Dataset) and obj.size:
        obj[tuple(s - 1 for s in obj.shape)]


def drop_unreadable(ds: PreparedDataset) -> None:
    """Drop rows whose image (or mask / PET) is unreadable; record each in ``ds.skipped``."""
    bad: dict[int, None] = {}
    cache: dict[str, str | None] = {}
    for i, path in ds.files():
        if i in bad:
            continue
        if path not in cache:
            cache[path] = unreadable_reason(path)
        if cache[path]:
            bad[i] = None
            ds.skipped.append({"sample_id": str(ds.manifest.at[i, "sample_id"]), "path": path, "reason": cache[path]})
    if bad:
        ds.drop_rows(list(bad))
    ds.provenance[DATA_SKIPPED] = str(len(ds.skipped))
    if ds.skipped:  # which files, on the run (the first few; the count says how many)
        names = [Path(str(s.get("path", s.get("sample_id", "")))).name for s in ds.skipped]
        ds.provenance[DATA_SKIPPED_FILES] = ", ".join(names[:SKIPPED_NAMED]) + (
            f" (+{len(names) - SKIPPED_NAMED} more)" if len(names) > SKIPPED_NAMED else ""
        )


def sample_rows(ds: PreparedDataset, per_split: int) -> list[int]:
    """Up to ``per_split`` rows of each split, spread over it (first and last included), in manifest order."""
    rows: list[int] = []
    for split in ds.manifest["split"].unique():  # train, val, test (an external test set: its one split)
        idx = ds.manifest.index[ds.manifest["split"] == split]
        if len(idx) == 0:
            continue
        pick = np.unique(np.linspace(0, len(idx) - 1, min(per_split, len(idx))).round().astype(int))
        rows.extend(int(idx[k]) for k in pick)
    return sorted(rows)


def decode_sample(ds: PreparedDataset, per_split: int | None = None) -> int:
    """Pre-flight: decode the files of a sample of rows (images, or volumes with their masks / PET).

    A wrong format, a missing codec or a damaged file shows before any worker starts. Every file of a
    small 2D dataset (``SMALL_DATASET`` rows), else a sample (8 images or 2 volumes per split by default):
    one bad file among thousands is found by the reader that meets it, which names it just as clearly.
    Returns the number of files decoded; raises ``DataError`` listing the files that failed and why."""
    if per_split is None:
        per_split = 2 if ds.volumetric else 8
    small = not ds.volumetric and len(ds.manifest) <= SMALL_DATASET
    wanted = set(ds.manifest.index) if small else set(sample_rows(ds, per_split))
    files = list(dict.fromkeys(p for i, p in ds.files() if i in wanted))  # an HDF5 file holds many blocks
    problems = []
    for path in files:
        why = unreadable_reason(path, decode=True)
        if why:
            problems.append(f"  {path}: {why}")
    if len(problems) == 1:  # one line: the file, the cause, what to do
        raise DataError(f"dataset '{ds.name}': {problems[0].strip()}; {BAD_FILE_HINT}")
    if problems:
        raise DataError(
            f"dataset '{ds.name}': {len(problems)} of {len(files)} {'' if small else 'sampled '}file(s) cannot be decoded:\n"
            + "\n".join(problems[:10])
            + "\nReplace or remove them (or set dataset.on_bad_file: skip to drop unreadable files, recorded)"
        )
    return len(files)


def colour_files_under_grey(ds: PreparedDataset, per_split: int = 2) -> list[str]:
    """Pre-flight: files of a sample of each split that hold colour (channels that differ) while the dataset's
    images reach the encoder as grey (``ds.color``): the grey model would average their hue away. Empty for
    RGB datasets and volumes."""
    if ds.volumetric or ds.color != "grey":
        return []
    found = []
    for split in ("train", "val", "test"):
        items = ds.sources(split).items
        for k in sorted({0, len(items) - 1, *range(0, len(items), max(1, len(items) // per_split))})[:per_split]:
            try:
                img = read_image(items[k])
            except DataError:
                continue  # decode_sample names unreadable files
            if img.ndim == 3 and img.shape[-1] >= 3 and float(np.ptp(img[..., :3], axis=-1).max()) > 0:
                found.append(str(items[k]))
    return found


RANGE_USED_MIN = 0.05  # sampled images that span less of their declared range than this read as nearly constant


def range_barely_used(ds: PreparedDataset, per_split: int = 2) -> tuple[float, str] | None:
    """Pre-flight, for the 'range' intensity mapping: the largest share of its declared value range that a
    sampled 2D file spans (``readers.declared_range``), with the file, when every sampled file spans less than
    ``RANGE_USED_MIN`` of it (a 16-bit container holding 12-bit data, CT slices without a VOI window): the encoder
    would see nearly flat images. None when the range is used, or for volumes."""
    if ds.volumetric:
        return None
    used, where = 0.0, ""
    for split in ("train", "val", "test"):
        items = ds.sources(split).items
        for k in sorted({0, len(items) - 1})[:per_split]:
            try:
                img, (lo, hi) = read_image(items[k]), declared_range(items[k])
            except DataError:
                continue  # decode_sample names unreadable files; the extraction names a file with no range
            share = float(np.ptp(img)) / max(hi - lo, 1e-12)
            if share >= used:
                used, where = share, str(items[k])
    return (used, where) if where and used < RANGE_USED_MIN else None
