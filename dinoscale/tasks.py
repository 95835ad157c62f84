"""Tasks: what a trial does with a probe's test output. One descriptor per task, in one registry.

A task knows its headline metric (``dinoscale.headline``), whether its test output is one score vector
per unit (classification: images, volumes or slides) or a label map per volume (segmentation), and
how that output is scored with a patient-level interval. Probes say which tasks they serve
(``dinoscale.probes.registry``); datasets say which task they hold (``dinoscale.data``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.headline import AUROC, DICE, MACRO_F1, VOI, Headline
from dinoscale.metrics import (
    FRAME_METRICS,
    MACRO_MIN_PATIENTS,
    MIN_INTERVAL_UNITS,
    NEGATIVE_PATIENTS,
    NEGATIVE_UNITS,
    frame_metric,
    patient_bootstrap,
    per_video_accuracy,
    volume_bootstrap,
)


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
    spacing: list[tuple[float, ...]] | None = None  # dense tasks: per-unit voxel spacing in the label maps' axis order
    groups: list[str] | None = None  # per-unit sample group (CREMI: A / B / C), reported separately
    macro_min_patients: int = MACRO_MIN_PATIENTS  # the macro class-set rule (dinoscale.metrics.CONVENTIONS)
    min_interval_units: int = MIN_INTERVAL_UNITS  # no bootstrap interval over fewer patients


Scorer = Callable[[np.ndarray, "np.ndarray | None", Scoring], tuple[dict, pd.DataFrame]]


@dataclass(frozen=True)
class TaskDef:
    name: str
    headline: Headline
    score: Scorer  # (test output, test target or None, Scoring) -> (metrics, per-unit predictions table)
    dense: bool = False  # the probe's input is a patch-token grid and its output a label map per unit
    finetunable: bool = False  # lora / full cells can train the encoder under its head (dinoscale.train.objective)
    exclusive: bool = False  # one label per unit (multiclass): probes train softmax cross-entropy, not BCE
    negatives: str = NEGATIVE_PATIENTS  # the macro class-set rule's negative patient (dinoscale.metrics)
    paired: bool = False  # units come in (fixed, moving) pairs, one output per pair (registration)
    # segmentation whose structures may overlap: one binary map each, bit-packed in the label map
    # (dinoscale.metrics.pack_labels); probes train a sigmoid per structure (BCE + Dice), not a softmax
    overlapping: bool = False
    # the independent unit splits keep whole and intervals resample: a patient, or a video for frames of videos
    unit: str = "patient"

    def val_metrics(self, val_metric: float) -> dict[str, float]:
        """Probes maximise their selection value; a lower-is-better headline is selected as its negative."""
        return {self.headline.val: val_metric if self.headline.goal == "max" else -val_metric}


class UndefinedMetric(RuntimeError):
    """The split holds no unit the headline metric is defined on (a class without both kinds of patient, no
    volume with a structure): the test split's is refused by the pre-flight; a small val split has no interval."""


def score_classification(
    test_scores: np.ndarray, _target, s: Scoring, negatives: str = NEGATIVE_PATIENTS
) -> tuple[dict, pd.DataFrame]:
    """Macro AUROC over a class set fixed before resampling (``metrics.macro_class_set``; ``negatives``: who
    is a negative patient of a class) with its patient-level bootstrap interval, per-class AUROC, per-unit
    scores."""

    from dinoscale.metrics import auroc_per_class, macro_auroc, macro_class_set, patient_bootstrap

    y = s.labels
    k = s.macro_min_patients
    classes = macro_class_set(y, s.patient_ids, k, negatives)
    if not classes.any():  # no class reaches k patients: the stated fallback, logged as the k used
        k = 1
        classes = macro_class_set(y, s.patient_ids, k, negatives)
    if not classes.any():
        raise UndefinedMetric(
            f"no class has both a positive and a negative patient in test ({len(set(s.patient_ids))} patients): "
            "macro AUROC is undefined; enlarge the test split"
        )
    ci = patient_bootstrap(
        y,
        test_scores,
        s.patient_ids,
        metric=partial(macro_auroc, classes=np.flatnonzero(classes)),
        resamples=s.resamples,
        level=s.level,
        seed=s.seed,
        min_units=s.min_interval_units,
    )
    per_class = auroc_per_class(y, test_scores)
    metrics = {
        **ci.as_dict(AUROC.test),
        **{f"test_auroc_{c}": float(v) for c, v in zip(s.classes, per_class) if np.isfinite(v)},
        "bootstrap_resamples_valid": ci.resamples,
        "interval_units": ci.units,
        "macro_auroc_classes": int(classes.sum()),
        record.MACRO_MIN_PATIENTS: k,
    }
    predictions = pd.DataFrame({"sample_id": s.sample_ids, "patient_id": s.patient_ids})
    for j, c in enumerate(s.classes):
        predictions[f"label_{c}"] = y[:, j].astype(int)
        predictions[f"score_{c}"] = test_scores[:, j]
    return metrics, predictions


