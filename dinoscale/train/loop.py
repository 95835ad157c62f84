"""One fine-tuning run (``lora``, ``full`` or any training strategy, one configuration of a cell's search),
resumable and early-stopped on val.

Determinism across interruptions: each epoch reseeds torch and the loader's shuffle from
(seed, epoch), and the checkpoint written at the end of every epoch holds the trainable weights,
the optimizer and scheduler state, the best weights so far and the early-stopping counters. A
retried trial that finds the checkpoint continues at the next epoch and ends where an
uninterrupted run would. When a run ends (its last epoch, patience, or a scheduler's stop) its
checkpoint can be compacted to the best weights and the history (``compact_checkpoint``); a later
call on a compacted checkpoint returns that result without training. Checkpoints contain tensors
and plain numbers only and are read with ``torch.load(weights_only=True)``; they are written
atomically (temporary file + rename).

Memory: a batch of ``batch_size`` samples is split into micro-batches of ``micro_batch_size`` whose
gradients accumulate before the one optimizer step (the plan sets it where a batch would not fit,
``dinoscale.train.memory``); on a CUDA out-of-memory error the micro-batch halves and the batch is
redone, for the rest of the run. For a per-sample loss (BCE) the gradient is the full batch's; the
segmentation loss pools its soft Dice over the micro-batch instead of the batch.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinoscale import record
from dinoscale.strategies.registry import get_strategy
from dinoscale.train.data import collate_units
from dinoscale.train.heads import Shape, build_under_head
from dinoscale.train.model import ImageClassifier
from dinoscale.train.objective import Objective, classification

log = logging.getLogger(__name__)

CHECKPOINT = "finetune_state.pt"
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class FinetuneConfig:
    strategy: str  # a training strategy (dinoscale.strategies)
    lr: float = 1e-4
    weight_decay: float = 0.05
    epochs: int = 10
    warmup_epochs: float = 1.0
    batch_size: int = 32
    micro_batch_size: int | None = None  # None: the whole batch at once
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
    options: dict[str, Any] = field(default_factory=dict)  # a strategy's own settings not named above

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)

    @classmethod
    def of(cls, configuration: dict, **kw) -> FinetuneConfig:
        """A configuration of a cell (``Cell.configurations[k]``): the settings named above as fields, the
        strategy's own others under ``options``."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in {**configuration, **kw}.items() if k in names}
        extra = {k: v for k, v in configuration.items() if k not in names}
        return cls(**known, options={**known.get("options", {}), **extra})

    @property
    def micro(self) -> int:
        return max(1, min(self.micro_batch_size or self.batch_size, self.batch_size))


@dataclass
class FinetuneResult:
    model: nn.Module  # holds the best-val weights
    best_val: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool  # by its own patience
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    micro_batch_size: int = 0  # in use at the end (smaller than asked after an OOM back-off)
    oom_backoffs: int = 0


def prepare_backbone(backbone: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """The backbone made trainable as its strategy says (``StrategyDef.prepare``: LoRA adapters with the
    backbone frozen, every weight trainable, ...), and gradient checkpointing if asked."""
    defn = get_strategy(cfg.strategy)
    if not defn.trains_encoder:
        raise ValueError(f"strategy '{cfg.strategy}' trains no encoder (it runs on cached features)")
    backbone = defn.prepare(backbone, cfg)
    if cfg.grad_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)
    return backbone


def build_classifier(
    backbone: nn.Module, n_out: int, cfg: FinetuneConfig, num_prefix_tokens: int | None = None
) -> ImageClassifier:
    """Backbone (e.g. ``load_backbone(...).model``) + linear head, prepared for ``cfg.strategy``."""
    return ImageClassifier(prepare_backbone(backbone, cfg), n_out, num_prefix_tokens)


