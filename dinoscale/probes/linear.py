"""Linear probe, DINOv2 protocol: many heads trained at once on the same features.

One head per (learning rate, weight decay); all heads see the same mini-batches, and their
updates are vectorised (SGD with momentum, cosine schedule), so the whole grid costs about one
fit. The head with the best val metric is reported on test.

Loss: binary cross-entropy **summed over labels** (averaged over the batch) for multi-label tasks, so
every label's effective learning rate is the grid's, whatever the number of labels: averaging over C
labels (as before) divided it by C (14 for NIH-14, 18 for CT-RATE) and left the heads of the DINOv2
grid, tuned for one cross-entropy per image, under-trained. Softmax cross-entropy for multiclass tasks
(``Split.exclusive``). Heads start from N(0, 0.01^2) weights (DINOv2's init), seeded, so replicates
differ in initialisation as well as in mini-batch order.

All heads' weights sit side by side in one (d, heads x labels) matrix, so a step is two GEMMs
(logits ``x W + b``; weight gradient ``x^T g``) and a few in-place element-wise updates. The gradient
is written out (``dL/dz = (sigmoid(z) - y) / batch`` per label, ``(softmax(z) - y) / batch`` for
multiclass) instead of going through autograd, which on CPU cost more than the arithmetic itself.

A choice on the edge of the grid (``ProbeResult.edges``) is tagged on the run and warned about.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from dinoscale.features.rows import as_batches, column_stats, over_rows
from dinoscale.metrics import auroc_per_class, selection_metric
from dinoscale.probes.registry import ProbeDef, ProbeResult, ProbeSpecBase, Split, grid_edges, register_probe
from dinoscale.tasks import CLASSIFICATION, selection_words

# The DINOv2/DINOv3 linear-evaluation grid (13 learning rates from 1e-5 to 0.1, scaled by batch/256),
# extended upward to 1.0: with the loss summed over labels and standardised features, the optimum of
# a many-label task on wide features can lie above 0.1, and a grid must contain its optimum.
DEFAULT_LINEAR_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0]
INIT_STD = 0.01  # DINOv2's linear head init: weights ~ N(0, 0.01^2), bias 0
# Weight decay (L2 on the weights, not the biases, added to the batch-mean loss): DINOv2 / DINOv3 train their
# heads without it (SGD, weight_decay=0), regularised by ImageNet's 1.28M images and 10 epochs. Medical sets
# of a few thousand images with 384-1024-d features need it: on a 14-label task with NIH-like prevalences
# (0.5-18 %) and 3,000 train rows, [0, 1e-4] stays 0.03 (384-d) to 0.08 (1024-d) test macro AUROC below a
# logistic regression with C tuned on val, and the gap grows with the width. Decades up to 1, i.e. down to
# scikit-learn's C = 1 / (wd x n_train) (3.3e-4 for 3,000 rows), the low end of DINOv3's own
# logistic-regression C sweep (10^-6 .. 10^5); lr x wd <= 1 keeps every head's SGD stable.
DEFAULT_LINEAR_WDS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]


class LinearProbeSpec(ProbeSpecBase):
    """Many linear heads trained at once on the same features, one per (lr, wd); chosen on val."""

    kind: Literal["linear"] = "linear"
    learning_rates: list[float] = Field(default_factory=lambda: list(DEFAULT_LINEAR_LRS), min_length=1)
    weight_decays: list[float] = Field(
        default_factory=lambda: list(DEFAULT_LINEAR_WDS),
        min_length=1,
        description="L2 on the weights added to the batch-mean loss; equivalent to scikit-learn's C = 1 / (wd n_train)",
    )
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1, description="lr is scaled by batch_size/256 (DINOv2 protocol)")
    momentum: float = Field(0.9, ge=0, lt=1)
    pca: int | None = Field(
        None,
        ge=1,
        description="width-fair probe: project the standardised features on their first k principal components "
        "(fitted on train, whitened) before the heads, as HEST does before its ridge probe, so that a 2560-d "
        "encoder does not win by width; none: every feature dimension",
    )


def _standardise(train: np.ndarray, *others: np.ndarray):
    mu = train.mean(0, keepdims=True)
    sd = train.std(0, keepdims=True) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def principal_axes(x, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` principal axes (d, k) of the rows of ``x`` (already centred: standardised with train's own
    statistics) and their standard deviations (k,), from the d x d covariance summed block by block (a streamed
    split is never held whole). ``k`` above the width is the width."""
    cov, n = None, 0
    for b in [x] if isinstance(x, torch.Tensor) else x.blocks():
        b = b.double()
        cov = b.T @ b if cov is None else cov + b.T @ b
        n += len(b)
    values, vectors = torch.linalg.eigh(cov / max(n - 1, 1))
    top = torch.argsort(values, descending=True)[: min(k, len(values))]
    return vectors[:, top].float().numpy(), values[top].clamp_min(1e-12).sqrt().float().numpy()


