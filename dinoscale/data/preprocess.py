"""Image preprocessing through MONAI readers and transforms (imported lazily: MONAI takes ~10 s).

Grey-scale medical images -> [0, 1] -> resized to the trial resolution (anti-aliased) -> three
channels -> normalised with the backbone's mean/std.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dinoscale.data import DataError

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "area": "area"}


def build_transform(resolution: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"):
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, NormalizeIntensity, RepeatChannel, Resize, ScaleIntensity

    load = LoadImage(image_only=True, reader="PILReader", reverse_indexing=False)
    tail = Compose([
        ScaleIntensity(minv=0.0, maxv=1.0),
        Resize(spatial_size=(resolution, resolution), mode=_MODES[interpolation], anti_aliasing=True),
        RepeatChannel(repeats=3),
        NormalizeIntensity(subtrahend=list(mean), divisor=list(std), channel_wise=True),
    ])
    to_channel_first = EnsureChannelFirst(channel_dim="no_channel")

    def transform(path: str) -> torch.Tensor:
        try:
            img = load(path)
        except Exception as e:  # MONAI wraps reader errors; name the file either way
            raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        if img.ndim == 3:  # RGB(A) PNG of a grey image: average the colour channels
            img = img[..., :3].mean(-1)
        if img.ndim != 2:
            raise DataError(f"{path}: expected a 2D image, got shape {tuple(img.shape)}")
        out = tail(to_channel_first(img))
        return torch.as_tensor(out, dtype=torch.float32)

    return transform


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.paths[i])
