"""MIND-SSC (Heinrich et al., MICCAI 2013): the self-similarity context descriptor ConvexAdam registers by.

convexAdam 0.2.0 builds its features with ``MINDSSC(img, radius=1, dilation=2)`` (3D, 12 channels). The same
descriptor here, written for 2D and 3D images:

1. the six-neighbourhood of a voxel (two along each axis) at distance ``dilation``; every pair of neighbours on
   two different axes (12 pairs in 3D, 4 in 2D: the pairs sqrt(2) apart, as the package selects them);
2. per pair, the squared difference of the image at the two neighbours, box-filtered over a
   ``2 radius + 1``-wide patch (replicate padding, as the package pads);
3. each voxel's distances minus their minimum, divided by their mean (the local variance, clamped to
   [0.001, 1000] x its image-wide mean), then exp(-.): values in (0, 1].

The package's channel permutation (an ordering kept for its C++ code) is not kept: the SSD the optimiser
computes over the channels does not depend on their order.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

RADIUS, DILATION = 1, 2  # convexAdam's convex_adam_pt defaults (mind_r, mind_d)


def _shifted(img: torch.Tensor, offset: tuple[int, ...], pad: int) -> torch.Tensor:
    """``img`` (1, 1, *S) replicate-padded by ``pad``, read at x + offset."""
    padded = F.pad(img, (pad,) * (2 * (img.ndim - 2)), mode="replicate")
    sl = tuple(slice(pad + o, pad + o + n) for o, n in zip(offset, img.shape[2:]))
    return padded[(slice(None), slice(None), *sl)]


def mind_ssc(image: torch.Tensor, radius: int = RADIUS, dilation: int = DILATION) -> torch.Tensor:
    """MIND-SSC of a 2D (H, W) or 3D (D, H, W) image: (4, H, W) or (12, D, H, W), float32."""
    img = image.float()[None, None]
    nd = image.ndim
    if nd not in (2, 3):
        raise ValueError(f"MIND-SSC reads a 2D or 3D image, got shape {tuple(image.shape)}")
    neighbours = [(a, s) for a in range(nd) for s in (-1, 1)]  # (axis, side)
    at = lambda a, s: tuple(s * dilation * (i == a) for i in range(nd))  # noqa: E731
    pairs = [(at(*p), at(*q)) for i, p in enumerate(neighbours) for q in neighbours[i + 1 :] if p[0] != q[0]]
    diffs = torch.cat([(_shifted(img, p, dilation) - _shifted(img, q, dilation)).pow(2) for p, q in pairs], dim=1)
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    ssd = pool(F.pad(diffs, (radius,) * (2 * nd), mode="replicate"), 2 * radius + 1, stride=1)
    mind = ssd - ssd.min(1, keepdim=True)[0]
    var = mind.mean(1, keepdim=True)
    level = float(var.mean())
    var = var.clamp(level * 0.001, level * 1000) if level > 0 else var.clamp_min(1e-12)
    return torch.exp(-mind / var)[0]