def build_model(
    backbone: nn.Module,
    cfg: FinetuneConfig,
    head: dict,
    n_out: int,
    volumetric: bool,
    patch_size: int,
    num_prefix_tokens: int | None = None,
    out_size: tuple[int, ...] | None = None,
) -> nn.Module:
    """The model of a fine-tuning cell: ``head`` is the cell's ``finetune_head`` (``dinoscale.train.heads``:
    {'probe': 'linear', 'volume_pool': ...} for classification, the segmentation probe's settings for
    segmentation)."""
    torch.manual_seed(cfg.seed)  # adapters' and head's init: the same for every configuration and every retry
    backbone = prepare_backbone(backbone, cfg)
    return build_under_head(backbone, head, Shape(n_out, volumetric, patch_size, num_prefix_tokens, out_size))


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the strategy's groups (``StrategyDef.param_groups``; ``full``: layer-wise decay), else
    weight decay on the trained matrices and none on biases and norms."""
    defn = get_strategy(cfg.strategy)
    if defn.param_groups is not None:
        groups = defn.param_groups(model, cfg)
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
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint does not match the model: unexpected keys {unexpected[:5]}")


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # from torch, not from Ray's GPU ids


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    objective: Objective | None = None,
    batch_size: int = 64,
    device=None,
    amp: bool = True,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, targets) over ``dataset`` in order: sigmoid scores (n, C), or label maps for segmentation."""
    objective = objective or classification()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    outs, targets = [], []
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_units
    )
    for x, y in loader:
        with _autocast(device, amp):
            outs.append(objective.output(model(_to(x, device)).float()).cpu())
        targets.append(y)
    return torch.cat(outs).numpy(), torch.cat(targets).numpy()


def predict(model: nn.Module, dataset: Dataset, batch_size: int = 64, device=None, amp: bool = True) -> np.ndarray:
    """Sigmoid scores (n, C) in dataset order (classification)."""
    return evaluate(model, dataset, classification(), batch_size, device, amp)[0]


def _to(x, device):
    """A batch's inputs to the device: a tensor, or a list of volumes of different depths."""
    if isinstance(x, (list, tuple)):
        return [v.to(device, non_blocking=True) for v in x]
    return x.to(device, non_blocking=True)


def _backward_batch(model, x, y, objective: Objective, micro: int, device, amp: bool) -> float:
    """Forward + backward of one batch in micro-batches, gradients accumulated; returns the batch loss."""
    total = 0.0
    for i in range(0, len(x), micro):
        xb = _to(x[i : i + micro], device)
        yb = y[i : i + micro].to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(xb)
        loss = objective.loss(logits, yb) * (len(xb) / len(x))
        loss.backward()
        total += float(loss.detach())
    return total


def _train_step(model, opt, x, y, objective: Objective, state: dict, device, amp: bool) -> float:
    """One optimizer step on one batch; on CUDA out-of-memory the micro-batch halves (sticky) and the
    batch is redone from zeroed gradients."""
    while True:
        micro = state[record.MICRO_BATCH_SIZE]
        opt.zero_grad(set_to_none=True)
        try:
            loss = _backward_batch(model, x, y, objective, micro, device, amp)
            oom = False
        except _OOM:
            if micro <= 1:
                raise
            oom = True
        if not oom:
            opt.step()
            return loss
        # outside the except block: the failed micro-batch's tensors are released before the retry
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        state[record.MICRO_BATCH_SIZE], state[record.OOM_BACKOFFS] = max(1, micro // 2), state[record.OOM_BACKOFFS] + 1
        log.warning(
            "out of memory at micro-batch %d: retrying the batch with %d", micro, state[record.MICRO_BATCH_SIZE]
        )


def _result(model, state: dict, stopped: bool, resumed) -> FinetuneResult:
    return FinetuneResult(
        model,
        float(state["best_val"]),
        int(state[record.BEST_EPOCH]),
        int(state["epoch"]) + 1,
        stopped,
        list(state["history"]),
        resumed,
        int(state[record.MICRO_BATCH_SIZE]),
        int(state[record.OOM_BACKOFFS]),
    )


_COUNTERS = (
    "epoch",
    "best_val",
    record.BEST_EPOCH,
    "bad_epochs",
    "history",
    record.MICRO_BATCH_SIZE,
    record.OOM_BACKOFFS,
)


def finetune(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    cfg: FinetuneConfig,
    checkpoint_dir: str | Path | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    device: str | torch.device | None = None,
    objective: Objective | None = None,
) -> FinetuneResult:
    """Train ``model`` (from ``build_model`` / ``build_classifier``) on ``(input, target)`` samples.

    ``objective``: loss, kept output and val metric (default: classification, BCE and macro AUROC).
    ``on_epoch(epoch, record)`` runs after each epoch's checkpoint is written (report to Tune there;
    raising stops the run, and a later call with the same ``checkpoint_dir`` resumes). Returns the
    model restored to its best-val weights.
    """
    objective = objective or classification()
    device = _device(device)
    model.to(device)
    opt = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), total))
    state = {
        "epoch": -1,
        "best_val": -math.inf,
        record.BEST_EPOCH: -1,
        "bad_epochs": 0,
        "history": [],
        "best_model": None,
        record.MICRO_BATCH_SIZE: cfg.micro,
        record.OOM_BACKOFFS: 0,
    }
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    resumed, finished = _resume(ckpt, state, model, opt, sched)
    if finished is not None:  # a finished run, compacted: its result, no training
        return finished
    stopped = False
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if cfg.patience is not None and state["bad_epochs"] >= cfg.patience:
            stopped = True
            break
        epoch_record = _train_epoch(model, opt, sched, train, val, cfg, objective, state, epoch, device)
        if ckpt is not None:
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
            on_epoch(epoch, epoch_record)
    if state["best_model"] is not None:
        _load_trainable(model, state["best_model"])
    return _result(model, state, stopped, resumed)


