"""Image preprocessing through MONAI readers and transforms (imported lazily: MONAI takes ~10 s).

Every step is a field of the feature recipe (``dinoscale.features.recipe.FeatureRecipe``) and nothing else:
the file's channels under the dataset's colour model (grey replicated, RGB kept, alpha dropped) ->
intensities to [0, 1] (the recipe's mapping: the file's declared range, percentiles of the nonzero values,
own min-max or a CT window) -> resized to the recipe's resolution (anti-aliased)
-> three channels -> normalised with the encoder's mean / std.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dinoscale.data.dataset import DataError
from dinoscale.data.volumes import PET_SUV_RANGE, VolumeInput, channel_map, to_grid  # noqa: F401  (PET_SUV_RANGE re-exported)
from dinoscale.features.recipe import FeatureRecipe

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "area": "area"}


def resize_antialiased(img: torch.Tensor, resolution: int, interpolation: str = "bicubic") -> torch.Tensor:
    """[C, H, W] -> [C, resolution, resolution], anti-aliased when downsampling.

    torch's separable anti-aliasing filter: about 6x faster than MONAI ``Resize(anti_aliasing=True)``
    (Gaussian pre-smoothing) on 1024 px radiographs (16 ms vs 103 ms per image on one CPU core), which
    decides whether CPU loader workers can keep a GPU busy.
    """
    x = torch.as_tensor(img, dtype=torch.float32)[None]
    if interpolation == "area":
        return torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="area")[0]
    return torch.nn.functional.interpolate(
        x, size=(resolution, resolution), mode=_MODES[interpolation], antialias=True, align_corners=False
    )[0]


def to_channels(img: np.ndarray, color: str) -> np.ndarray:
    """A 2D image as read ([rows, cols] or [rows, cols, C]) -> channels first under the recipe's colour model:
    'grey': [1, rows, cols] (a colour file averaged over R, G, B, as always); 'rgb': [3, rows, cols] for a
    colour file (alpha dropped), [1, rows, cols] for a grey one (replicated after resizing)."""
    if img.ndim == 2:
        return img[None]
    if img.shape[-1] == 2:  # grey + alpha
        return img[None, ..., 0]
    if color == "grey":
        return img[..., :3].mean(-1)[None]
    return np.ascontiguousarray(np.moveaxis(img[..., :3], -1, 0))


def build_transform(recipe: FeatureRecipe):
    """path -> [3, resolution, resolution] tensor under ``recipe`` (``dinoscale.features.recipe``). Any 2D file
    MONAI reads (PNG, TIFF, JPEG, DICOM with rescale slope/intercept and MONOCHROME1 inverted) via
    ``dinoscale.data.readers.read_image``; its channels under the recipe's colour model (``to_channels``);
    intensities to [0, 1] (``intensity``: a CT window in HU, clipped, or the image's own min-max, over all
    its channels at once so that hue is kept); resized, anti-aliased; grey replicated to three channels;
    the encoder's mean / std."""
    from_decoded = decoded_image_transform(recipe)
    file_range = recipe.intensity == "range"

    def transform(path: str) -> torch.Tensor:
        return from_decoded(decode_image(path, file_range))

    return transform


@dataclass(frozen=True)
class DecodedImage:
    """One 2D file as read, before any recipe: its pixels (``read_image``) and the range its encoding declares
    (``declared_range``, read only where a recipe maps intensities by it). Fused extraction reads each file
    into one of these once and hands it to the transform of every recipe that reads the file."""

    pixels: np.ndarray
    file_range: tuple[float, float] | None = None


def decode_image(path: str, file_range: bool = False) -> DecodedImage:
    """The one decode of a 2D file (errors name the file)."""
    from dinoscale.data.readers import declared_range, read_image

    return DecodedImage(read_image(path), declared_range(path) if file_range else None)


def decoded_image_transform(recipe: FeatureRecipe):
    """``DecodedImage`` -> [3, resolution, resolution] tensor under ``recipe``: the steps of ``build_transform``
    after the read, so features computed from one shared decode are those of a read per recipe."""
    from monai.transforms import Compose, Lambda, NormalizeIntensity, RepeatChannel

    resolution, interpolation = recipe.resolution, recipe.interpolation
    scale = intensity_scaler(recipe)
    resize = Lambda(lambda x: resize_antialiased(x, resolution, interpolation))
    norm = NormalizeIntensity(subtrahend=list(recipe.mean), divisor=list(recipe.std), channel_wise=True)
    grey = Compose([resize, RepeatChannel(repeats=3), norm])
    colour = Compose([resize, norm])
    file_range = recipe.intensity == "range"

    def transform(decoded: DecodedImage) -> torch.Tensor:
        img = to_channels(decoded.pixels, recipe.color)  # [1 or 3, rows, cols] float32
        img = scale(torch.as_tensor(img), decoded.file_range if file_range else None)
        x = (grey if img.shape[0] == 1 else colour)(img)
        return torch.as_tensor(x, dtype=torch.float32).as_subclass(torch.Tensor)  # plain tensor, no MetaTensor

    return transform