def score_video_frames(test_scores: np.ndarray, _target, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """Frames of videos, one class each, the video as the patient: the frame metrics the benchmark reports
    (accuracy, macro precision / recall / F1 -- the headline, as the endoscopy tables report F1 -- and Jaccard;
    the mean per-video accuracy), each with its video-level bootstrap interval (``CONVENTIONS['frame metrics']``),
    and macro AUROC over frames (its class set read with frame-level negatives,
    ``CONVENTIONS['macro AUROC (frames)']``)."""
    metrics, predictions = score_classification(test_scores, None, s, NEGATIVE_UNITS)
    metrics[record.MACRO_NEGATIVES] = 1
    for name in FRAME_METRICS:
        ci = patient_bootstrap(
            s.labels,
            test_scores,
            s.patient_ids,
            metric=frame_metric(name),
            resamples=s.resamples,
            level=s.level,
            seed=s.seed,
            min_units=s.min_interval_units,
        )
        metrics.update(ci.as_dict(f"test_{name}"))
    videos, acc = per_video_accuracy(s.labels, test_scores, s.patient_ids)
    metrics.update(
        volume_bootstrap(acc, None, s.resamples, s.level, s.seed, s.min_interval_units).as_dict("test_video_accuracy")
    )
    metrics["n_test_videos"] = len(videos)
    predictions.insert(2, "predicted", [s.classes[j] for j in np.asarray(test_scores).argmax(1)])
    return metrics, predictions


def _per_volume(values: dict[str, np.ndarray], headline: Headline, s: Scoring) -> tuple[dict, pd.DataFrame]:
    from dinoscale.metrics import summarise_per_volume

    metrics = summarise_per_volume(values, s.patient_ids, s.resamples, s.level, s.seed, min_units=s.min_interval_units)
    metrics["n_test_volumes_scored"] = int(np.isfinite(values[headline.name]).sum())
    metrics["interval_units"] = len(set(np.asarray(s.patient_ids).astype(str)))
    if headline.test not in metrics:
        raise UndefinedMetric(
            f"no test volume has a defined {headline.name} (no volume's ground truth holds a structure)"
        )
    table = pd.DataFrame({"sample_id": s.sample_ids, "patient_id": s.patient_ids, **values})
    if s.groups is not None:  # per sample (CREMI A / B / C), as the benchmark reports them: means, no interval
        table.insert(2, "group", list(s.groups))
        for g, part in table.groupby("group", sort=True):
            for name in values:
                v = part[name].to_numpy(dtype=np.float64)
                if np.isfinite(v).any():
                    metrics[f"test_{name}.{g}"] = float(np.nanmean(v))
    return metrics, table


def _by_volume(fn, pred, target, spacing=None, chunk: int = 8) -> dict[str, np.ndarray]:
    """Per-volume values computed ``chunk`` volumes at a time (volumes are scored independently), so a
    streamed test split's label maps are never all in memory at once. ``pred`` / ``target``: arrays (or
    row views) of equal-shaped volumes, or lists of volumes of their native shapes; ``spacing``: per volume."""

    if isinstance(pred, list) and any(np.shape(p) != np.shape(pred[0]) for p in pred):
        chunk = 1  # native shapes differ: one volume at a time

    def part(x, i):
        x = x[i : i + chunk]
        return x if isinstance(x, list) else np.asarray(x)

    parts = [
        fn(part(pred, i), part(target, i), None if spacing is None else spacing[i : i + chunk])
        for i in range(0, len(pred), chunk)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def score_segmentation(pred: np.ndarray, target: np.ndarray, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """Dice (positive cases, mean foreground and per structure), IoU (per structure and binary), HD95 (mm,
    penalty for missed / spurious structures), detection and false-positive rates, FP / FN volumes per volume;
    means with patient intervals."""
    from dinoscale.metrics import segmentation_per_volume

    names = [s.structures.get(c, str(c)) for c in range(1, s.n_classes)]
    values = _by_volume(
        lambda p, t, sp: segmentation_per_volume(p, t, s.n_classes, names, spacing=sp), pred, target, s.spacing
    )
    metrics, table = _per_volume(values, DICE, s)
    metrics.update(_aggregated_dice(pred, target, s.n_classes, names))
    return metrics, table


def _aggregated_dice(pred, target, n_classes: int, names: list[str]) -> dict[str, float]:
    """HECKTOR 2022's DSCagg per structure and their mean over a test split (``CONVENTIONS['aggregated Dice']``)."""
    from dinoscale.metrics import dice_overlaps

    sums = _by_volume(lambda p, t, sp: dice_overlaps(p, t, n_classes), pred, target)
    out = {}
    for c, name in enumerate(names, start=1):
        sizes = float(sums[f"sizes_{c}"].sum())
        if sizes > 0:
            out[f"test_dice_agg_{name}"] = 2.0 * float(sums[f"overlap_{c}"].sum()) / sizes
    if out:
        out["test_dice_agg"] = float(np.mean(list(out.values())))
    return out


def score_multilabel_segmentation(pred: np.ndarray, target: np.ndarray, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """Overlapping structures (bit-packed maps, ``dinoscale.metrics.pack_labels``): Dice and IoU per structure,
    each on its own binary map, their means over the structures defined on an image (Dice: the headline; IoU:
    the mIoU over structures), detection and false-positive rates; means with patient intervals."""
    from dinoscale.metrics import multilabel_per_volume

    names = [s.structures.get(c, str(c)) for c in range(1, s.n_classes)]
    values = _by_volume(lambda p, t, _sp: multilabel_per_volume(p, t, s.n_classes, names), pred, target)
    return _per_volume(values, DICE, s)


def score_instances(pred: np.ndarray, target: np.ndarray, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """EM instances: VOI (split + merge) and adapted Rand error per volume under the CREMI convention (border
    mask, ground-truth label 0 ignored), per sample where the dataset has samples, with intervals where the
    test split has enough units."""
    from dinoscale.metrics import instance_per_volume

    return _per_volume(_by_volume(instance_per_volume, pred, target, s.spacing), VOI, s)


def score_registration(warped, target, s: Scoring) -> tuple[dict, pd.DataFrame]:
    """Registration: the units come in pairs, fixed then moving (``dinoscale.probes.registration``); ``warped`` holds
    each pair's warped moving labels, ``target`` every unit's label map (arrays, or lists of native volumes whose
    shapes differ between pairs). Per pair: Dice per structure, HD95 and ASD of the warped labels against the fixed
    ones, and the same for the identity transform (the moving labels unwarped: ``<metric>_identity``, the stated
    baseline); means with patient intervals."""
    from dinoscale.metrics import registration_per_pair

    if len(target) != 2 * len(warped):
        raise ValueError(f"registration: {len(warped)} warped label maps for {len(target)} units (pairs: 2 units each)")
    names = [s.structures.get(c, str(c)) for c in range(1, s.n_classes)]
    per_pair = [
        registration_per_pair(
            np.asarray(warped[k])[None],
            np.asarray(target[2 * k])[None],
            np.asarray(target[2 * k + 1])[None],
            s.n_classes,
            names,
            None if s.spacing is None else [s.spacing[2 * k]],
        )
        for k in range(len(warped))
    ]
    values = {name: np.concatenate([v[name] for v in per_pair]) for name in per_pair[0]} if per_pair else {}
    pairs = replace(
        s,
        sample_ids=[f"{a}->{b}" for a, b in zip(s.sample_ids[0::2], s.sample_ids[1::2])],
        patient_ids=np.asarray(s.patient_ids)[0::2],
        groups=None if s.groups is None else list(s.groups)[0::2],
    )
    return _per_volume(values, DICE, pairs)


_TASKS: dict[str, TaskDef] = {}


def register_task(task: TaskDef) -> TaskDef:
    _TASKS[task.name] = task
    return task


for _t in (
    TaskDef("multilabel", AUROC, score_classification, finetunable=True),  # binary is multilabel with one class
    TaskDef("multiclass", AUROC, score_classification, finetunable=True, exclusive=True),
    # frames of videos, one class each; the video is the patient (Kvasir-Capsule, AutoLaparo phases)
    TaskDef(
        "video_frames",
        MACRO_F1,
        score_video_frames,
        finetunable=True,
        exclusive=True,
        negatives=NEGATIVE_UNITS,
        unit="video",
    ),
    TaskDef("mil", AUROC, score_classification),  # one label vector per bag (slide)
    TaskDef("segmentation", DICE, score_segmentation, dense=True, finetunable=True),
    # structures that may overlap (EDD2020): a sigmoid per structure; Dice / IoU per structure on its own map
    TaskDef("multilabel_segmentation", DICE, score_multilabel_segmentation, dense=True, overlapping=True),
    TaskDef("instance_segmentation", VOI, score_instances, dense=True),
    # pairs (fixed, moving) of a patient's images; headline: the warped labels' Dice (identity beside it)
    TaskDef("registration", DICE, score_registration, dense=True, paired=True),
):
    register_task(_t)


def selection_words(task: str | None) -> str:
    """The val metric a probe selects on, in words for the protocol table: its task's headline."""
    return get_task(task or "multilabel").headline.label.removeprefix("test ")


CLASSIFICATION = ("multilabel", "multiclass", "video_frames")


def get_task(name: str) -> TaskDef:
    if name not in _TASKS:
        raise KeyError(f"unknown task '{name}'; known: {', '.join(_TASKS)}")
    return _TASKS[name]


def task_names() -> list[str]:
    return list(_TASKS)
