"""Segmentation heads on frozen patch-token grids, and affinity heads for EM instances.

Heads (all map a token grid to full-resolution logits):
- ``LinearSegHead``: BatchNorm + 1x1 conv, bilinear upsampling (the DINOv2 linear protocol).
- ``ConvDecoder2d``: a light convolutional decoder (the stronger variant).
- ``ConvDecoder3d``: slice feature maps stacked into a volume, light 3D decoder.
2D heads applied to volumes (x of shape (n, S, D, h, w)) run slice by slice.

Training: a **step budget** of AdamW steps (cosine schedule), each on a batch of **random crops**:
``crop`` x ``crop`` label pixels at **native resolution** (the label map is never resized; the token
window covering them is cut from the grid) and ``crop_depth`` slices of a volume, from a random item. A dataset
with a handful of large items (CREMI: one block per sample) gets as many optimiser steps as one with
many small ones, instead of a few epochs over three items. Inference is **tiled** the same way:
overlapping token tiles (stride half a tile), logits at native resolution averaged where tiles overlap,
one item at a time, so memory is bounded by the tile, not the volume.

Semantic heads train with MONAI's DiceCELoss (softmax over classes); where the dataset's structures may overlap
(a multi-label task: bit-packed label maps, ``dinoscale.metrics.pack_labels``) a sigmoid per structure with
binary cross-entropy + soft Dice; affinity heads predict nearest-neighbour affinities
(BCE + soft Dice) that ``agglomerate_affinities`` turns into instances (seeded watershed or connected
components). The learning rate (and for affinities the threshold) is chosen on val: semantic heads by
Dice on the positive cases, affinity heads by VOI under the CREMI convention (``dinoscale.metrics``).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from dinoscale.features.rows import MappedBatches, as_batches
from dinoscale.probes.registry import ProbeDef, ProbeResult, ProbeSpecBase, SegSplit, grid_edges, register_probe


class _CropTraining(ProbeSpecBase):
    """How a dense head trains: a step budget of random native-resolution crops."""

    steps: int = Field(1000, ge=1, description="optimiser steps (AdamW, cosine schedule): the training budget")
    batch_size: int = Field(8, ge=1, description="random crops per step")
    crop: int = Field(
        256,
        ge=1,
        description="crop side in label-map pixels (native resolution; clipped to the map): each crop is the token "
        "window covering it and the label region it covers, whatever the model's input resolution",
    )
    crop_depth: int = Field(8, ge=1, description="volumes: slices per crop (clipped to the volume's depth)")
    weight_decay: float = Field(1e-4, ge=0)
    hidden_dim: int = Field(64, ge=1, description="decoder width (conv heads)")


class SegmentationProbeSpec(_CropTraining):
    """Segmentation head on frozen patch-token grids; Dice+CE, AdamW, cosine, a step budget of random crops;
    lr chosen on val by Dice."""

    kind: Literal["segmentation"] = "segmentation"
    head: Literal["linear", "conv", "conv3d"] = Field(
        "linear",
        description="linear: BatchNorm + 1x1 conv, bilinear up; conv: light 2D decoder; "
        "conv3d: slice maps stacked into a light 3D decoder",
    )
    n_classes: int = Field(
        2,
        ge=2,
        description="including background (label 0); where structures may overlap (a multi-label dataset): "
        "the structure count + 1",
    )
    learning_rates: list[float] = Field(default_factory=lambda: [1e-3], min_length=1)

    @property
    def label(self) -> str:
        return f"seg-{self.head}"


class AffinityProbeSpec(_CropTraining):
    """EM instances: nearest-neighbour affinities from a light decoder, turned into instances by a seeded
    watershed (seeds: regions whose affinities all exceed the threshold) or by connected components of the
    thresholded affinity graph; lr and threshold are chosen on val by VOI (CREMI convention)."""

    kind: Literal["affinity"] = "affinity"
    learning_rates: list[float] = Field(default_factory=lambda: [1e-3], min_length=1)
    thresholds: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9], min_length=1)
    min_size: int = Field(
        4, ge=0, description="segments (components) or seeds (watershed) smaller than this (pixels) are dropped"
    )
    agglomeration: Literal["watershed", "components"] = Field(
        "watershed",
        description="watershed: seeds grown over the boundary map (robust to leaks); components: "
        "connected components of edges above the threshold (one leak merges two objects)",
    )


class LinearSegHead(nn.Module):
    def __init__(self, dim: int, n_out: int, hidden: int = 0):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, n_out, 1)

    def forward(self, x: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
        return F.interpolate(self.conv(self.bn(x)), size=out_size, mode="bilinear", align_corners=False)


def _block(conv, bn, cin, cout, k):
    return nn.Sequential(conv(cin, cout, k, padding=k // 2, bias=False), bn(cout), nn.ReLU(inplace=True))


class ConvDecoder2d(nn.Module):
    """1x1 projection, a 3x3 block at token resolution, x4 upsampling, a 3x3 block, 1x1 classifier."""

    def __init__(self, dim: int, n_out: int, hidden: int = 64):
        super().__init__()
        self.inp = nn.Sequential(nn.BatchNorm2d(dim), _block(nn.Conv2d, nn.BatchNorm2d, dim, hidden, 1))
        self.low = _block(nn.Conv2d, nn.BatchNorm2d, hidden, hidden, 3)
        self.high = _block(nn.Conv2d, nn.BatchNorm2d, hidden, hidden // 2, 3)
        self.out = nn.Conv2d(hidden // 2, n_out, 1)

    def forward(self, x: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
        x = self.low(self.inp(x))
        x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
        return F.interpolate(self.out(self.high(x)), size=out_size, mode="bilinear", align_corners=False)


class ConvDecoder3d(nn.Module):
    """Input (B, S, D, h, w): slice maps stacked along depth; 3D blocks mix neighbouring slices."""

    def __init__(self, dim: int, n_out: int, hidden: int = 64):
        super().__init__()
        self.inp = nn.Sequential(nn.BatchNorm3d(dim), _block(nn.Conv3d, nn.BatchNorm3d, dim, hidden, 1))
        self.mid = nn.Sequential(
            _block(nn.Conv3d, nn.BatchNorm3d, hidden, hidden, 3), _block(nn.Conv3d, nn.BatchNorm3d, hidden, hidden, 3)
        )
        self.out = nn.Conv3d(hidden, n_out, 1)

    def forward(self, x: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
        x = self.out(self.mid(self.inp(x.transpose(1, 2))))  # (B, n_out, S, h, w)
        return F.interpolate(x, size=out_size, mode="trilinear", align_corners=False)


HEADS = {"linear": LinearSegHead, "conv": ConvDecoder2d, "conv3d": ConvDecoder3d}


class SliceWise(nn.Module):
    """Runs a 2D head on every slice of (B, S, D, h, w) inputs; output (B, n_out, S, H, W)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor, out_size: tuple[int, ...]) -> torch.Tensor:
        b, s = x.shape[:2]
        y = self.head(x.flatten(0, 1), out_size[-2:])  # (B*S, n_out, H, W)
        return y.unflatten(0, (b, s)).transpose(1, 2)


