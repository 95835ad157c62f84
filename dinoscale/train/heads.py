"""The task heads a training strategy trains the encoder under, each described once.

A head is named as the probe whose features it reads, so a frozen cell and a trained cell of one
backbone x resolution x seed carry the same ``probe`` label and pair up in the comparisons:

- ``linear`` (classification): a linear layer on CLS ⊕ mean patch (volumes: pooled over the slices as the
  frozen ``volumes`` view pools them); BCE, macro AUROC on val.
- ``segmentation`` (dense tasks): the spec's segmentation probe entry (decoder kind, classes, width) on the
  patch-token grid; Dice + CE, mean foreground Dice on val.

The plan resolves a cell's head into a plain dict (``Cell.finetune_head``: ``{'probe': <head>, ...}``,
``head_settings``); the model (``build_under_head``), the objective (``objective_for``) and the trial (``dense_classes``)
read it through here. A strategy lists the heads it can train (``StrategyDef.heads``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from dinoscale.metrics import selection_metric
from dinoscale.probes.segmentation import build_head
from dinoscale.train.model import ImageClassifier, Segmenter, VolumeClassifier
from dinoscale.train.objective import Objective, classification, segmentation

LINEAR = "linear"
SEGMENTATION = "segmentation"


@dataclass(frozen=True)
class Shape:
    """What a head is built for: outputs, 2D or volumes, the backbone's patch and prefix tokens, the label maps."""

    n_out: int
    volumetric: bool
    patch_size: int
    num_prefix_tokens: int | None = None
    out_size: tuple[int, ...] | None = None


def _linear(backbone: nn.Module, head: dict, shape: Shape) -> nn.Module:
    if shape.volumetric:
        return VolumeClassifier(backbone, shape.n_out, head.get("volume_pool", "mean"), shape.num_prefix_tokens)
    return ImageClassifier(backbone, shape.n_out, shape.num_prefix_tokens)


def _segmenter(backbone: nn.Module, head: dict, shape: Shape) -> nn.Module:
    dec = build_head(
        head["head"], backbone.num_features, int(head["n_classes"]), int(head["hidden_dim"]), shape.volumetric
    )
    return Segmenter(backbone, dec, shape.out_size, shape.patch_size, shape.num_prefix_tokens)


@dataclass(frozen=True)
class TrainHead:
    name: str  # its cells' probe label
    dense: bool  # a label map per unit (its settings carry n_classes, including background)
    build: Callable[[nn.Module, dict, Shape], nn.Module]  # (prepared backbone, head settings, shape) -> model
    objective: Callable[[dict], Objective]  # head settings -> loss, kept output, val metric


HEADS = {
    LINEAR: TrainHead(LINEAR, False, _linear, lambda head: classification()),
    SEGMENTATION: TrainHead(SEGMENTATION, True, _segmenter, lambda head: segmentation(int(head["n_classes"]))),
}


def get_head(head: dict) -> TrainHead:
    """The head of a cell's ``finetune_head`` settings."""
    if head.get("probe") not in HEADS:
        raise KeyError(f"no trainable head '{head.get('probe')}'; known: {', '.join(HEADS)}")
    return HEADS[head["probe"]]


def head_settings(dense: bool, probes: Sequence[Any], volume_pool: str) -> list[dict]:
    """The heads a task trains under: classification one linear head; a dense task the spec's segmentation
    probe entries (``probes``: those that serve the task)."""
    if not dense:
        return [{"probe": LINEAR, "volume_pool": volume_pool}]
    return [
        {"probe": p.kind, "head": p.head, "n_classes": p.n_classes, "hidden_dim": p.hidden_dim}
        for p in probes
        if p.kind == SEGMENTATION
    ]


def dense_classes(head: dict) -> int | None:
    """Classes of a dense head's label maps, background included; None for a classification head."""
    return int(head["n_classes"]) if get_head(head).dense else None


def objective_for(head: dict, select: str = "macro_auroc") -> Objective:
    """The objective of a cell's fine-tuning head (``Cell.finetune_head``); a classification head's val metric is
    the task's headline (``select``: macro AUROC, or a video-frame task's macro F1), as the frozen probes select."""
    objective = get_head(head).objective(head)
    if not get_head(head).dense and select != "macro_auroc":
        objective = replace(objective, val_metric=selection_metric(select))
    return objective


def build_under_head(backbone: nn.Module, head: dict, shape: Shape) -> nn.Module:
    """The model of a fine-tuning cell: the prepared backbone under its head."""
    return get_head(head).build(backbone, head, shape)