def intensity_scaler(recipe: FeatureRecipe):
    """``scale(x, file_range=None)``: the recipe's intensity mapping of one image or volume channel to [0, 1],
    over all its channels at once (hue kept): a CT window (HU), the file's declared range (``file_range``,
    from ``readers.declared_range``), percentiles of the nonzero values, or the array's own min-max; clipped."""
    intensity = recipe.intensity
    if intensity == "window":
        lo_hi = recipe.window
    elif intensity == "percentiles":
        q = torch.tensor([p / 100 for p in recipe.percentiles], dtype=torch.float64)

    def scale(x: torch.Tensor, file_range: tuple[float, float] | None = None) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        if intensity == "window":
            lo, hi = lo_hi
        elif intensity == "range":
            lo, hi = file_range
        elif intensity == "percentiles":
            nonzero = x[x != 0].to(torch.float64)
            if nonzero.numel() == 0:
                return torch.zeros_like(x)
            if nonzero.numel() > 2**24 - 1:  # torch.quantile's limit: an even subsample of the voxels
                nonzero = nonzero[:: nonzero.numel() // (2**24 - 1) + 1]
            lo, hi = (float(v) for v in torch.quantile(nonzero, q))
        else:
            lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            return torch.zeros_like(x)  # a constant image: zero, as MONAI's ScaleIntensity makes it
        return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)

    return scale


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.paths[i])


# ---------------------------------------------------------------- 3D volumes, slice by slice


def fusion_signature(channels: tuple[str, ...]) -> str:
    """What fusing a dataset's extra channels into the encoder's input does, for the feature key ('' for none):
    the default channel map of a volume with those extra channels (``dinoscale.data.volumes``)."""
    if not channels:
        return ""
    own = ("ct",) if "pet" in channels else ("image",)
    return channel_map(own + tuple(channels)).signature()


def build_volume_transform(recipe: FeatureRecipe, fuse_pet: bool = False):
    """(load_volume, slice_transform) for slice-wise extraction of 3D volumes (NIfTI, DICOM series, ...).

    ``load_volume(item)`` reads through ``dinoscale.data.readers.read_volume`` (reoriented to RAS, the one
    volume reader of extraction, label maps and tests), maps each channel's intensities to [0, 1] once per
    volume (a CT ``window`` in HU if given, else the volume's min-max; PET in SUV ``PET_SUV_RANGE``, clipped;
    MRI sequences by the recipe's mapping: percentiles of the nonzero voxels by default), so that every slice of a volume shares one intensity scale, and
    puts the volume on the common grid of ``volume`` (resampled, centre-cropped / zero-padded) if it has
    one. ``slice_transform(slice)`` resizes one slice and makes the encoder's three channels under the
    channel map: grey repeated; three picked channels (a 'mean' entry: the mean of the other picked ones);
    or, in 'each' mode, [C, 3, r, r]: every channel as grey, for features averaged over channels.

    Everything comes from ``recipe`` (``dinoscale.features.recipe``): its resolution, interpolation, intensity
    mapping (window), mean / std, and ``volume``: the dataset's channel map and grid
    (``dinoscale.data.volumes.VolumeInput``); None: grey on the volume's own grid, or with ``fuse_pet`` (rows
    that carry a PET beside each CT) the PET/CT default (``load_volume((ct_path, pet_path))``: CT
    windowed, PET in SUV, and their mean, so one forward pass sees both modalities).
    """
    from monai.transforms import (
        EnsureChannelFirst,
        NormalizeIntensity,
        RepeatChannel,
        Resize,
        ScaleIntensity,
        ScaleIntensityRange,
    )

    resolution, interpolation, volume = recipe.resolution, recipe.interpolation, recipe.volume
    if volume is None:
        volume = VolumeInput(channel_map(("ct", "pet") if fuse_pet else ("image",)))
    cmap, grid = volume.channels, volume.grid
    minmax = ScaleIntensity(minv=0.0, maxv=1.0)
    own = minmax if recipe.intensity == "minmax" else intensity_scaler(recipe)  # the window, or percentiles
    scalers = {
        "window": own,  # a CT channel or a volume's one channel: the recipe's mapping
        "suv": ScaleIntensityRange(a_min=PET_SUV_RANGE[0], a_max=PET_SUV_RANGE[1], b_min=0.0, b_max=1.0, clip=True),
        "minmax": minmax if recipe.intensity == "window" else own,  # MRI sequences: never a CT window
    }
    resize = Resize(spatial_size=(resolution, resolution), mode=_MODES[interpolation], anti_aliasing=True)
    to3 = RepeatChannel(repeats=3)
    norm = NormalizeIntensity(subtrahend=list(recipe.mean), divisor=list(recipe.std), channel_wise=True)
    to_channel_first = EnsureChannelFirst(channel_dim="no_channel")
    sources = cmap.sources
    local = [sources.index(i) if i >= 0 else -1 for i in cmap.pick]  # pick entries as positions in `sources`

    load_volume = _volume_loader(cmap, grid, scalers)

    def slice_transform(img2d: torch.Tensor) -> torch.Tensor:
        if img2d.ndim == 2:  # grey
            return _plain(norm(to3(resize(to_channel_first(img2d)))))
        x = resize(img2d)  # [K, r, r]
        if cmap.mode == "each":
            return torch.stack([_plain(norm(to3(x[k : k + 1]))) for k in range(x.shape[0])])
        if local == [0, 1, -1] and x.shape[0] == 2:  # two channels and their mean (PET/CT)
            return _plain(norm(torch.cat([x, x.mean(0, keepdim=True)])))
        others = x.mean(0) if -1 in local else None
        return _plain(norm(torch.stack([x[j] if j >= 0 else others for j in local])))

    return load_volume, slice_transform


