"""Bag probes: 3D classification from slice features (``pool``: mean / max / trained attention) and
gated-attention MIL for whole-slide images (``abmil``, Ilse, Tomczak & Welling 2018).

Bags have different sizes; each mini-batch is padded and masked, so a bag's prediction never depends
on the padding. Every configuration of the grid (pooling x lr x wd) is trained with AdamW + cosine and
BCE (mean over labels: AdamW's steps do not scale with the loss, so the mean and the sum train alike),
softmax cross-entropy for multiclass tasks; the best val macro AUROC (ties: lower val loss) is reported
on test. The model's initialisation is seeded by the replicate's seed.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dinoscale.features.rows import LazyList, column_stats, fits_in_memory
from dinoscale.metrics import selection_metric
from dinoscale.probes.registry import BagSplit, ProbeDef, ProbeResult, ProbeSpecBase, grid_edges, register_probe
from dinoscale.tasks import CLASSIFICATION, selection_words


class PoolProbeSpec(ProbeSpecBase):
    """3D classification from slice features: pool each volume's slices (mean / max / trained attention),
    then a linear head; pooling, lr and wd chosen on val."""

    kind: Literal["pool"] = "pool"
    poolings: list[Literal["mean", "max", "attention"]] = Field(
        default_factory=lambda: ["mean", "max", "attention"], min_length=1, description="pooling modes compared on val"
    )
    learning_rates: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2], min_length=1)
    weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-4], min_length=1)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(32, ge=1, description="volumes per step")
    attention_dim: int = Field(128, ge=1, description="hidden size of the attention pooling")


class AbmilProbeSpec(ProbeSpecBase):
    """Gated-attention MIL (Ilse et al. 2018) on bags of tile features (WSI); lr and wd chosen on val."""

    kind: Literal["abmil"] = "abmil"
    hidden_dim: int = Field(128, ge=1, description="width of the instance embedding and of the attention")
    dropout: float = Field(0.25, ge=0, lt=1)
    learning_rates: list[float] = Field(default_factory=lambda: [1e-4, 1e-3], min_length=1)
    weight_decays: list[float] = Field(default_factory=lambda: [1e-4], min_length=1)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1, description="bags per step (bags are padded and masked)")


class AttentionPool(nn.Module):
    """softmax_i(w^T (tanh(V h_i) [* sigmoid(U h_i)])) weights over the instances of a bag."""

    def __init__(self, dim: int, hidden: int, gated: bool):
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.tanh(self.v(h))
        if self.u is not None:
            a = a * torch.sigmoid(self.u(h))
        a = self.w(a).squeeze(-1).masked_fill(~mask, float("-inf")).softmax(dim=1)  # (B, N)
        return (a.unsqueeze(-1) * h).sum(1), a


class PooledLinear(nn.Module):
    """Slice features -> pooled volume feature -> linear head (the ``pool`` probe)."""

    def __init__(self, dim: int, n_out: int, pooling: str, attention_dim: int = 128):
        super().__init__()
        self.pooling = pooling
        self.attn = AttentionPool(dim, attention_dim, gated=False) if pooling == "attention" else None
        self.head = nn.Linear(dim, n_out)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            z = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        elif self.pooling == "max":
            z = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        else:
            z, _ = self.attn(h, mask)
        return self.head(z)


class ABMIL(nn.Module):
    """Instance embedding (Linear + ReLU + dropout), gated attention pooling, linear classifier."""

    def __init__(self, dim: int, n_out: int, hidden: int = 128, dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn = AttentionPool(hidden, hidden, gated=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z, _ = self.attn(self.embed(h), mask)
        return self.head(z)


def _pad(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    h = nn.utils.rnn.pad_sequence(bags, batch_first=True)
    lengths = torch.tensor([len(b) for b in bags])
    mask = torch.arange(h.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return h, mask


def _standardiser(bags: list[np.ndarray]):
    mu, sd = column_stats(list(bags))  # streamed in blocks when the bags exceed the trial's memory budget
    mu, sd = mu[0], sd[0] + 1e-6
    one = lambda b: torch.as_tensor((np.asarray(b, dtype=np.float32) - mu) / sd)  # noqa: E731
    # bags of a streamed split are read (and standardised) when a mini-batch asks for them
    return lambda bs: [one(b) for b in bs] if fits_in_memory(list(bs)) else LazyList(bs, one)


@torch.no_grad()
def _predict(model: nn.Module, bags: list[torch.Tensor], batch: int = 64, exclusive: bool = False) -> np.ndarray:
    model.eval()
    link = (lambda z: z.softmax(-1)) if exclusive else torch.sigmoid
    out = [link(model(*_pad(bags[i : i + batch]))) for i in range(0, len(bags), batch)]
    return torch.cat(out).numpy()


def _loss(logits: torch.Tensor, y: torch.Tensor, exclusive: bool) -> torch.Tensor:
    if exclusive:
        return nn.functional.cross_entropy(logits, y.argmax(1))
    return nn.functional.binary_cross_entropy_with_logits(logits, y)


def train_bag_model(
    model: nn.Module,
    bags: list[torch.Tensor],
    y: torch.Tensor,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
    exclusive: bool = False,
) -> nn.Module:
    """AdamW + cosine, BCE (softmax cross-entropy when ``exclusive``); ``bags`` are (n_i, d) tensors, ``y`` (n_bags, C)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(bags) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(bags), generator=g).tolist()
        for i in range(0, len(bags), batch_size):
            idx = perm[i : i + batch_size]
            logits = model(*_pad([bags[j] for j in idx]))
            loss = _loss(logits, y[idx], exclusive)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def _fit_grid(
    configs: list[dict], make_model, train: BagSplit, val: BagSplit, test: BagSplit, spec, seed: int
) -> ProbeResult:
    prep = _standardiser(train.x)
    tr, va, te = prep(train.x), prep(val.x), prep(test.x)
    ytr = torch.as_tensor(train.y, dtype=torch.float32)
    yv = np.asarray(val.y, dtype=np.float64)
    exclusive = bool(getattr(train, "exclusive", False))
    best = None
    for cfg in configs:
        torch.manual_seed(seed)
        model = train_bag_model(
            make_model(cfg, tr[0].shape[1], ytr.shape[1]),
            tr,
            ytr,
            cfg["lr"],
            cfg["weight_decay"],
            spec.epochs,
            spec.batch_size,
            seed,
            exclusive,
        )
        sv = _predict(model, va, exclusive=exclusive)
        auc = selection_metric(val.select)(val.y, sv)
        if exclusive:
            loss = float(-(yv * np.log(sv + 1e-7)).sum(1).mean())
        else:
            loss = float(-(yv * np.log(sv + 1e-7) + (1 - yv) * np.log(1 - sv + 1e-7)).mean())
        key = (np.nan_to_num(auc, nan=-np.inf), -loss)
        if best is None or key > best[0]:
            best = (key, cfg, auc, loss, model, sv)
    _, cfg, auc, loss, model, sv = best
    grid = {k: [c[k] for c in configs] for k in ("lr", "weight_decay")}
    return ProbeResult(
        test_scores=_predict(model, te, exclusive=exclusive),
        val_metric=float(auc),
        val_scores=sv,
        selected=dict(cfg),
        candidates=len(configs),
        extra={"val_loss": loss},
        edges=grid_edges(grid, cfg),
    )


