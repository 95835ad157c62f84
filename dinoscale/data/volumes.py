"""How a dataset's volumes enter the encoder: which channels become its three inputs, and on which grid.

Two settings of the spec's dataset part, resolved against the data when it is prepared:

- **Channels** (``dataset.channels``). A volume's channels are the channels of its file (MSD BrainTumour:
  FLAIR, T1w, t1gd, T2w, named by ``dataset.json``'s ``modality``) followed by its co-registered extra
  files (AutoPET: the PET beside the CT). ``pick`` maps three of them, by name or index, to the encoder's
  R, G, B inputs (``mean``: the mean of the other picked channels); ``each`` runs every listed channel
  through the encoder as grey and averages the features (one forward pass per channel). Each channel is
  scaled to [0, 1] on its own: CT through the window (or its min-max), PET in SUV ``PET_SUV_RANGE``, MRI
  by the volume's min-max per sequence. Defaults: grey repeated (one channel); PET/CT: CT, PET, their
  mean; MSD BrainTumour: FLAIR, t1gd, T2w (see ``DEFAULT_PICKS``); other multi-channel volumes: the first
  three channels (two: both and their mean).
- **Grid** (``dataset.spacing``, ``dataset.grid``). Volumes are resampled to one voxel spacing (given, or
  ``auto``: the median of the dataset's spacings per axis, as nnU-Net does) and centre-cropped or
  zero-padded to one shape (given, or the largest resampled extent per axis: nothing is cropped), so the
  slices of every volume stack into one array for the segmentation decoders. Predictions are mapped back
  to each volume's native grid before scoring (``to_native``) and scored against the native label map
  with the native spacing, so metrics stay in millimetres on the data as published. Without a spacing,
  volumes of one shape per split keep their grid untouched (no resampling, no padding).

Both are part of the feature key (``VolumeInput.signature``): another mapping or grid is other features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinoscale.data.errors import DataError

PET_SUV_RANGE = (0.0, 10.0)  # PET in SUV mapped to [0, 1] (clipped) when fused with CT
MEAN = "mean"

# Default picks by the dataset's channel names (lower case). MSD BrainTumour: FLAIR shows the whole tumour
# with its oedema, t1gd (post-gadolinium T1) the enhancing rim and the necrotic core, T2w the tumour core
# and oedema: the three contrasts that separate BraTS' three labels (oedema, non-enhancing, enhancing);
# native T1w adds least beside t1gd. The usual choice when 2D encoders pretrained on RGB read BraTS.
DEFAULT_PICKS = {("flair", "t1w", "t1gd", "t2w"): ("FLAIR", "t1gd", "T2w")}


@dataclass(frozen=True)
class ChannelMap:
    names: tuple[str, ...]  # the volume's channels as read: its file's channels, then its extra files
    kinds: tuple[str, ...]  # intensity scaling per channel: window (CT) | suv (PET) | minmax (MRI, other)
    mode: str = "pick"  # pick | each
    pick: tuple[int, ...] = (0, 0, 0)  # pick: 3 channel indices (-1: the mean of the others); each: the channels run

    @property
    def sources(self) -> tuple[int, ...]:
        """The channels read from the volume, in order (what ``load_volume`` returns)."""
        return tuple(dict.fromkeys(i for i in self.pick if i >= 0))

    @property
    def grey(self) -> bool:
        """One channel repeated to R, G, B (the plain grey path)."""
        return self.mode == "pick" and len(self.sources) == 1 and -1 not in self.pick

    def describe(self) -> str:
        if self.mode == "each":
            return f"each of {[self.names[i] for i in self.pick]} through the encoder as grey, features averaged"
        rgb = [self.names[i] if i >= 0 else MEAN for i in self.pick]
        return f"{rgb} -> R, G, B" if not self.grey else f"{self.names[self.pick[0]]} repeated to R, G, B"

    def signature(self) -> str:
        if self.grey:
            return ""
        if self.names == ("ct", "pet") and self.mode == "pick" and self.pick == (0, 1, -1):
            return f",pet_suv={list(PET_SUV_RANGE)},channels=ct|pet|mean"  # the PET/CT key as it has always been
        picked = "|".join(self.names[i] if i >= 0 else MEAN for i in self.pick)
        return f",channels={picked}@{self.mode},scales={'|'.join(self.kinds[i] for i in self.sources)}"


@dataclass(frozen=True)
class VolumeGrid:
    spacing: tuple[float, float, float] | None  # mm, RAS axis order; None: each volume's own
    shape: tuple[int, int, int] | None  # (X, Y, Z) after resampling: centre crop / zero pad; None: as resampled

    def signature(self) -> str:
        sp = f",spacing={[round(s, 4) for s in self.spacing]}" if self.spacing else ""
        return sp + (f",grid={list(self.shape)}" if self.shape else "")

    def describe(self) -> str:
        sp = f"resampled to {[round(s, 4) for s in self.spacing]} mm" if self.spacing else "native spacing"
        shape = f"; centre-cropped / zero-padded to {list(self.shape)} voxels" if self.shape else ""
        return sp + shape + "; predictions mapped back to each volume's native grid before scoring"


@dataclass(frozen=True)
class VolumeInput:
    channels: ChannelMap
    grid: VolumeGrid | None = None

    def signature(self) -> str:
        """What the feature key adds for this mapping and grid ('' for grey volumes on their own grid)."""
        return self.channels.signature() + (self.grid.signature() if self.grid else "")

    def describe(self) -> dict[str, str]:
        out = {"channels": self.channels.describe()}
        if self.grid is not None:
            out["grid"] = self.grid.describe()
        return out


# ---------------------------------------------------------------- resolving the spec against the data


def channel_map(names: Sequence[str], setting=None, window: bool = False) -> ChannelMap:
    """The channel map of volumes with channels ``names`` under the spec's ``dataset.channels`` (None: the
    default). Errors name the setting and the channels there are."""
    names = tuple(names)
    low = [n.lower() for n in names]
    kinds = tuple("suv" if n == "pet" else "window" if (n == "ct" or len(names) == 1) else "minmax" for n in low)
    mode = getattr(setting, "mode", "pick") if setting is not None else "pick"
    wanted = getattr(setting, "pick", None) if setting is not None else None

    def index(v) -> int:
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            i = int(v)
            if not 0 <= i < len(names):
                raise DataError(f"dataset.channels.pick: channel {i} out of range; the volumes have {list(names)}")
            return i
        if str(v).lower() == MEAN and mode == "pick":
            return -1
        hits = [i for i, n in enumerate(low) if n == str(v).lower()] or [
            i for i, n in enumerate(low) if n.startswith(str(v).lower())
        ]
        if len(hits) != 1:
            raise DataError(
                f"dataset.channels.pick: no channel '{v}' in the volumes' channels {list(names)} (name or index)"
            )
        return hits[0]

    if wanted is not None:
        pick = tuple(index(v) for v in wanted)
        if mode == "pick" and len(pick) != 3:
            raise DataError(
                f"dataset.channels.pick: {list(wanted)} names {len(pick)} channels; 'pick' takes 3 (R, G, B)"
            )
    elif mode == "each":
        pick = tuple(range(len(names)))
    elif tuple(low) in DEFAULT_PICKS:
        pick = tuple(index(v) for v in DEFAULT_PICKS[tuple(low)])
    elif len(names) == 1:
        pick = (0, 0, 0)
    elif len(names) == 2:
        pick = (0, 1, -1)
    else:
        pick = (0, 1, 2)
    if mode == "pick" and pick and all(i == -1 for i in pick):
        raise DataError("dataset.channels.pick: 'mean' needs other channels to average")
    return ChannelMap(names, kinds, mode, pick)


def native_geometry(item) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A volume's (shape, spacing) in RAS axis order as ``read_volume`` reads it, from the NIfTI header alone
    (the first file of a co-registered list); other formats are read."""
    from dinoscale.data.readers import read_volume, volume_kind

    first = item if isinstance(item, str) else list(item)[0]
    if volume_kind(first) == "nifti" and str(first).lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(first))
        except Exception as e:
            raise DataError(f"{first}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
        affine = np.asarray(img.affine)
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
        shape, spacing = [1, 1, 1], [1.0, 1.0, 1.0]
        for axis, (target, _flip) in enumerate(nib.orientations.io_orientation(affine)):
            shape[int(target)] = int(img.shape[axis]) if axis < len(img.shape) else 1
            spacing[int(target)] = float(zooms[axis])
        return tuple(shape), tuple(spacing)
    vol, sp = read_volume(first)
    return tuple(int(s) for s in vol.shape[1:]), tuple(float(s) for s in sp)


def resampled_shape(shape, spacing, target) -> tuple[int, ...]:
    """The shape a volume takes at spacing ``target`` (its field of view kept): round(n * s / t) per axis."""
    if target is None:
        return tuple(int(n) for n in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resolve_grid(geometry: Sequence[tuple], splits: Sequence[str], spacing=None, shape=None) -> VolumeGrid | None:
    """The common grid of volumes with ``geometry`` ((shape, spacing) per row, rows in ``splits``):
    ``spacing`` 'auto' (median per axis), [x, y, z] mm or None (native); ``shape`` [x, y, z] or None (the
    largest resampled extent per axis). None when nothing needs doing: no spacing and every split's
    volumes already share one shape."""
    if not geometry:
        return None
    if spacing == "auto":
        spacing = tuple(float(np.median([g[1][a] for g in geometry])) for a in range(3))
    elif spacing is not None:
        spacing = tuple(float(s) for s in spacing)
    shapes = [resampled_shape(g[0], g[1], spacing) for g in geometry]
    if spacing is None and shape is None:
        per_split: dict[str, set] = {}
        for s, sh in zip(splits, shapes):
            per_split.setdefault(s, set()).add(sh)
        if all(len(v) == 1 for v in per_split.values()):
            return None
    if shape is None:
        shape = tuple(int(max(sh[a] for sh in shapes)) for a in range(3))
    return VolumeGrid(spacing, tuple(int(s) for s in shape))


# ---------------------------------------------------------------- to the grid and back


def _crop_pad(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre crop / zero pad the last three axes of ``arr`` to ``shape``."""
    out = arr
    for a, g in enumerate(shape):
        ax = arr.ndim - 3 + a
        n = out.shape[ax]
        if n > g:
            start = (n - g) // 2
            out = np.take(out, np.arange(start, start + g), axis=ax)
        elif n < g:
            pad = [(0, 0)] * out.ndim
            pad[ax] = ((g - n) // 2, g - n - (g - n) // 2)
            out = np.pad(out, pad)
    return out


def _resize(arr: np.ndarray, shape: Sequence[int], labels: bool) -> np.ndarray:
    """Resize the last three axes: trilinear for intensities, nearest for label maps."""
    import torch

    if tuple(arr.shape[-3:]) == tuple(shape):
        return arr
    x = torch.as_tensor(np.ascontiguousarray(arr))
    lead = x.shape[:-3]
    x = x.reshape(1, -1, *x.shape[-3:])
    if labels:
        y = torch.nn.functional.interpolate(x.to(torch.float32), size=tuple(shape), mode="nearest-exact")
        return y.reshape(*lead, *shape).numpy().astype(arr.dtype)
    y = torch.nn.functional.interpolate(x.to(torch.float32), size=tuple(shape), mode="trilinear", align_corners=False)
    return y.reshape(*lead, *shape).numpy()


def to_grid(arr: np.ndarray, spacing, grid: VolumeGrid | None, labels: bool = False) -> np.ndarray:
    """[..., X, Y, Z] at ``spacing`` -> [..., *grid.shape]: resampled to the grid's spacing (its field of
    view kept), then centre-cropped / zero-padded."""
    if grid is None:
        return arr
    arr = _resize(arr, resampled_shape(arr.shape[-3:], spacing, grid.spacing), labels)
    return _crop_pad(arr, grid.shape) if grid.shape else arr


def to_native(pred: np.ndarray, shape, spacing, grid: VolumeGrid | None) -> np.ndarray:
    """A label map [X, Y, Z] on the grid -> the volume's native [X, Y, Z] (``shape`` at ``spacing``): the crop /
    pad undone (cropped borders predicted background), then nearest-neighbour back to the native voxels."""
    if grid is None:
        return pred
    r = resampled_shape(shape, spacing, grid.spacing)
    out = pred
    if grid.shape:
        for a, (n, g) in enumerate(zip(r, grid.shape)):
            if n > g:  # was cropped: put the grid back in the middle of a background field
                pad = [(0, 0)] * out.ndim
                pad[a] = ((n - g) // 2, n - g - (n - g) // 2)
                out = np.pad(out, pad)
            elif n < g:  # was padded: drop the padding
                start = (g - n) // 2
                out = np.take(out, np.arange(start, start + n), axis=a)
    return _resize(out, tuple(int(s) for s in shape), labels=True)


def native_predictions(pred, masks: Sequence[str], native: Sequence[tuple], grid: VolumeGrid):
    """Grid predictions (n, S, H, W) (label-map order: slices first) -> lists of native predictions and native
    label maps (each (Z, X, Y)), and their spacings in that order: what scoring in mm on the native grid needs."""
    preds, targets, spacings = [], [], []
    for i, (m, (shape, spacing)) in enumerate(zip(masks, native)):
        p = np.moveaxis(np.asarray(pred[i]), 0, -1)  # (X, Y, Z)
        preds.append(np.moveaxis(to_native(p, shape, spacing, grid), -1, 0))
        targets.append(np.moveaxis(read_label_volume(m), -1, 0))
        x, y, z = spacing
        spacings.append((float(z), float(x), float(y)))  # label-map order (dinoscale.data.masks.label_map_spacing)
    return preds, targets, spacings


def native_pairs(pred, masks: Sequence[str], native: Sequence[tuple], grid: VolumeGrid):
    """Registration on a common grid: units in pairs (fixed, moving), ``pred`` one warped moving label map per pair
    (on the grid). Each mapped back to its fixed volume's native grid (a pair's frames share one acquisition), the
    native label maps of both units in unit order, and the spacings per unit (what scoring in mm needs)."""
    preds, fixed, spacings = native_predictions(pred, masks[0::2], native[0::2], grid)
    targets = []
    for f, m in zip(fixed, masks[1::2]):
        moving = np.moveaxis(read_label_volume(m), -1, 0)
        if moving.shape != f.shape:
            raise DataError(
                f"{m}: shape {moving.shape} differs from its pair's fixed volume {f.shape} (one acquisition)"
            )
        targets += [f, moving]
    return preds, targets, [sp for sp in spacings for _ in (0, 1)]


def read_label_volume(path: str) -> np.ndarray:
    """A label volume [X, Y, Z] (RAS, native grid, integer values) through the one volume reader."""
    from dinoscale.data.readers import read_volume

    arr = read_volume(path, mode="nearest", dtype=None)[0]
    if arr.shape[0] != 1:
        raise DataError(f"{path}: a label map with {arr.shape[0]} channels; expected one")
    return np.asarray(arr[0]).astype(np.int64)
