"""Label maps for segmentation trials, read by the same readers as their images.

Volumes go through ``dinoscale.data.readers.read_volume`` like the images they label (reoriented to
RAS, nearest-neighbour where anything is resampled), so voxel (i, j, k) of a mask is voxel (i, j, k)
of its image by construction; slice k along the last axis is feature row ``<volume>#<k>``. 2D masks
are read by the raster / DICOM reader of 2D images, in the same [rows, cols] order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinoscale.data.dataset import DataError
from dinoscale.data.volumes import to_grid


def _read_mask(
    path: str, volume: bool, grid=None, n_classes: int | None = None, multilabel: bool = False
) -> np.ndarray:
    from dinoscale.data.readers import _read, file_kind, read_volume

    if volume:
        arr, spacing = read_volume(path, mode="nearest", dtype=None)
        if arr.shape[0] != 1:
            raise DataError(f"{path}: a label map with {arr.shape[0]} channels; expected one")
        arr = np.asarray(arr[0])
        if grid is not None:  # labels checked on the native map: resampling may drop a lone voxel
            _check_labels(path, arr.astype(np.int64), n_classes, multilabel)
            arr = to_grid(arr, spacing, grid, labels=True)
    else:
        arr = np.asarray(_read(file_kind(path), path))
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):  # single-channel or colour-coded PNG: first channel
            arr = arr[..., 0]
    if np.any(arr != np.round(arr)):
        raise DataError(f"{path}: a label map holds integers; found fractional values")
    return arr.astype(np.int64)


def load_label_maps(
    mask_paths: Sequence[str] | None,
    n_slices: Sequence[int] | None,
    n_classes: int | None = None,
    grid=None,
    multilabel: bool = False,
) -> np.ndarray:
    """(n, H, W) for 2D images, (n, S, H, W) for volumes (slices along the file's last axis).

    ``grid``: volumes on a common grid (``dinoscale.data.volumes.VolumeGrid``): each label volume resampled
    (nearest) and centre-cropped / zero-padded like its image; ``n_slices`` are then the grid's.

    ``n_classes``: semantic labels must lie in [0, n_classes); None: instance ids (any non-negative).
    ``multilabel``: bit-packed overlapping structures (``dinoscale.metrics.pack_labels``): only bits of the
    n_classes - 1 structures may be set.
    Every mask must have the same shape (they are stacked), and a volume's mask as many slices as the
    manifest says its image has."""
    if not mask_paths:
        raise DataError("this dataset lists no masks (manifest column 'mask_path'); segmentation probes need them")
    maps = []
    for i, path in enumerate(mask_paths):
        arr = _read_mask(path, volume=n_slices is not None, grid=grid, n_classes=n_classes, multilabel=multilabel)
        if n_slices is not None:
            if arr.ndim != 3 or arr.shape[-1] != int(n_slices[i]):
                raise DataError(
                    f"{path}: mask of shape {tuple(arr.shape)} does not match its image "
                    f"({int(n_slices[i])} slices along the last axis)"
                )
            arr = np.moveaxis(arr, -1, 0)  # (S, H, W)
        elif arr.ndim != 2:
            raise DataError(f"{path}: expected a 2D label map, got shape {tuple(arr.shape)}")
        _check_labels(path, arr, n_classes, multilabel)
        if maps and arr.shape != maps[0].shape:
            raise DataError(
                f"{path}: mask shape {tuple(arr.shape)} differs from {mask_paths[0]} {tuple(maps[0].shape)}; "
                "segmentation cells stack volumes, so every image / volume needs one shape"
            )
        maps.append(arr)
    return np.stack(maps)


def image_on_label_grid(item, volume: bool, grid=None) -> np.ndarray:
    """An item's image on its label map's grid, grey float32 in the file's units: a 2D image (H, W) as the
    readers give it (colour channels averaged); a volume's first channel (S, H, W), put on the common ``grid``
    like its label map (``to_grid``, linear) and slices first as ``load_label_maps`` stacks them."""
    from dinoscale.data.readers import read_image, read_volume

    if not volume:
        arr = read_image(item)
        return (arr[..., :3].mean(-1) if arr.ndim == 3 else arr).astype(np.float32)
    first = item if isinstance(item, str) else list(item)[0]
    vol, spacing = read_volume(first)
    arr = to_grid(np.asarray(vol[0], np.float32), spacing, grid) if grid is not None else np.asarray(vol[0])
    return np.moveaxis(arr, -1, 0).astype(np.float32)


def _check_labels(path: str, arr: np.ndarray, n_classes: int | None, multilabel: bool = False) -> None:
    if arr.min(initial=0) < 0:
        raise DataError(f"{path}: negative label {int(arr.min())}")
    if multilabel and n_classes is not None and arr.max(initial=0) >= 1 << (n_classes - 1):
        bits = sorted({b + 1 for v in np.unique(arr) for b in range(int(v).bit_length()) if int(v) >> b & 1})
        raise DataError(
            f"{path}: structure(s) {[b for b in bits if b >= n_classes][:10]} of a bit-packed multi-label map beyond "
            f"the probe's {n_classes - 1} structures (n_classes {n_classes} counts the background); set the "
            "probe's n_classes to the dataset's structure count + 1"
        )
    if multilabel:
        return
    if n_classes is not None and arr.max(initial=0) >= n_classes:
        bad = sorted(int(v) for v in np.unique(arr[arr >= n_classes]))
        raise DataError(
            f"{path}: label value(s) {bad[:10]} outside the probe's {n_classes} classes "
            f"(0..{n_classes - 1}); set the probe's n_classes to the dataset's label count"
        )


def label_map_spacing(spacing: Sequence[float] | None, volume: bool = True) -> tuple[float, ...] | None:
    """A volume's spacing as ``read_volume`` gives it ([x, y, z]) in the axis order of ``load_label_maps``'
    arrays (slices first: [z, x, y]); 2D label maps (and unknown spacings): None."""
    if spacing is None or not volume:
        return None
    x, y, z = (float(v) for v in spacing)
    return (z, x, y)
