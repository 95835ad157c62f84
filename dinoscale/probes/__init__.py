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
class ProbeResult:
    test_scores: np.ndarray  # (n_test, C)
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


def run_probe(spec, train: Split, val: Split, test: Split, seed: int = 0) -> ProbeResult:
    from dinoscale.probes import knn, linear  # noqa: F401  (registration)

    return _PROBES[spec.kind](spec, train, val, test, seed=seed)
