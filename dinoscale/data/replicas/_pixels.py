"""Shared pieces of the replica writers: plausible grey images with a finding, broken files.

The pixels carry a weak, label-dependent bright blob on a smooth background with noise, so that a probe
has something to find; the numbers of a rehearsal still mean nothing (random weights, a few images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def grey_image(rng: np.random.Generator, size: int, positive: bool = False, bits: int = 8) -> np.ndarray:
    """A [size, size] radiograph-like image (uint8, or uint16 for ``bits=16``): a vertical gradient, two
    darker 'lungs', noise, and a bright blob when ``positive``."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.35 + 0.3 * yy
    for cx in (0.32, 0.68):
        img -= 0.2 * np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    if positive:
        cx, cy = rng.uniform(0.25, 0.75, 2)
        img += 0.35 * np.exp(-(((xx - cx) / 0.06) ** 2 + ((yy - cy) / 0.06) ** 2))
    img += rng.normal(0, 0.04, img.shape)
    top = 2**bits - 1
    return (np.clip(img, 0, 1) * top).astype(np.uint16 if bits > 8 else np.uint8)


def truncate(path: Path, keep: float = 0.4) -> str:
    """Cut a file to ``keep`` of its bytes (a download that stopped half-way); returns its path as text."""
    data = path.read_bytes()
    path.write_bytes(data[: max(16, int(len(data) * keep))])
    return str(path)
