"""Training the encoder on images (not cached features), for the strategies that do.

What each strategy is (its settings, search space, trainable, memory model, heads) is declared in its
module of ``dinoscale.strategies``; the mechanics it uses live here:
- ``lora``: peft LoRA adapters on the attention projections (``apply_lora``), backbone frozen;
- ``full``: every weight trained, layer-wise learning-rate decay (``llrd_param_groups``).
Every training strategy trains one configuration through ``finetune`` (AdamW, warm-up + cosine, bf16 autocast on CUDA,
micro-batches with an out-of-memory back-off, early stopping on val, resumable checkpoints) under
the head of the cell's task (``build_model``, ``heads``: linear on 2D images or pooled volume slices, a
segmentation decoder on patch-token grids; ``objective``), and score with ``evaluate``.
``memory`` estimates a training trial's GPU memory for the plan.
"""

from dinoscale.train.llrd import llrd_param_groups
from dinoscale.train.loop import (
    FinetuneConfig,
    FinetuneResult,
    build_classifier,
    build_model,
    checkpoint_summary,
    compact_checkpoint,
    evaluate,
    finetune,
    predict,
)
from dinoscale.train.lora import apply_lora, trainable_parameter_names
from dinoscale.train.model import ImageClassifier, Segmenter, VolumeClassifier

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "ImageClassifier",
    "Segmenter",
    "VolumeClassifier",
    "apply_lora",
    "build_classifier",
    "build_model",
    "checkpoint_summary",
    "compact_checkpoint",
    "evaluate",
    "finetune",
    "llrd_param_groups",
    "predict",
    "trainable_parameter_names",
]
