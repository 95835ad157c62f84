"""What a fine-tuning run minimises, keeps from its outputs and selects on, per kind of task.

- ``classification``: BCE on multi-hot labels (binary and multi-class labels as one-hot columns, as the
  frozen linear probe's scores are scored); sigmoid scores kept; val: macro AUROC.
- ``segmentation``: MONAI's DiceCELoss (soft Dice over the foreground classes pooled over the batch,
  plus cross-entropy; the frozen segmentation probe's loss); argmax label maps kept; val: mean
  foreground Dice per image / volume (empty-in-both structures skipped), as the frozen probe selects.

Which head uses which objective: ``dinoscale.train.heads``. Every val metric is maximised
(``dinoscale.tasks.TaskDef.val_metrics`` maps it to the record's sign).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dinoscale.metrics import dice_per_volume, macro_auroc


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target batch) -> mean loss
    output: Callable[[torch.Tensor], torch.Tensor]  # logits -> what is kept and scored
    val_metric: Callable[[np.ndarray, np.ndarray], float]  # (targets, outputs) -> value to maximise
    # the loss of a batch is the size-weighted mean of its micro-batches' losses (exact for a per-sample loss)
    per_sample: bool = True


def classification() -> Objective:
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), y.float().reshape(len(y), -1))

    return Objective("classification", loss, torch.sigmoid, macro_auroc)


def segmentation(n_classes: int) -> Objective:
    from monai.losses import DiceCELoss  # lazy: MONAI takes seconds to import and only dense cells need it

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dice_ce(logits.float(), y.long().unsqueeze(1))

    def val_metric(y: np.ndarray, pred: np.ndarray) -> float:
        return float(np.nanmean(dice_per_volume(pred, y, n_classes)))

    return Objective(f"segmentation({n_classes})", loss, lambda logits: logits.argmax(1), val_metric, False)