def _resume(ckpt: Path | None, state: dict, model, opt, sched) -> tuple[int | None, FinetuneResult | None]:
    """Continue from a checkpoint if there is one: (the epoch it had reached or None, the result of a finished
    run, which trains no more, or None)."""
    if ckpt is None or not ckpt.is_file():
        return None, None
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    state.update({k: saved[k] for k in (*_COUNTERS, "best_model") if k in saved})
    resumed = state["epoch"]
    if saved.get("final"):
        if state["best_model"] is not None:
            _load_trainable(model, state["best_model"])
        return resumed, _result(model, state, bool(saved.get("stopped_early", False)), resumed)
    _load_trainable(model, saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return resumed, None


def _train_epoch(model, opt, sched, train, val, cfg: FinetuneConfig, objective, state: dict, epoch: int, device):
    """One epoch (seeded from (seed, epoch), so a resumed run draws the same batches), then val: the state's
    counters and best weights updated; returns the epoch's record."""
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
        drop_last=False,
        pin_memory=device.type == "cuda",
        collate_fn=collate_units,
    )
    model.train()
    losses = []
    for x, y in loader:
        losses.append(_train_step(model, opt, x, y, objective, state, device, cfg.amp))
        sched.step()
    out, yv = evaluate(model, val, objective, state[record.MICRO_BATCH_SIZE], device, cfg.amp, cfg.num_workers)
    metric = float(objective.val_metric(yv, out))
    improved = np.isfinite(metric) and metric > state["best_val"]
    if improved:
        state.update(best_val=metric, best_epoch=epoch, bad_epochs=0, best_model=_trainable_state(model))
    else:
        state["bad_epochs"] += 1
    epoch_record = {
        "epoch": epoch,
        record.TRAIN_LOSS: float(np.mean(losses)),
        "val_metric": metric,
        "best_val": float(state["best_val"]),
        "lr": sched.get_last_lr()[-1],
        record.MICRO_BATCH_SIZE: state[record.MICRO_BATCH_SIZE],
    }
    state["history"].append(epoch_record)
    state["epoch"] = epoch
    return epoch_record


def compact_checkpoint(checkpoint_dir: str | Path, stopped_early: bool = False) -> None:
    """Reduce a finished run's checkpoint to its best weights, counters and history (drops the optimizer
    state and the last weights: a full fine-tuning configuration keeps one copy of the model, not three)."""
    ckpt = Path(checkpoint_dir) / CHECKPOINT
    if not ckpt.is_file():
        return
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    if saved.get("final"):
        return
    keep = {k: saved[k] for k in (*_COUNTERS, "best_model") if k in saved}
    _save(ckpt, {**keep, "final": True, "stopped_early": stopped_early})


def checkpoint_summary(checkpoint_dir: str | Path) -> dict | None:
    """A run's counters and history from its checkpoint (None when it has none)."""
    ckpt = Path(checkpoint_dir) / CHECKPOINT
    if not ckpt.is_file():
        return None
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {k: saved[k] for k in (*_COUNTERS, "final") if k in saved}


def load_best_weights(model: nn.Module, checkpoint_dir: str | Path) -> dict:
    """Put a run's best-val weights (from its checkpoint) into ``model`` (built as for its training);
    returns the run's counters."""
    ckpt = Path(checkpoint_dir) / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint of this configuration (its weights are needed to score it)")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    if saved.get("best_model") is None:
        raise RuntimeError(f"{ckpt}: the run ended before its first val epoch; no weights to score")
    _load_trainable(model, saved["best_model"])
    return {k: saved[k] for k in _COUNTERS if k in saved}
