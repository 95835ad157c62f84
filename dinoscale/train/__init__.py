"""Adaptation strategies that train the encoder on images (not cached features).

``frozen`` lives in ``dinoscale.probes`` (probes on cached features). Here:
- ``lora``: peft LoRA adapters on the attention projections (``apply_lora``), backbone frozen;
- ``full``: every weight trained, layer-wise learning-rate decay (``llrd_param_groups``).
Both train through ``finetune`` (AdamW, warm-up + cosine, bf16 autocast on CUDA, early stopping on
val, resumable checkpoints) and score with ``predict``.
"""

from dinoscale.train.llrd import llrd_param_groups
from dinoscale.train.loop import FinetuneConfig, FinetuneResult, build_classifier, finetune, predict
from dinoscale.train.lora import apply_lora, trainable_parameter_names
from dinoscale.train.model import ImageClassifier

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "ImageClassifier",
    "apply_lora",
    "build_classifier",
    "finetune",
    "llrd_param_groups",
    "predict",
    "trainable_parameter_names",
]
