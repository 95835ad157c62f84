"""Segmentation heads on frozen patch-token grids, and affinity heads for EM instances.

Heads (all map a token grid to full-resolution logits):
- ``LinearSegHead``: BatchNorm + 1x1 conv, bilinear upsampling (the DINOv2 linear protocol).
- ``ConvDecoder2d``: a light convolutional decoder (the stronger variant).
- ``ConvDecoder3d``: slice feature maps stacked into a volume, light 3D decoder.
2D heads applied to volumes (x of shape (n, S, D, h, w)) run slice by slice.

Semantic heads train with MONAI's DiceCELoss; affinity heads predict nearest-neighbour affinities
(BCE + soft Dice) that ``agglomerate_affinities`` turns into instances (thresholded edges, connected
components). AdamW, cosine schedule; the learning rate (and for affinities the threshold) is chosen
on val.
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
from dinoscale.probes.registry import ProbeDef, ProbeResult, ProbeSpecBase, SegSplit, register_probe


class SegmentationProbeSpec(ProbeSpecBase):
    """Segmentation head on frozen patch-token grids; Dice+CE, AdamW, cosine; lr chosen on val by Dice."""

    kind: Literal["segmentation"] = "segmentation"
    head: Literal["linear", "conv", "conv3d"] = Field(
        "linear",
        description="linear: BatchNorm + 1x1 conv, bilinear up; conv: light 2D decoder; "
        "conv3d: slice maps stacked into a light 3D decoder",
    )
    n_classes: int = Field(2, ge=2, description="including background (label 0)")
    learning_rates: list[float] = Field(default_factory=lambda: [1e-3], min_length=1)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    hidden_dim: int = Field(64, ge=1, description="decoder width (conv heads)")

    @property
    def label(self) -> str:
        return f"seg-{self.head}"


class AffinityProbeSpec(ProbeSpecBase):
    """EM instances: nearest-neighbour affinities from a light decoder, turned into instances by a seeded
    watershed (seeds: regions whose affinities all exceed the threshold) or by connected components of the
    thresholded affinity graph; lr and threshold are chosen on val by VOI."""

    kind: Literal["affinity"] = "affinity"
    learning_rates: list[float] = Field(default_factory=lambda: [1e-3], min_length=1)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    hidden_dim: int = Field(64, ge=1)
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


# ---------------------------------------------------------------- training


def _cosine(opt, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / max(steps, 1)))
    )


def train_head(
    head: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int = 0,
) -> nn.Module:
    """AdamW + cosine on (features, target) pairs; ``loss_fn(logits, target_batch)``; logits at target size."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = _cosine(opt, epochs * steps_per_epoch)
    out_size = tuple(target.shape[-2:]) if x.ndim == 4 else tuple(target.shape[-3:])
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if len(idx) < 2 and len(x) >= 2:  # BatchNorm needs two samples; fold a lone tail into the next epoch
                continue
            loss = loss_fn(head(x[idx], out_size), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


@torch.no_grad()
def predict_logits(head: nn.Module, x: torch.Tensor, out_size: tuple[int, ...], batch_size: int = 16) -> torch.Tensor:
    head.eval()
    return torch.cat([head(x[i : i + batch_size], out_size) for i in range(0, len(x), batch_size)])


def _features(split: SegSplit):
    """A tensor, or a batch reader when the split is streamed from the store (``dinoscale.features.rows``)."""
    return as_batches(split.x)


def _labels(split: SegSplit):
    return as_batches(split.y, dtype=torch.long)


def _out_size(split: SegSplit) -> tuple[int, ...]:
    return tuple(split.y.shape[1:])


@torch.no_grad()
def _predicted_labels(head: nn.Module, x, out_size: tuple[int, ...], batch_size: int = 16):
    """(start, argmax label maps) batch by batch: the logits of a whole split are never held at once."""
    head.eval()
    for i in range(0, len(x), batch_size):
        yield i, head(x[i : i + batch_size], out_size).argmax(1).numpy()


def _label_dtype(n_classes: int):
    return np.uint8 if n_classes <= 256 else np.int32


def fit_segmentation(spec, train: SegSplit, val: SegSplit, test: SegSplit, seed: int = 0) -> ProbeResult:
    """test_scores: predicted label maps (n_test, *spatial); val_metric: mean foreground Dice per item."""
    from monai.losses import DiceCELoss

    from dinoscale.metrics import dice_per_volume

    xtr, xva, xte = _features(train), _features(val), _features(test)
    volumetric = xtr.ndim == 5
    ytr = _labels(train)
    # as nnU-Net: the soft Dice over the foreground classes only, pooled over the batch (stable when a
    # volume has no foreground); cross-entropy covers the background
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    loss_fn = lambda logits, t: dice_ce(logits, t.unsqueeze(1))  # noqa: E731
    best = None
    for lr in spec.learning_rates:
        torch.manual_seed(seed)  # the head's initial weights: the same whatever ran before in this process
        head = build_head(spec.head, xtr.shape[-3], spec.n_classes, spec.hidden_dim, volumetric)
        train_head(head, xtr, ytr, loss_fn, lr, spec.weight_decay, spec.epochs, spec.batch_size, seed)
        per_volume = [
            dice_per_volume(p, np.asarray(val.y[i : i + len(p)]), spec.n_classes)
            for i, p in _predicted_labels(head, xva, _out_size(val))
        ]
        dice = float(np.nanmean(np.concatenate(per_volume)))
        if best is None or np.nan_to_num(dice, nan=-1) > np.nan_to_num(best[0], nan=-1):
            best = (dice, lr, head)
    dice, lr, head = best
    test_pred = np.concatenate(
        [p.astype(_label_dtype(spec.n_classes)) for _, p in _predicted_labels(head, xte, _out_size(test))]
    )
    return ProbeResult(
        test_scores=test_pred,
        val_metric=dice,
        selected={"lr": lr},
        candidates=len(spec.learning_rates),
        extra={"head": head},
    )


def fit_affinity(spec, train: SegSplit, val: SegSplit, test: SegSplit, seed: int = 0) -> ProbeResult:
    """``y``: instance ids (0 = background / boundary). test_scores: instance label maps. lr and threshold
    are chosen on val by the mean variation of information (VOI, the EM headline; lower is better), so
    ``val_metric`` = -VOI (probes maximise); ``extra`` has ``val_voi`` and ``val_arand``."""
    from monai.losses import DiceLoss

    from dinoscale.metrics import adapted_rand_error, variation_of_information

    xtr, xva, xte = _features(train), _features(val), _features(test)
    volumetric = xtr.ndim == 5
    n_aff = 3 if volumetric else 2
    labels = _labels(train)
    target = affinity_targets(labels) if isinstance(labels, torch.Tensor) else MappedBatches(labels, affinity_targets)
    dice = DiceLoss(sigmoid=True)
    loss_fn = lambda logits, t: F.binary_cross_entropy_with_logits(logits, t) + dice(logits, t)  # noqa: E731
    kind = "conv3d" if volumetric else "conv"
    best = None
    for lr in spec.learning_rates:
        torch.manual_seed(seed)
        head = build_head(kind, xtr.shape[-3], n_aff, spec.hidden_dim, volumetric)
        train_head(head, xtr, target, loss_fn, lr, spec.weight_decay, spec.epochs, spec.batch_size, seed)
        aff = torch.sigmoid(predict_logits(head, xva, _out_size(val))).numpy()
        for t in spec.thresholds:
            segs = [agglomerate_affinities(a, t, spec.min_size, spec.agglomeration) for a in aff]
            voi = float(np.nanmean([sum(variation_of_information(s, g)) for s, g in zip(segs, np.asarray(val.y))]))
            if best is None or np.nan_to_num(-voi, nan=-np.inf) > np.nan_to_num(-best[0], nan=-np.inf):
                arand = float(np.nanmean([adapted_rand_error(s, g)[0] for s, g in zip(segs, np.asarray(val.y))]))
                best = (voi, lr, t, head, arand)
    voi, lr, t, head, arand = best
    aff = torch.sigmoid(predict_logits(head, xte, _out_size(test))).numpy()
    segs = np.stack([agglomerate_affinities(a, t, spec.min_size, spec.agglomeration) for a in aff])
    return ProbeResult(
        test_scores=segs,
        val_metric=-voi,
        selected={"lr": lr, "threshold": t},
        candidates=len(spec.learning_rates) * len(spec.thresholds),
        extra={"head": head, "val_voi": voi, "val_arand": arand},
    )


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
        tasks=("segmentation",),
        input="grid",
        space=_space,
        streams=True,
        description="BatchNorm + 1x1 conv, a light 2D or 3D decoder on patch-token grids",
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
    )
)