def fit_pool(spec, train: BagSplit, val: BagSplit, test: BagSplit, seed: int = 0) -> ProbeResult:
    configs = [
        {"pooling": p, "lr": lr, "weight_decay": wd}
        for p, lr, wd in itertools.product(spec.poolings, spec.learning_rates, spec.weight_decays)
    ]
    return _fit_grid(
        configs, lambda c, d, n: PooledLinear(d, n, c["pooling"], spec.attention_dim), train, val, test, spec, seed
    )


def fit_abmil(spec, train: BagSplit, val: BagSplit, test: BagSplit, seed: int = 0) -> ProbeResult:
    configs = [{"lr": lr, "weight_decay": wd} for lr, wd in itertools.product(spec.learning_rates, spec.weight_decays)]
    return _fit_grid(configs, lambda c, d, n: ABMIL(d, n, spec.hidden_dim, spec.dropout), train, val, test, spec, seed)


def _rules(spec, task: str) -> dict:
    from dinoscale.tasks import get_task

    exclusive = get_task(task).exclusive if task else False
    return {
        "loss": "softmax cross-entropy" if exclusive else "binary cross-entropy, mean over labels",
        "optimiser": f"AdamW, cosine schedule over {spec.epochs} epochs, {spec.batch_size} bags per step "
        "(padded and masked)",
        "init": "torch default, seeded by the replicate",
        "regularisation": f"AdamW's decoupled weight decay, grid {list(spec.weight_decays)} (a step shrinks the "
        "weights by lr x wd: at lr 1e-3 and wd 1e-4, 1e-7 a step, close to none)"
        + (f"; dropout {spec.dropout} on the instance embedding" if spec.kind == "abmil" else "")
        + "; source: AdamW as in ABMIL / CLAM, a small grid, not tuned for width",
        "selection": f"val {selection_words(task)} (ties: lower val loss) over the grid; a choice on an edge of a grid of 2 or "
        "more values is tagged",
    }


def _space(trial, spec) -> dict:
    out = {
        "learning_rates": [trial.suggest_float("lr", 1e-5, 1e-2, log=True)],
        "weight_decays": [trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)],
    }
    if spec.kind == "abmil":
        out["hidden_dim"] = trial.suggest_categorical("hidden_dim", [64, 128, 256])
        out["dropout"] = trial.suggest_float("dropout", 0.0, 0.5)
    return out


register_probe(
    ProbeDef(
        "pool",
        PoolProbeSpec,
        fit_pool,
        tasks=(*CLASSIFICATION, "mil"),
        input="bag",
        space=_space,
        streams=True,
        bags_only=True,
        description="slice features pooled per volume (mean / max / attention) + linear head",
        rules=_rules,
    )
)
register_probe(
    ProbeDef(
        "abmil",
        AbmilProbeSpec,
        fit_abmil,
        tasks=("mil",),
        input="bag",
        space=_space,
        streams=True,
        units=("image",),
        description="gated-attention MIL over a slide's tiles",
        rules=_rules,
    )
)