def build_head(kind: str, dim: int, n_out: int, hidden: int = 64, volumetric: bool = False) -> nn.Module:
    """``kind``: linear | conv | conv3d. ``volumetric``: inputs are (B, S, D, h, w) stacks of slices."""
    if kind == "conv3d":
        if not volumetric:
            raise ValueError("head 'conv3d' needs volumes: features of shape (n, slices, D, h, w)")
        return ConvDecoder3d(dim, n_out, hidden)
    head = HEADS[kind](dim, n_out, hidden)
    return SliceWise(head) if volumetric else head


# ---------------------------------------------------------------- affinities


def affinity_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, *spatial) instance ids -> (B, ndim, *spatial) affinities: channel d at p is 1 when p and its
    predecessor along axis d belong to the same object (id != 0). The first row along d is 0."""
    out = torch.zeros((labels.shape[0], labels.ndim - 1, *labels.shape[1:]), dtype=torch.float32)
    for d in range(labels.ndim - 1):
        n = labels.shape[d + 1]
        cur, prev = labels.narrow(d + 1, 1, n - 1), labels.narrow(d + 1, 0, n - 1)
        out[:, d].narrow(d + 1, 1, n - 1).copy_(((cur == prev) & (cur != 0)).float())
    return out


def agglomerate_affinities(
    aff: np.ndarray, threshold: float = 0.5, min_size: int = 0, method: str = "components"
) -> np.ndarray:
    """(ndim, *spatial) affinities in [0, 1] -> instance ids (*spatial), 0 = background.

    Pixels joined by an edge with affinity > threshold form one segment (connected components of the
    thresholded nearest-neighbour graph); segments under ``min_size`` pixels become background.

    ``method='watershed'``: seeds are the connected regions whose affinities along every axis exceed
    ``threshold``, eroded by one pixel (at least ``min_size`` pixels); every other pixel joins a seed by a
    seeded watershed over the boundary map 1 - mean affinity (``_flood``), so a leak in a predicted
    boundary no longer merges two objects. Every pixel gets an instance (no background)."""
    if method == "watershed":
        return _watershed(np.asarray(aff), threshold, min_size)
    if method != "components":
        raise ValueError(f"unknown agglomeration '{method}' (watershed, components)")
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    aff = np.asarray(aff)
    shape = aff.shape[1:]
    index = np.arange(int(np.prod(shape))).reshape(shape)
    src, dst = [], []
    for d in range(len(shape)):
        n = shape[d]
        keep = np.take(aff[d], np.arange(1, n), axis=d) > threshold
        src.append(np.take(index, np.arange(1, n), axis=d)[keep])
        dst.append(np.take(index, np.arange(0, n - 1), axis=d)[keep])
    src, dst = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(index.size, index.size))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    linked = np.zeros(index.size, dtype=bool)
    linked[src] = linked[dst] = True
    fg = linked & (sizes[comp] >= max(min_size, 1))
    _, ids = np.unique(comp[fg], return_inverse=True)
    out = np.zeros(index.size, dtype=np.int64)
    out[fg] = ids + 1
    return out.reshape(shape)


def _watershed(aff: np.ndarray, threshold: float, min_size: int) -> np.ndarray:
    from scipy import ndimage

    # interior: affinities above the threshold along every axis, eroded once so that a one-pixel leak
    # through a boundary cannot bridge two seeds
    seeds, n = ndimage.label(ndimage.binary_erosion((aff > threshold).all(0)))
    if n and min_size > 1:
        sizes = np.bincount(seeds.ravel())
        small = sizes < min_size
        small[0] = False
        seeds[small[seeds]] = 0
        _, inv = np.unique(seeds, return_inverse=True)
        seeds = inv.reshape(seeds.shape)  # relabel 1..k (0 stays 0: it is the smallest value)
    if seeds.max() == 0:
        return np.ones(aff.shape[1:], np.int64)  # no seed: one segment
    return _flood(1 - aff.mean(0), seeds.astype(np.int64))


def _flood(boundary: np.ndarray, seeds: np.ndarray, levels: int = 16) -> np.ndarray:
    """Seeded watershed by level flooding: at each boundary level (low to high), labels grow one pixel at
    a time (face neighbours) into unlabelled pixels at or below that level, until nothing changes; so
    seeds meet on the high ridges of the boundary map. Vectorised with scipy; ties go to the larger label."""
    from scipy import ndimage

    lab = seeds.copy()
    footprint = ndimage.generate_binary_structure(lab.ndim, 1)
    for level in np.linspace(0, 1, levels + 1)[1:]:
        allowed = boundary <= level + 1e-9
        while True:
            todo = (lab == 0) & allowed
            if not todo.any():
                break
            grown = ndimage.maximum_filter(lab, footprint=footprint, mode="constant", cval=0)
            new = todo & (grown > 0)
            if not new.any():
                break
            lab[new] = grown[new]
    return lab


# ---------------------------------------------------------------- training on random crops, tiled inference


def _cosine(opt, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / max(steps, 1)))
    )


def _windows(n: int, size: int) -> list[int]:
    """Starts of windows of ``size`` covering [0, n) with stride size // 2, the last aligned to the end."""
    if size >= n:
        return [0]
    stride = max(size // 2, 1)
    starts = list(range(0, n - size + 1, stride))
    return starts if starts[-1] == n - size else [*starts, n - size]


class _Cropper:
    """Token windows and the label windows they cover at native resolution. ``x``: (n, D, h, w) or
    (n, S, D, h, w); labels (..., H, W) or (..., S, H, W). A crop of ``crop`` label pixels is a window of
    c = round(crop * h / H) tokens along an axis of h tokens, covering round(c * H / h) label pixels from
    round(t0 * H / h)."""

    def __init__(self, x_shape, label_shape, crop: int, crop_depth: int):
        self.volumetric = len(x_shape) == 5
        self.tokens = tuple(x_shape[-2:])
        self.native = tuple(label_shape[-2:])
        # ``crop`` native pixels -> the token window covering them at this input resolution
        self.crop = tuple(max(1, min(t, round(crop * t / n))) for t, n in zip(self.tokens, self.native))
        self.depth = min(crop_depth, x_shape[1]) if self.volumetric else 0
        self.n_depth = x_shape[1] if self.volumetric else 0

    def label_size(self, axis: int, c: int) -> int:
        return max(1, round(c * self.native[axis] / self.tokens[axis]))

    def label_start(self, axis: int, t0: int, c: int) -> int:
        return min(round(t0 * self.native[axis] / self.tokens[axis]), self.native[axis] - self.label_size(axis, c))

    def out_size(self, c=None) -> tuple[int, ...]:
        c = c or self.crop
        size = (self.label_size(0, c[0]), self.label_size(1, c[1]))
        return ((self.depth,) if self.volumetric else ()) + size

    def windows(self, z0: int, t0: tuple[int, int], c=None, depth=None):
        """(token slices, label slices) of one window (``depth`` slices from ``z0`` for volumes)."""
        c = c or self.crop
        ys = [
            slice(self.label_start(a, t0[a], c[a]), self.label_start(a, t0[a], c[a]) + self.label_size(a, c[a]))
            for a in (0, 1)
        ]
        ts = [slice(t0[a], t0[a] + c[a]) for a in (0, 1)]
        if self.volumetric:
            dz = slice(z0, z0 + (depth or self.depth))
            return (dz, slice(None), *ts), (dz, *ys)
        return (slice(None), *ts), tuple(ys)

    def random(self, rng: np.random.Generator):
        z0 = int(rng.integers(0, self.n_depth - self.depth + 1)) if self.volumetric else 0
        t0 = tuple(int(rng.integers(0, self.tokens[a] - self.crop[a] + 1)) for a in (0, 1))
        return self.windows(z0, t0)


def train_head(
    head: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn,
    lr: float,
    weight_decay: float,
    steps: int,
    batch_size: int,
    crop: int,
    crop_depth: int,
    seed: int = 0,
) -> nn.Module:
    """AdamW + cosine for ``steps`` steps, each on ``batch_size`` random crops (a random item, a random
    window): ``x`` (n, D, h, w) or (n, S, D, h, w) token grids; ``target`` (n, [C,] H, W) or (n, [C,] S, H, W)
    at native resolution, cropped to the matching region; ``loss_fn(logits, target_batch)``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cropper = _Cropper(x.shape, target.shape, crop, crop_depth)
    lead = target.ndim - (3 if cropper.volumetric else 2) - 1  # channel dims of the target (affinities: 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = _cosine(opt, steps)
    out_size = cropper.out_size()
    head.train()
    for _ in range(steps):
        xs, ts = [], []
        for i in rng.integers(0, len(x), max(batch_size, 2)):  # BatchNorm needs two samples
            tok, lab = cropper.random(rng)
            xs.append(x[int(i) : int(i) + 1][0][tok])  # one row (a streamed reader reads only it)
            ts.append(target[int(i) : int(i) + 1][0][(slice(None),) * lead + lab])
        loss = loss_fn(head(torch.stack(xs), out_size), torch.stack(ts))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head


@torch.no_grad()
def iter_tiled(head: nn.Module, x, out_shape: tuple[int, ...], n_out: int, crop: int, crop_depth: int):
    """(i, logits (n_out, *out_shape)) item by item, at native resolution from overlapping token tiles (stride
    half a tile), averaged where tiles overlap: memory is bounded by one item's logits, not the split's. ``x``:
    a tensor of token grids or a streamed reader of them (``dinoscale.features.rows``)."""
    head.eval()
    cropper = _Cropper(x.shape, (len(x), *out_shape), crop, crop_depth)
    zs = _windows(cropper.n_depth, cropper.depth) if cropper.volumetric else [0]
    ys, xs = (_windows(cropper.tokens[a], cropper.crop[a]) for a in (0, 1))
    tiles = [cropper.windows(z0, (y0, x0)) for z0 in zs for y0 in ys for x0 in xs]
    count = torch.zeros(out_shape)
    for _, lab in tiles:
        count[lab] += 1
    for i in range(len(x)):
        xi = x[i : i + 1][0]
        out = torch.zeros((n_out, *out_shape))
        for tok, lab in tiles:
            out[(slice(None), *lab)] += head(xi[tok][None], cropper.out_size())[0]
        yield i, out / count


def predict_tiled(
    head: nn.Module, x: torch.Tensor, out_shape: tuple[int, ...], n_out: int, crop: int, crop_depth: int
) -> torch.Tensor:
    """Logits (n, n_out, *out_shape) of every item (``iter_tiled`` stacked)."""
    return torch.stack([o for _, o in iter_tiled(head, x, out_shape, n_out, crop, crop_depth)])


def _train(head: nn.Module, spec, x, target, loss_fn, lr: float, seed: int) -> nn.Module:
    """``train_head`` with the spec's step budget and crops."""
    return train_head(
        head, x, target, loss_fn, lr, spec.weight_decay, spec.steps, spec.batch_size, spec.crop, spec.crop_depth, seed
    )


def _features(split: SegSplit):
    """A tensor, or a batch reader when the split is streamed from the store (``dinoscale.features.rows``)."""
    return as_batches(split.x)


def _labels(split: SegSplit):
    return as_batches(split.y, dtype=torch.long)


def _out_size(split: SegSplit) -> tuple[int, ...]:
    return tuple(split.y.shape[1:])


def _label_dtype(n_classes: int):
    return np.uint8 if n_classes <= 256 else np.int32


def _predicted(head, spec, split: SegSplit, n_out: int, fn):
    """(i, ``fn(logits)``) item by item over a split (tiled inference at native resolution)."""
    for i, logits in iter_tiled(head, _features(split), _out_size(split), n_out, spec.crop, spec.crop_depth):
        yield i, fn(logits)


def _argmax(logits: torch.Tensor) -> np.ndarray:
    return logits.argmax(0).numpy()


def _sigmoid(logits: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(logits).numpy()


def _unpacked(k: int):
    """Bit-packed label maps (b, *spatial) -> float (b, k, *spatial) binary targets, one channel per structure."""

    def fn(packed: torch.Tensor) -> torch.Tensor:
        bits = (1 << torch.arange(k)).reshape((1, k) + (1,) * (packed.ndim - 1))
        return ((packed.long().unsqueeze(1) & bits) > 0).float()

    return fn


def _packed(logits: torch.Tensor) -> np.ndarray:
    """(k, *spatial) logits -> a bit-packed uint8 map: structure c where its sigmoid exceeds 0.5 (logit > 0)."""
    from dinoscale.metrics import pack_labels

    return pack_labels((logits > 0).numpy())


def fit_segmentation(spec, train: SegSplit, val: SegSplit, test: SegSplit, seed: int = 0) -> ProbeResult:
    """test_scores: predicted label maps (n_test, *spatial); val_metric: mean foreground Dice per item (on
    the items whose ground truth holds each structure). Where the split's structures may overlap
    (``SegSplit.multilabel``): ``fit_multilabel_segmentation``."""
    if train.multilabel:
        return fit_multilabel_segmentation(spec, train, val, test, seed)
    from monai.losses import DiceCELoss

    from dinoscale.metrics import dice_per_volume

    xtr = _features(train)
    volumetric = xtr.ndim == 5
    ytr = _labels(train)
    # as nnU-Net: the soft Dice over the foreground classes only, pooled over the batch (stable when a
    # crop has no foreground); cross-entropy covers the background
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    loss_fn = lambda logits, t: dice_ce(logits, t.unsqueeze(1))  # noqa: E731
    best = None
    for lr in spec.learning_rates:
        torch.manual_seed(seed)  # the head's initial weights: the same whatever ran before in this process
        head = build_head(spec.head, xtr.shape[-3], spec.n_classes, spec.hidden_dim, volumetric)
        _train(head, spec, xtr, ytr, loss_fn, lr, seed)
        per_volume = [
            dice_per_volume(p[None], np.asarray(val.y[i : i + 1]), spec.n_classes)
            for i, p in _predicted(head, spec, val, spec.n_classes, _argmax)
        ]
        with np.errstate(all="ignore"):
            dice = float(np.nanmean(np.concatenate(per_volume)))
        if _improves(dice, best):
            best = (dice, lr, head)
    dice, lr, head = best
    test_pred = np.stack(
        [p.astype(_label_dtype(spec.n_classes)) for _, p in _predicted(head, spec, test, spec.n_classes, _argmax)]
    )
    return _lr_selected(spec, dice, lr, head, test_pred)


def _improves(value: float, best) -> bool:
    """Whether a candidate's val value beats the best so far (NaN loses to any number)."""
    return best is None or np.nan_to_num(value, nan=-1) > np.nan_to_num(best[0], nan=-1)


def _lr_selected(spec, value: float, lr: float, head, test_pred: np.ndarray) -> ProbeResult:
    """A dense head chosen over the learning rates on val: its test output, val value and selection edges."""
    return ProbeResult(
        test_scores=test_pred,
        val_metric=value,
        selected={"lr": lr},
        candidates=len(spec.learning_rates),
        extra={"head": head},
        edges=grid_edges({"lr": spec.learning_rates}, {"lr": lr}),
    )


def fit_multilabel_segmentation(spec, train: SegSplit, val: SegSplit, test: SegSplit, seed: int = 0) -> ProbeResult:
    """Structures that may overlap (bit-packed label maps, ``dinoscale.metrics.pack_labels``): the head gives
    n_classes - 1 logits per pixel, one per structure (no background channel), trained with per-structure binary
    cross-entropy + soft Dice (sigmoid, pooled over the batch, as DiceCE pools it for label maps); a structure
    is predicted where its sigmoid exceeds 0.5. test_scores: bit-packed predicted maps; val_metric: mean Dice
    per item over the structures its ground truth holds (``dinoscale.metrics.multilabel_per_volume``)."""
    from monai.losses import DiceLoss

    from dinoscale.metrics import multilabel_per_volume

    k = spec.n_classes - 1
    xtr = _features(train)
    volumetric = xtr.ndim == 5
    labels = _labels(train)
    unpack = _unpacked(k)
    target = (
        unpack(labels)
        if isinstance(labels, torch.Tensor)
        else MappedBatches(labels, unpack, shape=(len(labels), k, *labels.shape[1:]))
    )
    dice = DiceLoss(sigmoid=True, batch=True)
    loss_fn = lambda logits, t: F.binary_cross_entropy_with_logits(logits, t) + dice(logits, t)  # noqa: E731
    best = None
    for lr in spec.learning_rates:
        torch.manual_seed(seed)
        head = build_head(spec.head, xtr.shape[-3], k, spec.hidden_dim, volumetric)
        _train(head, spec, xtr, target, loss_fn, lr, seed)
        per_item = [
            multilabel_per_volume(p[None], np.asarray(val.y[i : i + 1]), spec.n_classes)["dice"]
            for i, p in _predicted(head, spec, val, k, _packed)
        ]
        with np.errstate(all="ignore"):
            value = float(np.nanmean(np.concatenate(per_item))) if per_item else float("nan")
        if _improves(value, best):
            best = (value, lr, head)
    value, lr, head = best
    return _lr_selected(spec, value, lr, head, np.stack([p for _, p in _predicted(head, spec, test, k, _packed)]))


def fit_affinity(spec, train: SegSplit, val: SegSplit, test: SegSplit, seed: int = 0) -> ProbeResult:
    """``y``: instance ids (0 = background / ignore). test_scores: instance label maps. lr and threshold are
    chosen on val by the mean variation of information (VOI under the CREMI convention, the EM headline;
    lower is better), so ``val_metric`` = -VOI (probes maximise); ``extra`` has ``val_voi`` and ``val_arand``."""
    from monai.losses import DiceLoss

    from dinoscale.metrics import instance_per_volume

    xtr = _features(train)
    volumetric = xtr.ndim == 5
    n_aff = 3 if volumetric else 2
    labels = _labels(train)
    target = (
        affinity_targets(labels)
        if isinstance(labels, torch.Tensor)
        else MappedBatches(labels, affinity_targets, shape=(len(labels), n_aff, *labels.shape[1:]))
    )
    dice = DiceLoss(sigmoid=True)
    loss_fn = lambda logits, t: F.binary_cross_entropy_with_logits(logits, t) + dice(logits, t)  # noqa: E731
    kind = "conv3d" if volumetric else "conv"
    best = None
    for lr in spec.learning_rates:
        torch.manual_seed(seed)
        head = build_head(kind, xtr.shape[-3], n_aff, spec.hidden_dim, volumetric)
        _train(head, spec, xtr, target, loss_fn, lr, seed)
        # per val item: its affinities once, then every threshold's instances (VOI / ARAND, CREMI convention)
        per = np.full((len(spec.thresholds), len(val.y), 2), np.nan)
        for i, aff in _predicted(head, spec, val, n_aff, _sigmoid):
            gt = np.asarray(val.y[i : i + 1])
            sp = None if val.spacing is None else [val.spacing[i]]
            for k, t in enumerate(spec.thresholds):
                seg = agglomerate_affinities(aff, t, spec.min_size, spec.agglomeration)[None]
                m = instance_per_volume(seg, gt, sp)
                per[k, i] = m["voi"][0], m["arand"][0]
        with np.errstate(all="ignore"):
            means = np.nanmean(per, axis=1)
        for k, t in enumerate(spec.thresholds):
            voi, arand = float(means[k, 0]), float(means[k, 1])
            if best is None or np.nan_to_num(-voi, nan=-np.inf) > np.nan_to_num(-best[0], nan=-np.inf):
                best = (voi, lr, t, head, arand)
    voi, lr, t, head, arand = best
    segs = np.stack(
        [
            agglomerate_affinities(a, t, spec.min_size, spec.agglomeration)
            for _, a in _predicted(head, spec, test, n_aff, _sigmoid)
        ]
    )
    selected = {"lr": lr, "threshold": t}
    return ProbeResult(
        test_scores=segs,
        val_metric=-voi,
        selected=selected,
        candidates=len(spec.learning_rates) * len(spec.thresholds),
        extra={"head": head, "val_voi": voi, "val_arand": arand},
        edges=grid_edges({"lr": spec.learning_rates, "threshold": spec.thresholds}, selected),
    )


def _rules(spec, task: str) -> dict:
    common = {
        "training": f"{spec.steps} AdamW steps (cosine schedule, weight decay {spec.weight_decay}), each on "
        f"{spec.batch_size} random crops of {spec.crop} x {spec.crop} label pixels at native resolution (x "
        f"{spec.crop_depth} slices of a volume) and the token window covering them",
        "inference": "tiled: overlapping token tiles of the crop size (stride half a tile), logits at native "
        "resolution averaged over overlaps",
        "init": "torch default, seeded by the replicate",
        "regularisation": f"AdamW's decoupled weight decay {spec.weight_decay}, fixed (not searched); the step "
        "budget and random crops; source: the DINOv2 linear segmentation evaluation (AdamW, wd 1e-4)",
    }
    if spec.kind == "affinity":
        return {
            **common,
            "head": "light conv decoder (3D for volumes) predicting nearest-neighbour affinities",
            "loss": "BCE + soft Dice on the affinities",
            "instances": f"{spec.agglomeration} on the affinities, segments / seeds under {spec.min_size} px dropped",
            "selection": "lr x threshold on val VOI under the CREMI convention (lower is better); a choice on an "
            "edge of a grid of 2 or more values is tagged",
        }
    if task == "multilabel_segmentation":
        return {
            **common,
            "head": "one logit per structure (no background channel): structures may overlap",
            "loss": "binary cross-entropy per structure + soft Dice (sigmoid, pooled over the batch; MONAI DiceLoss)",
            "prediction": "a structure where its sigmoid exceeds 0.5 (bit-packed label map)",
            "selection": "lr on val Dice (per structure on its own map, positive cases); a choice on an edge of a "
            "grid of 2 or more values is tagged",
        }
    return {
        **common,
        "loss": "Dice (foreground classes, pooled over the batch) + cross-entropy (MONAI DiceCELoss)",
        "selection": "lr on val Dice (positive cases); a choice on an edge of a grid of 2 or more values is tagged",
    }


def _space(trial, spec) -> dict:
    return {
        "learning_rates": [trial.suggest_float("lr", 1e-4, 1e-2, log=True)],
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    }


register_probe(
    ProbeDef(
        "segmentation",
        SegmentationProbeSpec,
        fit_segmentation,
        tasks=("segmentation", "multilabel_segmentation"),
        input="grid",
        space=_space,
        streams=True,
        description="BatchNorm + 1x1 conv, a light 2D or 3D decoder on patch-token grids",
        rules=_rules,
    )
)
register_probe(
    ProbeDef(
        "affinity",
        AffinityProbeSpec,
        fit_affinity,
        tasks=("instance_segmentation",),
        input="grid",
        space=_space,
        streams=True,
        description="EM affinities from a light decoder + seeded watershed",
        rules=_rules,
    )
)
