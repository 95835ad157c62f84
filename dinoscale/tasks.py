"""Tasks: what a trial does with a probe's test output. One descriptor per task, in one registry.

A task knows its headline metric (``dinoscale.headline``), whether its test output is one score vector
per unit (classification: images, volumes or slides) or a label map per volume (segmentation), and
how that output is scored with a patient-level interval. Probes say which tasks they serve
(``dinoscale.probes.registry``); datasets say which task they hold (``dinoscale.data``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dinoscale.headline import AUROC, DICE, VOI, Headline


@dataclass(frozen=True)
class Scoring:
    """What scoring one test split needs besides the predictions: its units and the protocol constants."""

    sample_ids: list[str]
    patient_ids: np.ndarray
    labels: np.ndarray  # (n, C) 0/1 for classification; (n, 0) otherwise
    classes: list[str] = field(default_factory=list)
    structures: dict[int, str] = field(default_factory=dict)  # segmentation: mask value -> structure name
    n_classes: int | None = None  # segmentation: including background
    resamples: int = 1000
    level: float = 0.95
    seed: int = 0


Scorer = Callable[[np.ndarray, "np.ndarray | None", Scoring], tuple[dict, pd.DataFrame]]


@dataclass(frozen=True)
class TaskDef:
    name: str
    headline: Headline
    score: Scorer  # (test output, test target or None, Scoring) -> (metrics, per-unit predictions table)
    dense: bool = False  # the probe's input is a patch-token grid and its output a label map per unit
    finetunable: bool = False  # lora / full cells can train the encoder under its head (dinoscale.train.objective)

    def val_metrics(self, val_metric: float) -> dict[str, float]:
        """Probes maximise their selection value; a lower-is-better headline is selected as its negative."""
        return {self.headline.val: val_metric if self.headline.goal == "max" else -val_metric}


def score_classification(test_scores: np.ndarray, _target, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """Macro AUROC with its patient-level bootstrap interval, per-class AUROC, per-unit scores."""
    from dinoscale.metrics import auroc_per_class, patient_bootstrap

    y = s.labels
    ci = patient_bootstrap(y, test_scores, s.patient_ids, resamples=s.resamples, level=s.level, seed=s.seed)
    per_class = auroc_per_class(y, test_scores)
    metrics = {
        **ci.as_dict(AUROC.test),
        **{f"test_auroc_{c}": float(v) for c, v in zip(s.classes, per_class) if np.isfinite(v)},
        "bootstrap_resamples_valid": ci.resamples,
    }
    predictions = pd.DataFrame({"sample_id": s.sample_ids, "patient_id": s.patient_ids})
    for j, c in enumerate(s.classes):
        predictions[f"label_{c}"] = y[:, j].astype(int)
        predictions[f"score_{c}"] = test_scores[:, j]
    return metrics, predictions


def _per_volume(values: dict[str, np.ndarray], headline: Headline, s: Scoring) -> tuple[dict, pd.DataFrame]:
    from dinoscale.metrics import summarise_per_volume

    metrics = summarise_per_volume(values, s.patient_ids, s.resamples, s.level, s.seed)
    metrics["n_test_volumes_scored"] = int(np.isfinite(values[headline.name]).sum())
    if headline.test not in metrics:
        raise RuntimeError(
            f"no test volume has a defined {headline.name} (every volume empty in both prediction and mask)"
        )
    return metrics, pd.DataFrame({"sample_id": s.sample_ids, "patient_id": s.patient_ids, **values})


def score_segmentation(pred: np.ndarray, target: np.ndarray, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """Dice (mean foreground and per structure) and HD95 per volume, their means with patient intervals."""
    from dinoscale.metrics import segmentation_per_volume

    names = [s.structures.get(c, str(c)) for c in range(1, s.n_classes)]
    return _per_volume(segmentation_per_volume(pred, target, s.n_classes, names), DICE, s)


def score_instances(pred: np.ndarray, target: np.ndarray, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """EM instances: VOI (split + merge) and adapted Rand error per volume, with intervals."""
    from dinoscale.metrics import instance_per_volume

    return _per_volume(instance_per_volume(pred, target), VOI, s)


_TASKS: dict[str, TaskDef] = {}


def register_task(task: TaskDef) -> TaskDef:
    _TASKS[task.name] = task
    return task


for _t in (
    TaskDef("multilabel", AUROC, score_classification, finetunable=True),  # binary is multilabel with one class
    TaskDef("multiclass", AUROC, score_classification, finetunable=True),
    TaskDef("mil", AUROC, score_classification),  # one label vector per bag (slide)
    TaskDef("segmentation", DICE, score_segmentation, dense=True, finetunable=True),
    TaskDef("instance_segmentation", VOI, score_instances, dense=True),
):
    register_task(_t)

CLASSIFICATION = ("multilabel", "multiclass")


def get_task(name: str) -> TaskDef:
    if name not in _TASKS:
        raise KeyError(f"unknown task '{name}'; known: {', '.join(_TASKS)}")
    return _TASKS[name]


def task_names() -> list[str]:
    return list(_TASKS)
