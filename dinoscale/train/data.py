"""One split's units as (input, target) samples for training the encoder, read lazily per item.

Inputs go through the extraction's own preprocessing (``dinoscale.data.preprocess``): a 2D image
becomes (3, r, r); a volume is read once by ``read_volume`` (RAS, the CT window or its min-max), cut
into its slices along the last axis as extraction does, each slice resized and normalised -> (S, 3, r, r).
Targets: the unit's label vector, or its label map read by ``dinoscale.data.masks`` ((H, W), or
(S, H, W) for volumes: slice k of the map is slice k of the volume). Volumes of different depths
are batched as lists (``collate_units``).
"""

from __future__ import annotations

import numpy as np
import torch

from dinoscale.data import SplitUnits
from dinoscale.data.masks import load_label_maps
from dinoscale.data.preprocess import build_transform, build_volume_transform
from dinoscale.features.recipe import FeatureRecipe


def collate_units(batch):
    """Targets stacked; inputs stacked when they share a shape, else kept as a list (volumes of different
    depths: ``VolumeClassifier`` runs all their slices through the encoder as one batch)."""
    xs, ys = zip(*batch)
    x = torch.stack(xs) if len({tuple(t.shape) for t in xs}) == 1 else list(xs)
    return x, torch.stack([torch.as_tensor(y) for y in ys])


class UnitSamples(torch.utils.data.Dataset):
    def __init__(self, units: SplitUnits, read_input, read_target):
        self.units, self.read_input, self.read_target = units, read_input, read_target

    def __len__(self) -> int:
        return len(self.units.sample_ids)

    def __getitem__(self, i: int):
        return self.read_input(i), self.read_target(i)


def unit_samples(units: SplitUnits, recipe: FeatureRecipe, n_classes: int | None = None) -> UnitSamples:
    """Inputs under ``recipe`` (the cell's, ``dinoscale.features.recipe``: colour model, intensity mapping,
    resize, the encoder's mean / std, the volumes' channel map and grid), as extraction reads them.
    ``n_classes``: segmentation (targets are label maps with values in [0, n_classes)); None: classification."""
    volumetric = units.n_slices is not None
    if volumetric:
        load_volume, slice_transform = build_volume_transform(recipe)

        def read_input(i: int) -> torch.Tensor:
            vol = load_volume(units.items[i])
            return torch.stack([slice_transform(vol.select(-1, k)) for k in range(vol.shape[-1])])
    else:
        transform = build_transform(recipe)

        def read_input(i: int) -> torch.Tensor:
            return transform(units.items[i])

    if n_classes is None:

        def read_target(i: int) -> torch.Tensor:
            return torch.as_tensor(np.asarray(units.labels[i]), dtype=torch.float32)
    else:

        def read_target(i: int) -> torch.Tensor:
            n = [units.n_slices[i]] if volumetric else None
            grid = units.volume.grid if (volumetric and units.volume is not None) else None
            return torch.as_tensor(load_label_maps([units.masks[i]], n, n_classes, grid)[0], dtype=torch.long)

    return UnitSamples(units, read_input, read_target)
