"""Probes on cached features. One registry (``registry.py``); each probe module declares its spec,
its fit, its search space and the tasks and inputs it serves in one ``ProbeDef``. A probe selects its
hyper-parameters on val and returns scores on test (never selected on test)."""

from __future__ import annotations

from dinoscale.probes.registry import (  # noqa: F401
    BagSplit,
    ProbeDef,
    ProbeResult,
    ProbeSpecBase,
    SegSplit,
    Split,
    get_probe,
    load_probes,
    probe_kinds,
    register_probe,
)


def run_probe(spec, train, val, test, seed: int = 0) -> ProbeResult:
    """``train/val/test``: ``Split`` (vector probes), ``BagSplit`` (bag probes) or ``SegSplit`` (grid probes)."""
    return get_probe(spec.kind).fit(spec, train, val, test, seed=seed)