def decode_volume(item) -> list[tuple[np.ndarray, tuple]]:
    """The one decode of a volume row: each of its co-registered files (a PET beside its CT) read through
    ``read_volume`` as (array [C, X, Y, Z] RAS, spacing). Fused extraction reads each file once per pass and
    hands the parts to every recipe's ``prepare_volume``."""
    from dinoscale.data.readers import read_volume

    return [read_volume(f) for f in volume_files(item)]


def volume_files(item) -> list[str]:
    return [item] if isinstance(item, str) else list(item)


def _volume_loader(cmap, grid, scalers: dict):
    """``load_volume(item)``: co-registered files read and stacked as channels, each channel scaled by its kind's
    scaler, the volume put on the common ``grid`` (see ``build_volume_transform``); ``load_volume.prepare(item,
    parts)``: the same from files already decoded (``decode_volume``)."""
    sources = cmap.sources

    def prepare(item, parts: list[tuple[np.ndarray, tuple]]) -> torch.Tensor:
        files = volume_files(item)
        spacing = parts[0][1]
        for f, (v, _) in zip(files[1:], parts[1:]):
            if v.shape[1:] != parts[0][0].shape[1:]:
                what = [n.upper() if n in ("ct", "pet") else n for n in cmap.names]
                raise DataError(
                    f"{f}: {what[-1]} shape {tuple(v.shape[1:])} differs from its {what[0]} {files[0]} "
                    f"{tuple(parts[0][0].shape[1:])}"
                )
        vol = np.concatenate([v for v, _ in parts]) if len(parts) > 1 else parts[0][0]
        if vol.shape[0] != len(cmap.names):
            raise DataError(
                f"{item}: a volume with {vol.shape[0]} channel(s); the dataset's volumes have {len(cmap.names)} "
                f"({', '.join(cmap.names)})"
            )
        chans = [_plain(scalers[cmap.kinds[i]](_plain(torch.as_tensor(vol[i])))) for i in sources]
        out = torch.stack(chans) if len(chans) > 1 else chans[0][None]
        if grid is not None:
            out = torch.as_tensor(to_grid(out.numpy(), spacing, grid))
        return out[0] if cmap.grey else out  # grey: [X, Y, Z]; else [K, X, Y, Z] (RAS)

    def load_volume(item) -> torch.Tensor:
        return prepare(item, decode_volume(item))

    load_volume.prepare = prepare
    return load_volume


def _plain(x) -> torch.Tensor:
    """A plain float32 tensor (MONAI's MetaTensor carries metadata that slows collation)."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(torch.float32)
