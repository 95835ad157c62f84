"""Probes on cached features. One registry; each probe selects its hyper-parameters on val and
returns scores on test (never selected on test)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Split:
    x: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n, C) 0/1


@dataclass
class BagSplit:
    """Bags of instance features: slices of a volume (3D pooling) or tiles of a slide (ABMIL)."""

    x: list[np.ndarray]  # one (n_i, d) array per bag
    y: np.ndarray  # (n_bags, C) 0/1

    @classmethod
    def from_rows(cls, x: np.ndarray, bag_ids: np.ndarray, y: np.ndarray) -> "BagSplit":
        """Group cached per-slice / per-tile rows by ``bag_ids`` (order of first appearance). ``y`` is per
        row (must agree within a bag) or already per bag."""
        bag_ids = np.asarray(bag_ids)
        _, first, inverse = np.unique(bag_ids, return_index=True, return_inverse=True)
        order = np.argsort(first)  # bags in order of first appearance
        bags = [x[inverse == b] for b in order]
        y = np.asarray(y)
        if len(y) == len(bag_ids) and len(y) != len(order):
            y = y[first[order]]
        return cls(bags, y)


@dataclass
class SegSplit:
    """Patch-token grids and label maps for segmentation heads.

    2D: ``x`` (n, D, h, w), ``y`` (n, H, W) int class labels (or instance ids for affinity heads).
    3D: ``x`` (n, S, D, h, w) — S slices of a volume stacked — and ``y`` (n, S, H, W).
    """

    x: np.ndarray
    y: np.ndarray
    volume_ids: np.ndarray | None = None  # patient / volume of each item, for intervals


@dataclass
class ProbeResult:
    test_scores: np.ndarray  # (n_test, C); segmentation: predicted label maps (n_test, *spatial)
    val_metric: float  # selection metric of the chosen configuration on val
    selected: dict  # chosen hyper-parameters
    candidates: int  # configurations compared on val
    extra: dict = field(default_factory=dict)


_PROBES: dict[str, Callable[..., ProbeResult]] = {}


def register_probe(kind: str):
    def deco(fn):
        _PROBES[kind] = fn
        return fn

    return deco


def run_probe(spec, train, val, test, seed: int = 0) -> ProbeResult:
    """``train/val/test``: ``Split`` (linear, logreg, knn), ``BagSplit`` (pool, abmil) or ``SegSplit``
    (segmentation, affinity)."""
    from dinoscale.probes import knn, linear, logreg, mil, segmentation  # noqa: F401  (registration)

    return _PROBES[spec.kind](spec, train, val, test, seed=seed)
