"""Up-front file checks for the skip policy (``on_bad_file: skip``): nothing is dropped silently."""

from __future__ import annotations

from pathlib import Path

from dinoscale.data.dataset import PreparedDataset


def unreadable_reason(path: str | Path) -> str | None:
    """Why a file cannot be used, or None. Reads headers only (cheap), through the format's library."""
    from dinoscale.data.readers import file_kind

    p = Path(path)
    if not p.is_file():
        return "missing"
    if p.stat().st_size == 0:
        return "empty file"
    kind = file_kind(p)
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(p))
            img.dataobj[(0,) * len(img.shape)]  # touches the data stream: a truncated .gz fails here
        elif kind == "dicom":
            import pydicom

            pydicom.dcmread(str(p), stop_before_pixels=True)
        elif kind == "raster":
            from PIL import Image

            with Image.open(p) as im:
                im.verify()
        elif kind == "hdf5":
            import h5py

            with h5py.File(p, "r"):
                pass
        else:
            return f"unknown file type '{p.suffix}'"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


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
    ds.provenance["data.skipped"] = str(len(ds.skipped))