def _macro_auroc_per_head(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``y`` (n, C), ``scores`` (H, n, C) -> (H,) macro AUROC of each head, in one rank pass
    (NaN for a head whose every class is single-valued, as ``metrics.macro_auroc``)."""
    h, n, c = scores.shape
    per = auroc_per_class(np.tile(y, (1, h)), scores.transpose(1, 0, 2).reshape(n, h * c)).reshape(h, c)
    finite = np.isfinite(per)
    with np.errstate(invalid="ignore"):
        return np.where(finite.any(1), np.where(finite, per, 0).sum(1) / finite.sum(1), np.nan)


def _selection_per_head(y: np.ndarray, scores: np.ndarray, select: str) -> np.ndarray:
    """(H,) val selection metric of each head (``Split.select``): macro AUROC in one rank pass, a frame metric
    (video-frame tasks: macro F1 of the argmax class) head by head."""
    if select == "macro_auroc":
        return _macro_auroc_per_head(y, scores)
    metric = selection_metric(select)
    return np.array([metric(y, head) for head in scores])


def _probabilities(z: torch.Tensor, n_heads: int, c: int, exclusive: bool) -> torch.Tensor:
    """Logits (n, heads x C) -> per-head probabilities in place: softmax over each head's C columns
    (multiclass) or a sigmoid per label."""
    if exclusive:
        v = z.view(len(z), n_heads, c)
        v.copy_(v.softmax(-1))
        return z
    return z.sigmoid_()


def _val_loss(y: np.ndarray, p: np.ndarray, exclusive: bool) -> np.ndarray:
    """(H,) val loss of each head from probabilities (H, n, C): cross-entropy, or BCE summed over labels."""
    eps = 1e-7
    yv = y[None].astype(np.float64)
    if exclusive:
        return -(yv * np.log(p + eps)).sum(2).mean(1)
    return -(yv * np.log(p + eps) + (1 - yv) * np.log(1 - p + eps)).sum(2).mean(1)


def fit_linear(spec, train: Split, val: Split, test: Split, seed: int = 0) -> ProbeResult:
    g = torch.Generator().manual_seed(seed)
    exclusive = bool(getattr(train, "exclusive", False))
    # standardised with train statistics; tensors in memory, or batch readers when a split is streamed
    mu, sd = column_stats(train.x)
    sd = sd + 1e-6
    xtr, xva, xte = (as_batches(s.x, lambda a: (a - mu) / sd) for s in (train, val, test))
    if spec.pca:  # width-fair: the same k whitened principal components for every encoder
        axes, scale = principal_axes(xtr, spec.pca)
        xtr, xva, xte = (as_batches(s.x, lambda a: ((a - mu) / sd) @ axes / scale) for s in (train, val, test))
    ytr = torch.as_tensor(np.asarray(train.y, dtype=np.float32))
    grid = [(lr, wd) for lr in spec.learning_rates for wd in spec.weight_decays]
    n_heads, (n, d), c = len(grid), xtr.shape, ytr.shape[1]
    batch = min(spec.batch_size, n)
    # per output column (head-major: column h * c + k is label k of head h)
    lr = torch.tensor([g_[0] for g_ in grid], dtype=torch.float32).repeat_interleave(c) * batch / 256
    wd = torch.tensor([g_[1] for g_ in grid], dtype=torch.float32).repeat_interleave(c)
    decay = bool((wd != 0).any())
    # one seeded init shared by every head: the grid compares lr x wd from the same start, and adding a head
    # changes no other head
    w = torch.randn(d, c, generator=g).mul_(INIT_STD).repeat(1, n_heads)
    b = torch.zeros(n_heads * c)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    steps_per_epoch = math.ceil(n / batch)
    total = spec.epochs * steps_per_epoch
    step = 0
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            # index_select, not xtr[idx]: the advanced-indexing gather was slower than the step's GEMMs
            xb, yb, nb = xtr.index_select(0, idx), ytr.index_select(0, idx), len(idx)
            # d(sum over heads of each head's batch-mean loss, summed over labels)/dlogits
            gz = _probabilities(torch.addmm(b, xb, w), n_heads, c, exclusive)
            gz.view(nb, n_heads, c).sub_(yb[:, None])
            gz.div_(nb)
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            vw.addmm_(xb.T, gz, beta=spec.momentum)  # momentum buffer += weight gradient, in the GEMM
            if decay:
                vw.addcmul_(w, wd)
            vb.mul_(spec.momentum).add_(gz.sum(0))
            w.addcmul_(vw, lr, value=-scale)
            b.addcmul_(vb, lr, value=-scale)
            step += 1
    # val: every head (one GEMM); test: only the selected head
    val_scores = over_rows(xva, lambda t: _probabilities(torch.addmm(b, t, w), n_heads, c, exclusive))
    val_scores = val_scores.view(len(xva), n_heads, c).permute(1, 0, 2).numpy()
    val_metrics = _selection_per_head(val.y, val_scores, val.select)
    # ties in the val metric (common when val is easy) are broken by val loss: a barely trained head
    # ranks perfectly by chance of its init far less often than it calibrates well
    val_loss = _val_loss(np.asarray(val.y), val_scores, exclusive)
    order = np.lexsort((val_loss, -np.nan_to_num(val_metrics, nan=-np.inf)))
    best = int(order[0])
    cols = slice(best * c, (best + 1) * c)
    test_scores = over_rows(xte, lambda t: _probabilities(torch.addmm(b[cols], t, w[:, cols]), 1, c, exclusive)).numpy()
    selected = {"lr": grid[best][0], "weight_decay": grid[best][1]}
    return ProbeResult(
        test_scores=test_scores,
        val_metric=float(val_metrics[best]),
        val_scores=val_scores[best],
        selected=selected,
        candidates=n_heads,
        extra={"val_loss": float(val_loss[best])},
        edges=grid_edges({"lr": spec.learning_rates, "weight_decay": spec.weight_decays}, selected),
    )


def _rules(spec, task: str) -> dict:
    from dinoscale.tasks import get_task

    exclusive = get_task(task).exclusive if task else False
    return {
        "loss": "softmax cross-entropy over the classes"
        if exclusive
        else "binary cross-entropy summed over labels, averaged over the batch",
        "optimiser": f"SGD, momentum {spec.momentum}, cosine schedule to 0 over {spec.epochs} epochs, batch "
        f"{spec.batch_size}; lr x batch/256",
        "heads": f"{len(spec.learning_rates) * len(spec.weight_decays)} (every lr x weight decay), trained at once on "
        "the same batches",
        "init": f"weights N(0, {INIT_STD}^2) seeded by the replicate, bias 0",
        "features": "standardised with the train split's mean and std"
        + (
            f", then projected on their first {spec.pca} principal components fitted on train, whitened "
            "(width-fair: every encoder's probe sees the same number of dimensions; HEST's PCA before ridge)"
            if spec.pca
            else ""
        ),
        "regularisation": "weight decay wd: L2 on the weights (not the biases) added to the batch-mean loss, i.e. "
        "scikit-learn's C = 1 / (wd x n_train); source: DINOv2 / DINOv3 use none (ImageNet's 1.28M images), a "
        "grid of decades to wd 1 reaches C = 1 / n_train, the low end of DINOv3's logistic-regression C sweep",
        "selection": f"val {selection_words(task)} (ties: lower val loss) over every lr x wd head; a choice on an edge of a grid "
        "of 2 or more values is tagged and warned about (wd 0 is the end of its range, not an edge)",
    }


def _space(trial, spec) -> dict:
    return {
        "epochs": trial.suggest_int("epochs", 10, 100, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256, 512]),
    }


register_probe(
    ProbeDef(
        "linear",
        LinearProbeSpec,
        fit_linear,
        tasks=CLASSIFICATION,
        input="vector",
        space=_space,
        streams=True,
        description="DINOv2 linear eval: a grid of lr x wd heads trained at once (BCE summed over labels, "
        "softmax CE for multiclass), chosen on val",
        rules=_rules,
    )
)
