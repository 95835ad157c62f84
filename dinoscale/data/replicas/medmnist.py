"""MedMNIST+ replica (Yang et al. 2023; the + sizes of Doerrich et al. 2024): one ``.npz`` per subset.

Written under ``root``: ``<subset>.npz`` (``spec.subset``, e.g. ``pneumoniamnist_224`` or
``organmnist3d_64``; a name without a size suffix is the 28 px file), an uncompressed ``np.savez`` archive
with the real keys ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``: images uint8 (N, S, S) for 2D grey sets, (N, S, S, 3) for colour sets, (N, S, S, S) for
3D sets; labels uint8 (N, 1) (multi-class) or (N, C) (multi-label: chestmnist).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dinoscale.data.adapters import MEDMNIST_CLASSES
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import grey_image, truncate

SUBSETS = MEDMNIST_CLASSES  # subset -> (classes, multi-label, colour)
PER_CLASS = {"train": 3, "val": 1, "test": 2}  # items per class and split (2D: x4)
PER_CLASS_3D = {"train": 2, "val": 1, "test": 1}  # volumes: every slice is a forward pass


def _parse(subset: str) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z0-9]+?)(?:_(\d+))?", subset)
    if not m or m.group(1) not in SUBSETS:
        from dinoscale.data.dataset import DataError

        raise DataError(f"MedMNIST+ replica: unknown subset '{subset}'; known: {sorted(SUBSETS)} (+ _64/_128/_224)")
    return m.group(1), int(m.group(2) or 28)


@register_replica("medmnist", variants=("corrupt_file", "bad_label"))
def write_medmnist(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    subset = spec.subset or "pneumoniamnist_64"
    name, size = _parse(subset)
    n_cls, multilabel, colour = SUBSETS[name]
    volumetric = name.endswith("3d")
    arrays = {}
    for split, per in (PER_CLASS_3D if volumetric else PER_CLASS).items():
        n = per * n_cls * (1 if volumetric else 4)
        if multilabel:
            labels = (rng.random((n, n_cls)) < 0.3).astype(np.uint8)
            positive = labels.any(1)
        else:
            labels = (np.arange(n) % n_cls).astype(np.uint8)[:, None]
            positive = labels[:, 0] > 0
        if volumetric:
            images = np.stack(
                [np.stack([grey_image(rng, size, bool(p)) for _ in range(size)], axis=-1) for p in positive]
            )
        else:
            images = np.stack([grey_image(rng, size, bool(p)) for p in positive])
            if colour:  # real colour: a stain-like tint, its hue shifted in positive images (pink / purple)
                tint = np.where(positive[:, None], [[0.55, 0.35, 0.85]], [[0.95, 0.55, 0.75]])
                images = (images[..., None] * tint[:, None, None, :]).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    broken = None
    if variant == "bad_label":
        arrays["test_labels"][1, 0] = n_cls if not multilabel else 2  # outside the class list
        broken = f"{subset}.npz: test_labels[1] = {arrays['test_labels'][1, 0]}"
    path = root / f"{subset}.npz"
    np.savez(path, **arrays)
    if variant == "corrupt_file":
        broken = truncate(path, keep=0.6)
    shapes = {k: (v.shape, str(v.dtype)) for k, v in arrays.items()}
    return Replica(
        root=root,
        dataset="medmnist",
        subset=subset,
        reproduces=[
            f"{subset}.npz: uncompressed np.savez with the real keys and dtypes {shapes}",
            "the official train / val / test split of the arrays",
        ],
        leaves_out=[
            f"{sum(len(v) for k, v in arrays.items() if k.endswith('_labels'))} items (real: thousands)",
            "real images (grey blobs; the label decides the blob)",
        ],
        broken=broken,
    )
