"""One fine-tuning run (``lora`` or ``full``) on images, resumable and early-stopped on val.

Determinism across interruptions: each epoch reseeds torch and the loader's shuffle from
(seed, epoch), and the checkpoint written at the end of every epoch holds the trainable weights,
the optimizer and scheduler state, the best weights so far and the early-stopping counters. A
retried trial that finds the checkpoint continues at the next epoch and ends where an
uninterrupted run would. Checkpoints contain tensors and plain numbers only and are read with
``torch.load(weights_only=True)``; they are written atomically (temporary file + rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinoscale.metrics import macro_auroc
from dinoscale.train.llrd import llrd_param_groups
from dinoscale.train.lora import apply_lora
from dinoscale.train.model import ImageClassifier

CHECKPOINT = "finetune_state.pt"


@dataclass
class FinetuneConfig:
    strategy: Literal["lora", "full"]
    lr: float = 1e-4
    weight_decay: float = 0.05
    epochs: int = 10
    warmup_epochs: float = 1.0
    batch_size: int = 32
    patience: int | None = 3  # epochs without val improvement before stopping; None: never
    layer_decay: float = 0.75  # full only
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("qkv", "proj")
    grad_checkpointing: bool = False
    amp: bool = True  # bf16 autocast, CUDA only (ignored on CPU)
    num_workers: int = 0
    seed: int = 0

    @classmethod
    def from_spec(cls, spec, **overrides) -> FinetuneConfig:
        """From a ``LoraStrategySpec`` / ``FullStrategySpec`` (dinoscale.spec) or its dump (a cell's
        ``strategy_config``), plus overrides (e.g. seed)."""
        d = dict(spec) if isinstance(spec, dict) else spec.model_dump()
        kind = d.pop("kind")
        if kind == "lora":
            for k in ("rank", "alpha", "dropout", "targets"):
                d[f"lora_{k}"] = d.pop(k)
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(strategy=kind, **{**d, **overrides})


@dataclass
class FinetuneResult:
    model: ImageClassifier  # holds the best-val weights
    best_val: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int | None = None


def build_classifier(
    backbone: nn.Module, n_out: int, cfg: FinetuneConfig, num_prefix_tokens: int | None = None
) -> ImageClassifier:
    """Backbone (e.g. ``load_backbone(...).model``) + head, prepared for ``cfg.strategy``."""
    if cfg.strategy == "lora":
        backbone = apply_lora(backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    elif cfg.strategy == "full":
        for p in backbone.parameters():
            p.requires_grad = True
    else:
        raise ValueError(f"unknown strategy '{cfg.strategy}' (lora | full; frozen runs on cached features)")
    if cfg.grad_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)
    return ImageClassifier(backbone, n_out, num_prefix_tokens)


def _optimizer(model: ImageClassifier, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.strategy == "full":
        groups = llrd_param_groups(model, cfg.lr, cfg.layer_decay, cfg.weight_decay)
    else:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint does not match the model: unexpected keys {unexpected[:5]}")


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 64, device=None, amp: bool = True) -> np.ndarray:
    """Sigmoid scores (n, C) in dataset order."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    out = []
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with _autocast(device, amp):
            out.append(torch.sigmoid(model(x.to(device)).float()).cpu())
    return torch.cat(out).numpy()


def _labels(dataset: Dataset) -> np.ndarray:
    return np.stack([np.asarray(dataset[i][1], dtype=np.float32).reshape(-1) for i in range(len(dataset))])


def finetune(
    model: ImageClassifier,
    train: Dataset,
    val: Dataset,
    cfg: FinetuneConfig,
    checkpoint_dir: str | Path | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    device: str | torch.device | None = None,
    val_metric: Callable[[np.ndarray, np.ndarray], float] = macro_auroc,
) -> FinetuneResult:
    """Train ``model`` (from ``build_classifier``) with BCE on ``(image, multi-hot label)`` samples.

    ``on_epoch(epoch, metrics)`` runs after each epoch's checkpoint is written (report to Tune or
    Optuna there; raising — e.g. ``optuna.TrialPruned`` — stops the run, and a later call with the
    same ``checkpoint_dir`` resumes). Returns the model restored to its best-val weights.
    """
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model.to(device)
    opt = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), total))
    yv = _labels(val)
    state = {"epoch": -1, "best_val": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_model": None}
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    resumed = None
    if ckpt is not None and ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        _load_trainable(model, saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = {k: saved[k] for k in state}
        resumed = state["epoch"]
    stopped = False
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if cfg.patience is not None and state["bad_epochs"] >= cfg.patience:
            stopped = True
            break
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        loader = DataLoader(
            train,
            batch_size=cfg.batch_size,
            shuffle=True,
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
            drop_last=False,
        )
        model.train()
        losses = []
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).float().reshape(len(x), -1)
            with _autocast(device, cfg.amp):
                logits = model(x)
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        metric = float(val_metric(yv, predict(model, val, cfg.batch_size, device, cfg.amp)))
        improved = np.isfinite(metric) and metric > state["best_val"]
        if improved:
            state.update(best_val=metric, best_epoch=epoch, bad_epochs=0, best_model=_trainable_state(model))
        else:
            state["bad_epochs"] += 1
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_metric": metric,
            "lr": sched.get_last_lr()[-1],
        }
        state["history"].append(record)
        state["epoch"] = epoch
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save(
                ckpt,
                {
                    **state,
                    "model": _trainable_state(model),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                },
            )
        if on_epoch is not None:
            on_epoch(epoch, record)
    if state["best_model"] is not None:
        _load_trainable(model, state["best_model"])
    return FinetuneResult(
        model,
        float(state["best_val"]),
        int(state["best_epoch"]),
        int(state["epoch"]) + 1,
        stopped,
        list(state["history"]),
        resumed,
    )
