"""k-NN probe, DINO protocol: L2-normalised features, cosine similarity, votes weighted by
exp(sim / T); multi-label tasks vote per label, multiclass tasks per class (the scores of a unit then
sum to 1). Every k is scored from one top-k search. Deterministic: a replicate changes its result only
through the train / val split it is given (there is no initialisation to seed)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from dinoscale.features.rows import as_batches
from dinoscale.metrics import selection_metric
from dinoscale.probes.registry import ProbeDef, ProbeResult, ProbeSpecBase, Split, grid_edges, register_probe
from dinoscale.tasks import CLASSIFICATION, selection_words


class KnnProbeSpec(ProbeSpecBase):
    """DINO k-NN: L2-normalised features, cosine similarity, softmax(sim/T)-weighted votes per label."""

    kind: Literal["knn"] = "knn"
    ks: list[int] = Field(default_factory=lambda: [10, 20, 100, 200], min_length=1)
    temperature: float = Field(0.07, gt=0)


def _topk(q: torch.Tensor, train, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of the (normalised) queries among the training rows: one product when
    the training features are in memory, else block by block, keeping the running top-k."""
    if isinstance(train, torch.Tensor):
        return (q @ train.T).topk(k, dim=1)
    best_sim, best_idx, start = None, None, 0
    for block in train.blocks():
        sim, idx = (q @ torch.nn.functional.normalize(block, dim=1).T).topk(min(k, len(block)), dim=1)
        idx += start
        start += len(block)
        if best_sim is not None:
            sim, pos = torch.cat([best_sim, sim], 1).topk(min(k, best_sim.shape[1] + sim.shape[1]), dim=1)
            idx = torch.cat([best_idx, idx], 1).gather(1, pos)
        best_sim, best_idx = sim, idx
    return best_sim, best_idx


def knn_scores(train_x, train_y, query_x, ks, temperature: float, chunk: int = 4096) -> dict[int, np.ndarray]:
    """Per-label scores in [0, 1] for each k (k is clipped to the number of training samples). Training
    features above the trial's memory budget are read in blocks (``dinoscale.features.rows``)."""
    train = as_batches(train_x)
    tx = torch.nn.functional.normalize(train, dim=1) if isinstance(train, torch.Tensor) else train
    ty = torch.as_tensor(train_y, dtype=torch.float32)
    ks = sorted({min(k, len(tx)) for k in ks})
    out = {k: [] for k in ks}
    for start in range(0, len(query_x), chunk):
        q = torch.nn.functional.normalize(
            torch.as_tensor(np.asarray(query_x[start : start + chunk]), dtype=torch.float32), dim=1
        )
        sim, idx = _topk(q, tx, ks[-1])  # sorted, most similar first
        w = (sim / temperature).exp()
        votes = w.unsqueeze(-1) * ty[idx]  # (q, kmax, C)
        for k in ks:
            out[k].append((votes[:, :k].sum(1) / w[:, :k].sum(1, keepdim=True)).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def fit_knn(spec, train: Split, val: Split, test: Split, seed: int = 0) -> ProbeResult:
    val_scores = knn_scores(train.x, train.y, val.x, spec.ks, spec.temperature)
    metric = selection_metric(val.select)
    val_metric = {k: metric(val.y, s) for k, s in val_scores.items()}
    best_k = max(val_metric, key=lambda k: (np.nan_to_num(val_metric[k], nan=-1), -k))
    test_scores = knn_scores(train.x, train.y, test.x, [best_k], spec.temperature)[best_k]
    return ProbeResult(
        test_scores=test_scores,
        val_metric=float(val_metric[best_k]),
        val_scores=val_scores[best_k],
        selected={"k": best_k},
        candidates=len(val_metric),
        # k clipped to the train size is as large as k can be: not an edge to widen
        edges={
            name: where
            for name, where in grid_edges({"k": list(val_metric)}, {"k": best_k}).items()
            if not (where == "top" and best_k >= len(train.x))
        },
    )


def _rules(spec, task: str) -> dict:
    return {
        "similarity": "cosine of L2-normalised features; votes weighted by exp(sim / T), per label (multi-label) "
        "or per class (multiclass)",
        "selection": f"k on val {selection_words(task)} (ties: smaller k); k clipped to the train size",
        "init": "none (deterministic): replicates differ by their train / val split only",
    }


def _space(trial, spec) -> dict:
    return {"temperature": trial.suggest_float("temperature", 0.02, 0.2, log=True)}


register_probe(
    ProbeDef(
        "knn",
        KnnProbeSpec,
        fit_knn,
        tasks=CLASSIFICATION,
        input="vector",
        space=_space,
        streams=True,
        description="DINO k-NN: cosine, T=0.07, k chosen on val",
        rules=_rules,
    )
)
