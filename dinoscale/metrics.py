"""Metrics with patient-level bootstrap intervals, under stated conventions (``CONVENTIONS``).

AUROC is the Mann-Whitney statistic with average ranks for ties (identical to scikit-learn's
``roc_auc_score``), vectorised so that a thousand bootstrap resamples take well under a second.

Every rule that changes a number is a named constant here and is written, in words, into the protocol
table of each sweep (``CONVENTIONS``; ``dinoscale.sweep.protocol``):

- a macro metric averages a class set fixed *before* resampling: the classes with at least
  ``MACRO_MIN_PATIENTS`` positive and as many negative patients in the test split;
- no bootstrap interval is computed over fewer than ``MIN_INTERVAL_UNITS`` independent units
  (patients); the value is reported with the count instead;
- segmentation: Dice on the cases whose ground truth holds the structure (AutoPET convention),
  HD95 in the volume's physical units with a penalty distance for a missed or spurious structure,
  a per-structure detection rate, a lesion-wise detection rate (connected components) with the count of
  false-positive lesions, false-positive / false-negative volumes of unmatched connected components, and
  IoU per structure where the ground truth or the prediction holds it (EndoVis challenge IoU), binary IoU beside;
- EM instances: VOI and adapted Rand error under the CREMI convention (a border mask, one ignore label).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from dinoscale import record

# A macro metric's classes: at least this many positive (and negative) patients in test, fixed before resampling.
# With k positive patients, a patient resample misses all of them with probability ~exp(-k) (k=5: 0.7 %).
MACRO_MIN_PATIENTS = 5
# Who is a negative patient of a class in the macro class-set rule: one none of whose units holds the label
# (images of a patient), or one any of whose units lacks it (frames of a video: a video holds most classes).
NEGATIVE_PATIENTS = "patients"
NEGATIVE_UNITS = "units"
# No bootstrap interval over fewer independent units (patients, or volumes where each is its own unit).
MIN_INTERVAL_UNITS = 10
# EM (CREMI): ground-truth pixels within this distance (nm, in the section plane) of a label boundary are ignored.
CREMI_BORDER_NM = 25.0
CREMI_PIXEL_NM = 4.0  # CREMI's section-plane resolution: the border mask of a block without a recorded resolution
EM_IGNORE_LABEL = 0  # the one ground-truth label ignored by VOI and adapted Rand (and where the border mask writes)

CONVENTIONS: dict[str, str] = {
    "macro AUROC": f"mean of per-class AUROC over the classes with >= {MACRO_MIN_PATIENTS} positive and >= "
    f"{MACRO_MIN_PATIENTS} negative patients in test, fixed before resampling; a resample in which one of them "
    "is single-valued is dropped (counted in bootstrap_resamples_valid); the other classes are reported per class",
    "macro AUROC (frames)": f"video-frame tasks (the video is the patient): mean of per-class AUROC over frames, "
    f"over the classes with >= {MACRO_MIN_PATIENTS} videos holding a frame of the class and >= "
    f"{MACRO_MIN_PATIENTS} videos holding a frame of another class in test (every video holds frames of most "
    "classes), fixed before resampling; videos resampled whole",
    "frame metrics": "video-frame tasks: the predicted class of a frame is the argmax of its scores; accuracy over "
    "all test frames; macro precision, recall, F1 and Jaccard (IoU) averaged over the classes present in the "
    "ground truth of the frames scored (scikit-learn's labels= those classes, zero_division=0: a present class "
    "never predicted has precision 0; a class predicted but absent from the ground truth is left out of the "
    "averages, its frames still count as errors in accuracy and in the recall of their true classes); "
    "video_accuracy: the mean over test videos of each video's frame accuracy (phase-recognition convention); "
    "intervals resample videos whole, the class set re-read in each resample; macro F1 is the task's headline (the "
    "endoscopy tables' F1): probes and fine-tuning select their configuration on val macro F1",
    "intervals": f"percentile bootstrap over patients (a patient's images / volumes resampled together); none "
    f"over fewer than {MIN_INTERVAL_UNITS} patients (the count is logged instead)",
    "Dice": "per structure, on the volumes whose ground truth holds it (AutoPET convention: positive cases); "
    "on the others a prediction of it is scored by the false-positive volume and the false-positive rate; "
    "a volume's Dice is the mean over the structures its ground truth holds",
    "aggregated Dice": "dice_agg_<structure>: 2 x the voxels of the structure in both the prediction and the "
    "ground truth, summed over all test volumes, over the voxels of it in either, summed likewise (HECKTOR 2022's "
    "DSCagg: volumes without the structure count, no volume is dropped); dice_agg: the mean over the structures "
    "with voxels in some volume; one value per test split, no interval",
    "HD95": "95th-percentile symmetric Hausdorff distance (MONAI) in the volume's physical units (mm: from each "
    "volume's voxel spacing; px where the file records none), on the volumes where the ground truth or the "
    "prediction holds the structure; a missed or a spurious structure scores the penalty distance, the "
    "diagonal of the volume's field of view; absent from both: undefined",
    "detection": "detection rate (per structure): share of (volume, structure) pairs with the structure in the "
    "ground truth whose prediction overlaps it; false-positive rate: share of pairs without it that predict it",
    "lesion detection": "lesion_detection_rate: per volume, the share of its ground-truth lesions (connected "
    "components of each structure; 18-connectivity in 3D, 8 in 2D) that at least one predicted voxel of the "
    "same structure overlaps (IoU > 0), over every structure; undefined for a volume without lesions; "
    "false_positive_lesions: per volume, the predicted components that touch no ground-truth voxel of their "
    "structure",
    "IoU": "per image (volume) and structure, |P & G| / |P | G| where the ground truth or the prediction holds "
    "the structure; absent from both: undefined (EndoVis challenge IoU); an image's IoU is the mean over its "
    "defined structures; binary IoU: every structure together against background (instrument vs tissue)",
    "multi-label masks": "structures that may overlap (EDD2020), one binary map each (bit-packed in one label "
    "map): every structure scored on its own map, the prediction a sigmoid > 0.5 per structure; Dice on the images "
    "whose ground truth holds the structure (positive cases), IoU where the ground truth or the prediction holds it, "
    "undefined where neither does; an image's Dice / IoU: the mean over its defined structures (mIoU over "
    "structures); detection and false-positive rates per structure as for label maps",
    "FP / FN volume": "AutoPET: volume (ml; voxels where the spacing is unknown) of predicted connected "
    "components touching no ground-truth voxel (FP) and of ground-truth components touching no predicted "
    "voxel (FN); 18-connectivity in 3D, 8 in 2D; summed over structures",
    "registration": "the moving label map warped by the displacement (one-hot maps warped bilinearly, arg-max) "
    "against the fixed label map, per pair: Dice per structure on the pairs whose fixed map holds it (a pair's "
    "Dice: the mean over them); HD95 (95th percentile) and ASD (symmetric average surface distance), MONAI, in mm "
    "from the pair's spacing, px where the label maps carry none (CAMUS: px of the 128 x 128 grid, as the "
    "reference benchmark reports), a missed or spurious structure scoring the field-of-view diagonal; every "
    "value also for the identity transform (the moving labels unwarped), the stated baseline: <metric>_identity",
    "VOI / ARAND": f"CREMI: ground-truth pixels within {CREMI_BORDER_NM:g} nm of a label boundary in their "
    f"section are set to the ignore label {EM_IGNORE_LABEL} (CREMI's border mask; {CREMI_PIXEL_NM:g} nm pixels "
    "assumed where a block records no resolution), and both VOI (split = H(seg|gt), merge = H(gt|seg), bits) "
    "and the adapted Rand error ignore ground-truth label 0; predicted label 0 is a segment for VOI and "
    "unassigned pixels for ARAND (CREMI's reference code); per volume (sample block), reported per sample",
}


def auroc_per_class(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``y``, ``s``: (n, C). NaN for a class with only positives or only negatives."""
    y = np.asarray(y, dtype=bool)
    if y.ndim == 1:
        y, s = y[:, None], np.asarray(s)[:, None]
    ranks = rankdata(s, axis=0)
    n_pos = y.sum(0)
    n_neg = y.shape[0] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def macro_auroc(y: np.ndarray, s: np.ndarray, classes=None) -> float:
    """Mean per-class AUROC. ``classes`` (indices or a boolean mask), fixed before resampling: the mean over
    exactly those classes, NaN when one of them is single-valued in ``y``. None: the classes defined in ``y``
    (for selection on val, where no resampling happens)."""
    if classes is not None:
        y, s = np.asarray(y), np.asarray(s)
        y, s = (y[:, None], s[:, None]) if y.ndim == 1 else (y[:, classes], s[:, classes])
        per = auroc_per_class(y, s)
        return float(per.mean()) if per.size and np.isfinite(per).all() else float("nan")
    per = auroc_per_class(y, s)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


def macro_class_set(
    y: np.ndarray, patient_ids: np.ndarray, k: int = MACRO_MIN_PATIENTS, negatives: str = NEGATIVE_PATIENTS
) -> np.ndarray:
    """(C,) bool: the classes a macro metric averages, fixed before resampling: at least ``k`` patients with
    the label and ``k`` without it. A patient counts as positive when any of its images is; as negative when
    none is (``negatives='patients'``), or when any of its units lacks the label (``'units'``: the frames of a
    video, where every video holds frames of most classes; ``CONVENTIONS['macro AUROC (frames)']``)."""
    y = np.asarray(y, dtype=bool)
    if y.ndim == 1:
        y = y[:, None]
    ids = np.asarray(patient_ids).astype(str)
    _, inverse = np.unique(ids, return_inverse=True)
    pos = np.zeros((inverse.max() + 1 if len(ids) else 0, y.shape[1]), dtype=bool)
    np.logical_or.at(pos, inverse, y)
    n_pos = pos.sum(0)
    if negatives == NEGATIVE_UNITS:
        neg = np.zeros_like(pos)
        np.logical_or.at(neg, inverse, ~y)
        return (n_pos >= k) & (neg.sum(0) >= k)
    return (n_pos >= k) & (len(pos) - n_pos >= k)


@dataclass
class Interval:
    value: float
    low: float  # NaN when there is no interval (fewer than MIN_INTERVAL_UNITS units)
    high: float
    level: float
    resamples: int  # resamples in which the metric was defined
    units: int = 0  # independent units resampled (patients)

    @property
    def defined(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    def as_dict(self, name: str) -> dict[str, float]:
        """The value, and its bounds where there is an interval (no interval: no ``_ci_`` keys at all)."""
        out = {name: self.value}
        if self.defined:
            out.update(dict(zip(record.ci_names(name), (self.low, self.high))))
        return out


def _patient_resamples(patient_ids: np.ndarray, resamples: int, seed: int):
    """Sample indices of ``resamples`` draws of *patients* with replacement (a patient's images go together)."""
    patient_ids = np.asarray(patient_ids).astype(str)
    uniq, inverse = np.unique(patient_ids, return_inverse=True)
    groups = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        pick = rng.integers(0, len(groups), len(groups))
        yield np.concatenate([groups[i] for i in pick])


def patient_bootstrap(
    y: np.ndarray,
    s: np.ndarray,
    patient_ids: np.ndarray,
    metric=macro_auroc,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_units: int = MIN_INTERVAL_UNITS,
) -> Interval:
    """Percentile interval from resampling *patients* with replacement (all of a patient's images go together).
    Fewer than ``min_units`` patients: no interval (low = high = NaN), never an interval from a handful."""
    units = len(set(np.asarray(patient_ids).astype(str)))
    if units < min_units:
        return Interval(metric(y, s), float("nan"), float("nan"), level, 0, units)
    draws = _patient_resamples(patient_ids, resamples, seed)
    values = []
    for idx in draws:
        v = metric(y[idx], s[idx])
        if np.isfinite(v):
            values.append(v)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha]) if values else (np.nan, np.nan)
    return Interval(metric(y, s), float(lo), float(hi), level, len(values), units)


# ---------------------------------------------------------------- thresholded classification metrics
# Thresholds are chosen on val and applied on test (never chosen on test): ``choose_thresholds``
# then ``functools.partial(macro_f1, thresholds=t)`` is a metric ``patient_bootstrap`` accepts.


def _as_2d(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    return (y[:, None], s[:, None]) if y.ndim == 1 else (y, s)


def _confusion(y: np.ndarray, s: np.ndarray, thresholds) -> tuple[np.ndarray, ...]:
    y, s = _as_2d(y, s)
    y = y.astype(bool)
    pred = s >= np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (s.shape[1],))
    tp = (pred & y).sum(0)
    fp = (pred & ~y).sum(0)
    fn = (~pred & y).sum(0)
    tn = (~pred & ~y).sum(0)
    return tp, fp, fn, tn


def f1_per_class(y: np.ndarray, s: np.ndarray, thresholds=0.5) -> np.ndarray:
    """(C,) F1 of ``s >= threshold``; NaN where the class has no positives in ``y``."""
    tp, fp, fn, _ = _confusion(y, s, thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * tp / (2 * tp + fp + fn)
    f1 = f1.astype(np.float64)
    f1[(tp + fn) == 0] = np.nan
    return f1


def macro_f1(y: np.ndarray, s: np.ndarray, thresholds=0.5) -> float:
    per = f1_per_class(y, s, thresholds)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


def balanced_accuracy_per_class(y: np.ndarray, s: np.ndarray, thresholds=0.5) -> np.ndarray:
    """(C,) (sensitivity + specificity) / 2 per label; NaN for a label with one class only."""
    tp, fp, fn, tn = _confusion(y, s, thresholds)
    with np.errstate(invalid="ignore", divide="ignore"):
        ba = 0.5 * (tp / (tp + fn) + tn / (tn + fp))
    ba = ba.astype(np.float64)
    ba[((tp + fn) == 0) | ((tn + fp) == 0)] = np.nan
    return ba


def balanced_accuracy(y: np.ndarray, s: np.ndarray, thresholds=0.5) -> float:
    """Macro balanced accuracy over labels (multi-label / binary tasks, thresholded scores)."""
    per = balanced_accuracy_per_class(y, s, thresholds)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


def multiclass_balanced_accuracy(y: np.ndarray, s: np.ndarray) -> float:
    """Mean per-class recall of ``argmax(s)`` for single-label tasks (``y`` one-hot or class indices)."""
    y = np.asarray(y)
    true = y.argmax(1) if y.ndim == 2 else y.astype(int)
    pred = np.asarray(s).argmax(1)
    recalls = [np.mean(pred[true == c] == c) for c in np.unique(true)]
    return float(np.mean(recalls))


# ---------------------------------------------------------------- frame metrics of single-label tasks (argmax)
# Video-frame classification (Kvasir-Capsule, AutoLaparo phases) reports these rather than AUROC; the rules are
# ``CONVENTIONS['frame metrics']``.

FRAME_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "jaccard")


def _class_indices(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    return y.argmax(1) if y.ndim == 2 else y.astype(int)


def frame_confusion(true: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) confusion counts, rows the true class, columns the predicted one."""
    return np.bincount(true * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def frame_metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 / Jaccard over the classes present in the ground truth (the
    rows with frames); zero_division 0 as scikit-learn's. NaN for an empty confusion."""
    n = cm.sum()
    if n == 0:
        return dict.fromkeys(FRAME_METRICS, float("nan"))
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        union = support + predicted - tp
        jaccard = np.where(union > 0, tp / union, 0.0)
    return {
        "accuracy": float(tp.sum() / n),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "jaccard": float(jaccard[present].mean()),
    }


def frame_metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """The frame metrics of scores ``s`` (n, C) against one-hot ``y`` (n, C) or class indices (n,)."""
    s = np.asarray(s)
    return frame_metrics_from_confusion(frame_confusion(_class_indices(y), s.argmax(1), s.shape[1]))


def frame_metric(name: str):
    """One frame metric as a ``patient_bootstrap`` metric ``(y, s) -> float``."""

    def metric(y: np.ndarray, s: np.ndarray) -> float:
        return frame_metrics(y, s)[name]

    metric.__name__ = name
    return metric


def selection_metric(name: str):
    """What a probe maximises on val to choose its configuration, by the task's headline name (``Split.select``):
    macro AUROC over the classes defined in val, or a frame metric of the argmax class (video-frame tasks)."""
    if name in FRAME_METRICS:
        return frame_metric(name)
    if name == "macro_auroc":
        return macro_auroc
    raise ValueError(f"no selection metric '{name}'; known: macro_auroc, {', '.join(FRAME_METRICS)}")


def per_video_accuracy(y: np.ndarray, s: np.ndarray, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(videos, accuracy of each video's frames), videos sorted: the phase-recognition literature's accuracy is
    their mean."""
    hit = _class_indices(y) == np.asarray(s).argmax(1)
    ids = np.asarray(video_ids).astype(str)
    videos, inverse = np.unique(ids, return_inverse=True)
    return videos, np.bincount(inverse, weights=hit) / np.bincount(inverse)


def choose_thresholds(y_val: np.ndarray, s_val: np.ndarray, metric: str = "f1") -> np.ndarray:
    """Per-class threshold maximising F1 (``metric='f1'``) or balanced accuracy (``'balanced_accuracy'``) on val.

    Candidates are the observed val scores; a class without both labels in val keeps 0.5.
    """
    y_val, s_val = _as_2d(y_val, s_val)
    per_class = {"f1": f1_per_class, "balanced_accuracy": balanced_accuracy_per_class}[metric]
    out = np.full(y_val.shape[1], 0.5)
    for j in range(y_val.shape[1]):
        yj, sj = y_val[:, j : j + 1], s_val[:, j : j + 1]
        if yj.min() == yj.max():
            continue
        cands = np.unique(sj)
        vals = np.array([per_class(yj, sj, t)[0] for t in cands])
        out[j] = float(cands[int(np.nanargmax(vals))])
    return out


# ---------------------------------------------------------------- intervals: per-volume and paired


def mean_score(_y: np.ndarray, s: np.ndarray) -> float:
    """Metric for ``patient_bootstrap`` over per-volume values passed as ``s`` (``y`` is ignored)."""
    s = np.asarray(s, dtype=np.float64)
    return float(np.nanmean(s)) if np.isfinite(s).any() else float("nan")


def volume_bootstrap(
    values: np.ndarray,
    patient_ids: np.ndarray | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_units: int = MIN_INTERVAL_UNITS,
) -> Interval:
    """Interval for the mean of a per-volume metric (Dice, HD95, VOI...), resampling volumes — or patients
    when ``patient_ids`` is given (a patient's volumes go together). ``values``: (n_volumes,) or (n, C)
    (then the mean is over volumes and classes, NaN entries skipped)."""
    values = np.asarray(values, dtype=np.float64)
    ids = np.arange(len(values)) if patient_ids is None else np.asarray(patient_ids)
    return patient_bootstrap(
        np.zeros(len(values)),
        values,
        ids,
        metric=mean_score,
        resamples=resamples,
        level=level,
        seed=seed,
        min_units=min_units,
    )


@dataclass
class PairedInterval:
    difference: float  # metric(a) - metric(b) on the full test set
    low: float
    high: float
    level: float
    p_value: float  # two-sided bootstrap p-value of "no difference"
    resamples: int

    def as_dict(self, name: str) -> dict[str, float]:
        return {
            f"{name}_diff": self.difference,
            f"{name}_diff" + record.CI_LOW: self.low,
            f"{name}_diff" + record.CI_HIGH: self.high,
            f"{name}_diff_p": self.p_value,
        }


def paired_bootstrap(
    y: np.ndarray,
    s_a: np.ndarray,
    s_b: np.ndarray,
    patient_ids: np.ndarray,
    metric=macro_auroc,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedInterval:
    """Compare two cells scored on the *same* test samples: each resample draws patients once and
    evaluates both cells on it, so the interval is on the difference, not two overlapping intervals.
    For per-volume segmentation values use ``metric=mean_score`` with ``s_a``/``s_b`` the values."""
    draws = _patient_resamples(patient_ids, resamples, seed)
    diffs = []
    for idx in draws:
        d = metric(y[idx], s_a[idx]) - metric(y[idx], s_b[idx])
        if np.isfinite(d):
            diffs.append(d)
    diffs = np.asarray(diffs)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha]) if len(diffs) else (np.nan, np.nan)
    p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))) if len(diffs) else float("nan")
    return PairedInterval(metric(y, s_a) - metric(y, s_b), float(lo), float(hi), level, p, len(diffs))


# ---------------------------------------------------------------- segmentation (MONAI), per volume


def _onehot(labels: np.ndarray, n_classes: int):
    import torch

    t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return torch.nn.functional.one_hot(t, n_classes).movedim(-1, 1).float()  # (N, C, *spatial)


def _present(onehot) -> np.ndarray:
    """(N, C) bool: the class has at least one voxel."""
    return (onehot.flatten(2).sum(-1) > 0).numpy()


def dice_per_volume(
    pred: np.ndarray, target: np.ndarray, n_classes: int, include_background: bool = False
) -> np.ndarray:
    """(N, C') Dice per volume and class from label maps (N, *spatial) with MONAI's ``compute_dice``, on the
    positive cases only: NaN where the ground truth lacks the class (a prediction of it there is scored by
    the false-positive volume and rate, not as Dice 0 - see ``CONVENTIONS['Dice']``)."""
    from monai.metrics import compute_dice

    p, t = _onehot(pred, n_classes), _onehot(target, n_classes)
    d = compute_dice(p, t, include_background=include_background, ignore_empty=False).numpy().astype(np.float64)
    off = 0 if include_background else 1
    d[~_present(t)[:, off:]] = np.nan
    return d


def dice_overlaps(pred: np.ndarray, target: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Per volume and foreground class ``c``: ``overlap_c`` (voxels of c in both) and ``sizes_c`` (voxels of c in
    the prediction plus in the ground truth), the sums the aggregated Dice (``CONVENTIONS['aggregated Dice']``)
    accumulates over a test split."""
    out = {}
    for c in range(1, n_classes):
        out[f"overlap_{c}"] = np.array([np.count_nonzero((p == c) & (t == c)) for p, t in zip(pred, target)])
        out[f"sizes_{c}"] = np.array(
            [np.count_nonzero(p == c) + np.count_nonzero(t == c) for p, t in zip(pred, target)]
        )
    return out


def iou_per_volume(pred: np.ndarray, target: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """((N, C-1) IoU per volume and foreground class, (N,) binary IoU) from label maps (N, *spatial), under
    ``CONVENTIONS['IoU']``: NaN where neither the ground truth nor the prediction holds the class (binary: holds
    any foreground)."""
    pred, target = np.asarray(pred), np.asarray(target)
    n = len(target)
    per = np.full((n, n_classes - 1), np.nan)
    binary = np.full(n, np.nan)
    for i in range(n):
        p, t = pred[i], target[i]
        for c in range(1, n_classes):
            union = np.count_nonzero((p == c) | (t == c))
            if union:
                per[i, c - 1] = np.count_nonzero((p == c) & (t == c)) / union
        union = np.count_nonzero((p > 0) | (t > 0))
        if union:
            binary[i] = np.count_nonzero((p > 0) & (t > 0)) / union
    return per, binary


def field_diagonal(shape, spacing=None) -> float:
    """The diagonal of a volume's field of view in its physical units (voxels where ``spacing`` is None):
    the HD95 penalty of a missed or spurious structure."""
    sp = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * sp) ** 2)))


def hd95_per_volume(pred: np.ndarray, target: np.ndarray, n_classes: int, spacing=None) -> np.ndarray:
    """(N, C-1) 95th-percentile symmetric Hausdorff distance per volume and foreground class (MONAI), in the
    units of ``spacing``: one spacing for every volume, or one per volume (sequences in the arrays' axis
    order); None: voxels. A missed or spurious class scores ``field_diagonal`` (the penalty); a class absent
    from both prediction and ground truth is undefined (NaN)."""

    from monai.metrics import compute_hausdorff_distance

    return _surface_distance(
        lambda p, t, given: compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=given),
        pred,
        target,
        n_classes,
        spacing,
    )


def _surface_distance(compute, pred, target, n_classes: int, spacing) -> np.ndarray:
    """(N, C-1) of a MONAI surface distance ``compute(onehot pred, onehot target, spacing)``, with the penalty
    distance (``field_diagonal``) for a missed or spurious class and NaN for one absent from both."""
    pred, target = np.asarray(pred), np.asarray(target)
    n, shape = len(target), target.shape[1:]
    given = per_volume_spacings(spacing, n)
    spacings = given or [None] * n
    p, t = _onehot(pred, n_classes), _onehot(target, n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns per empty class (handled below) and about its own deprecations
        d = compute(p, t, given).numpy().astype(np.float64)
    in_gt, in_pred = _present(t)[:, 1:], _present(p)[:, 1:]
    penalty = np.array([field_diagonal(shape, sp) for sp in spacings])[:, None]
    d = np.where(in_gt ^ in_pred, penalty, d)  # missed or spurious
    d[~(in_gt | in_pred)] = np.nan
    d[~np.isfinite(d)] = np.nan
    return d


@dataclass(frozen=True)
class Components:
    """The connected components of one binary map against another (18-connectivity in 3D, 8 in 2D)."""

    count: int  # components of the map
    touched: int  # of them, those that at least one voxel of the other map overlaps (IoU > 0)
    unmatched_voxels: int  # voxels of the components that no voxel of the other map overlaps


def components(a: np.ndarray, b: np.ndarray) -> Components:
    """The connected components of binary map ``a`` and which of them ``b`` overlaps."""
    from scipy import ndimage

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    lab, n = ndimage.label(a, structure=ndimage.generate_binary_structure(a.ndim, 2))
    if n == 0:
        return Components(0, 0, 0)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    hit = np.zeros(n + 1, dtype=bool)
    hit[np.unique(lab[a & b])] = True
    hit[0] = True
    return Components(n, int(hit.sum()) - 1, int(sizes[~hit].sum()))


def unmatched_component_voxels(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """AutoPET's false-positive and false-negative voxel counts for one binary map: voxels of predicted
    connected components that touch no ground-truth voxel, and of ground-truth components that touch no
    predicted voxel (18-connectivity in 3D, 8 in 2D)."""
    return components(pred, target).unmatched_voxels, components(target, pred).unmatched_voxels


def per_volume_spacings(spacing, n: int) -> list | None:
    """``spacing`` as one entry per volume: None (unknown) stays None; one spacing (a sequence of numbers) is
    every volume's; a sequence of ``n`` spacings is taken as given."""
    if spacing is None:
        return None
    if np.ndim(spacing) == 1:
        return [tuple(float(v) for v in spacing)] * n
    if np.ndim(spacing) != 2 or len(spacing) != n:
        raise ValueError(f"spacing: one spacing for every volume or one per volume ({n}), got {spacing!r}")
    return [tuple(float(v) for v in sp) for sp in spacing]


def segmentation_per_volume(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int,
    class_names: list[str] | None = None,
    hd95: bool = True,
    spacing=None,
) -> dict[str, np.ndarray]:
    """Per-volume values from label maps (n_volumes, *spatial) under ``CONVENTIONS``.

    ``spacing``: voxel spacing in mm in the arrays' axis order, one for every volume or one per volume (None:
    unknown, distances in voxels). Returns ``dice`` (mean over the structures the ground truth holds) and
    ``dice_<structure>``, ``hd95_mm`` (``hd95_px`` without spacing; mean over structures, penalty for missed /
    spurious ones), ``detection_rate`` and ``false_positive_rate`` (per volume, over its positive / negative
    structures), ``lesion_detection_rate`` and ``false_positive_lesions`` (connected components),
    ``fp_volume_ml`` / ``fn_volume_ml`` (``fp_voxels`` / ``fn_voxels`` without spacing), ``iou`` (mean over the
    structures the ground truth or the prediction holds), ``iou_<structure>`` and ``iou_binary``. NaN where
    undefined."""

    names = class_names or [str(c) for c in range(1, n_classes)]
    pred, target = np.asarray(pred), np.asarray(target)
    spacings = per_volume_spacings(spacing, len(target))
    mm = spacings is not None
    d = dice_per_volume(pred, target, n_classes)
    in_gt = np.stack([[(t == c).any() for c in range(1, n_classes)] for t in target])
    in_pred = np.stack([[(p == c).any() for c in range(1, n_classes)] for p in pred])
    hit = np.stack([[((p == c) & (t == c)).any() for c in range(1, n_classes)] for p, t in zip(pred, target)])
    # per volume: fp / fn voxels, ground-truth lesions, those found, predicted lesions touching no ground truth
    counts = np.zeros((len(target), 5))
    for i, (p, t) in enumerate(zip(pred, target)):
        for c in range(1, n_classes):
            found, made = components(t == c, p == c), components(p == c, t == c)
            counts[i] += (
                made.unmatched_voxels,
                found.unmatched_voxels,
                found.count,
                found.touched,
                made.count - made.touched,
            )
    voxel = np.array([np.prod(sp) / 1000.0 for sp in spacings]) if mm else np.ones(len(target))  # mm^3 -> ml
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: volumes without any structure
        out = {"dice": np.nanmean(d, axis=1), **{f"dice_{n}": d[:, j] for j, n in enumerate(names)}}
        iou, binary = iou_per_volume(pred, target, n_classes)
        out.update({"iou": np.nanmean(iou, axis=1), "iou_binary": binary})
        out.update({f"iou_{n}": iou[:, j] for j, n in enumerate(names)})
        if hd95:
            out["hd95_mm" if mm else "hd95_px"] = np.nanmean(hd95_per_volume(pred, target, n_classes, spacings), axis=1)
        out["detection_rate"] = np.where(in_gt.any(1), (hit & in_gt).sum(1) / in_gt.sum(1), np.nan)
        neg = ~in_gt
        out["false_positive_rate"] = np.where(neg.any(1), (in_pred & neg).sum(1) / neg.sum(1), np.nan)
        out["lesion_detection_rate"] = np.where(counts[:, 2] > 0, counts[:, 3] / counts[:, 2], np.nan)
    out["false_positive_lesions"] = counts[:, 4]
    out["fp_volume_ml" if mm else "fp_voxels"] = counts[:, 0] * voxel
    out["fn_volume_ml" if mm else "fn_voxels"] = counts[:, 1] * voxel
    return out


# ---------------------------------------------------------------- multi-label (overlapping) masks

MAX_OVERLAPPING = 8  # structures of a bit-packed uint8 label map (bit c-1 holds structure c)


def pack_labels(binary) -> np.ndarray:
    """(C, *spatial) binary maps of C <= ``MAX_OVERLAPPING`` structures that may overlap -> one uint8 map
    (*spatial) whose bit c-1 is set where structure c is (0: none). Overlapping masks travel through the
    single-channel label-map path (caches, crops, tiles) unchanged."""
    binary = np.asarray(binary, dtype=bool)
    if len(binary) > MAX_OVERLAPPING:
        raise ValueError(f"{len(binary)} overlapping structures; a uint8 map holds at most {MAX_OVERLAPPING}")
    out = np.zeros(binary.shape[1:], np.uint8)
    for c, m in enumerate(binary):
        out[m] |= np.uint8(1 << c)
    return out


def unpack_labels(packed, n_structures: int) -> np.ndarray:
    """Bit-packed maps (N, *spatial) -> bool (N, n_structures, *spatial): structure c where bit c-1 is set."""
    packed = np.asarray(packed).astype(np.int64)
    bits = (1 << np.arange(n_structures)).reshape((1, n_structures) + (1,) * (packed.ndim - 1))
    return (packed[:, None] & bits) > 0


def multilabel_per_volume(
    pred: np.ndarray, target: np.ndarray, n_classes: int, class_names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Per-image values of overlapping structures from bit-packed maps (n, *spatial) (``pack_labels``), each
    structure scored on its own binary map under ``CONVENTIONS['multi-label masks']``: ``dice_<structure>``
    (NaN where the ground truth lacks it), ``iou_<structure>`` (NaN where neither map holds it), ``dice`` and
    ``iou`` (means over the structures defined on the image), ``detection_rate`` and ``false_positive_rate``.
    ``n_classes`` counts the background, as for label maps: n_classes - 1 structures."""
    k = n_classes - 1
    names = class_names or [str(c) for c in range(1, n_classes)]
    p, t = unpack_labels(pred, k), unpack_labels(target, k)
    axes = tuple(range(2, p.ndim))
    inter = (p & t).sum(axes).astype(np.float64)
    n_p, n_t = p.sum(axes).astype(np.float64), t.sum(axes).astype(np.float64)
    in_gt, in_pred = n_t > 0, n_p > 0
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: images without any structure
        dice = np.where(in_gt, 2 * inter / (n_p + n_t), np.nan)
        union = n_p + n_t - inter
        iou = np.where(union > 0, inter / union, np.nan)
        out = {"dice": np.nanmean(dice, axis=1), "iou": np.nanmean(iou, axis=1)}
        out.update({f"dice_{n}": dice[:, j] for j, n in enumerate(names)})
        out.update({f"iou_{n}": iou[:, j] for j, n in enumerate(names)})
        hit = in_gt & (inter > 0)
        out["detection_rate"] = np.where(in_gt.any(1), hit.sum(1) / in_gt.sum(1), np.nan)
        neg = ~in_gt
        out["false_positive_rate"] = np.where(neg.any(1), (in_pred & neg).sum(1) / neg.sum(1), np.nan)
    return out


def asd_per_volume(pred: np.ndarray, target: np.ndarray, n_classes: int, spacing=None) -> np.ndarray:
    """(N, C-1) symmetric average surface distance per volume and foreground class (MONAI's
    ``compute_average_surface_distance``, ``symmetric=True``: the mean over both surfaces' points of the distance
    to the other surface), in the units of ``spacing`` (None: voxels); missed / spurious and absent classes as
    ``hd95_per_volume`` (the penalty distance; NaN)."""
    from monai.metrics import compute_average_surface_distance

    return _surface_distance(
        lambda p, t, given: compute_average_surface_distance(
            p, t, include_background=False, symmetric=True, spacing=given
        ),
        pred,
        target,
        n_classes,
        spacing,
    )


def registration_per_pair(
    warped: np.ndarray,
    fixed: np.ndarray,
    moving: np.ndarray,
    n_classes: int,
    class_names: list[str] | None = None,
    spacing=None,
) -> dict[str, np.ndarray]:
    """Per-pair values of a registration from label maps (n_pairs, *spatial) under ``CONVENTIONS['registration']``:
    the warped moving labels against the fixed labels, and the same for the moving labels themselves (the identity
    transform, the stated baseline: ``<name>_identity``). ``dice`` (mean over the structures the fixed map holds)
    and ``dice_<structure>``, ``hd95_mm`` / ``asd_mm`` (``_px`` without spacing; means over structures) and
    ``hd95_<structure>_*`` / ``asd_<structure>_*``."""
    names = class_names or [str(c) for c in range(1, n_classes)]
    spacings = per_volume_spacings(spacing, len(fixed))
    unit = "mm" if spacings is not None else "px"
    out: dict[str, np.ndarray] = {}
    for suffix, pred in (("", warped), (record.IDENTITY_SUFFIX, moving)):
        d = dice_per_volume(pred, fixed, n_classes)
        h = hd95_per_volume(pred, fixed, n_classes, spacings)
        a = asd_per_volume(pred, fixed, n_classes, spacings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: pairs without any structure
            out["dice" + suffix] = np.nanmean(d, axis=1)
            out[f"hd95_{unit}{suffix}"] = np.nanmean(h, axis=1)
            out[f"asd_{unit}{suffix}"] = np.nanmean(a, axis=1)
        for j, n in enumerate(names):
            out[f"dice_{n}{suffix}"] = d[:, j]
            out[f"hd95_{n}_{unit}{suffix}"] = h[:, j]
            out[f"asd_{n}_{unit}{suffix}"] = a[:, j]
    return out


# ---------------------------------------------------------------- EM instance segmentation (CREMI convention)


def cremi_border_mask(gt: np.ndarray, max_dist: float) -> np.ndarray:
    """CREMI's border mask: True for the pixels within ``max_dist`` pixels (Euclidean, in the section plane)
    of a label boundary, a boundary pixel being one whose 4-neighbours are not all of its label (image edges
    are not boundaries). ``gt``: (H, W) or sections-first (S, H, W); each section is masked on its own."""
    from scipy import ndimage

    gt = np.asarray(gt)
    if gt.ndim == 3:
        return np.stack([cremi_border_mask(g, max_dist) for g in gt])
    padded = np.pad(gt, 1, mode="edge")
    interior = (
        (gt == padded[:-2, 1:-1]) & (gt == padded[2:, 1:-1]) & (gt == padded[1:-1, :-2]) & (gt == padded[1:-1, 2:])
    )
    return ndimage.distance_transform_edt(interior) <= max(max_dist, 0)


def cremi_ground_truth(gt: np.ndarray, max_dist: float) -> np.ndarray:
    """Ground truth as CREMI evaluates it: border pixels set to the ignore label ``EM_IGNORE_LABEL``."""
    out = np.array(gt, dtype=np.int64, copy=True)
    out[cremi_border_mask(gt, max_dist)] = EM_IGNORE_LABEL
    return out


def _contingency(seg: np.ndarray, gt: np.ndarray, ignore_gt_zero: bool):
    from scipy import sparse

    seg, gt = np.asarray(seg).ravel(), np.asarray(gt).ravel()
    if ignore_gt_zero:
        keep = gt != EM_IGNORE_LABEL
        seg, gt = seg[keep], gt[keep]
    n = len(gt)
    if n == 0:
        return None, 0
    _, s = np.unique(seg, return_inverse=True)
    _, g = np.unique(gt, return_inverse=True)
    cont = sparse.coo_matrix((np.ones(n), (s, g))).tocsr()
    return cont, n


def variation_of_information(seg: np.ndarray, gt: np.ndarray, ignore_gt_zero: bool = True) -> tuple[float, float]:
    """(split, merge) in bits over the pixels whose ground truth is not the ignore label 0 (CREMI):
    split = H(seg | gt) (over-segmentation), merge = H(gt | seg) (under-segmentation); VOI = split + merge."""
    cont, n = _contingency(seg, gt, ignore_gt_zero)
    if n == 0:
        return float("nan"), float("nan")
    p = cont.data / n
    ps = np.asarray(cont.sum(1)).ravel() / n
    pg = np.asarray(cont.sum(0)).ravel() / n
    h_joint = -(p * np.log2(p)).sum()
    h_s = -(ps[ps > 0] * np.log2(ps[ps > 0])).sum()
    h_g = -(pg[pg > 0] * np.log2(pg[pg > 0])).sum()
    return float(max(h_joint - h_g, 0.0)), float(max(h_joint - h_s, 0.0))


def adapted_rand_error(seg: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """(error, precision, recall) of the adapted Rand index as CREMI's reference code defines it: ground-truth
    label 0 is ignored; predicted label 0 marks unassigned pixels (they count in the ground-truth sizes but
    join no predicted segment); with n_ij the pixels of gt segment i (!= 0) and predicted segment j (!= 0),
    a_i the size of i, b_j the size of j within gt != 0, c the pixels of gt != 0 predicted 0 and n all pixels:
    precision = (sum n_ij^2 + c/n) / (sum b_j^2 + c/n), recall = (sum n_ij^2 + c/n) / sum a_i^2,
    error = 1 - 2PR / (P + R)."""
    from scipy import sparse

    seg, gt = np.asarray(seg).ravel(), np.asarray(gt).ravel()
    n = gt.size
    keep = gt != EM_IGNORE_LABEL
    if not keep.any():
        return float("nan"), float("nan"), float("nan")
    s, g = seg[keep], gt[keep]
    _, gi = np.unique(g, return_inverse=True)
    a = np.bincount(gi).astype(np.float64)
    assigned = s != 0
    c = float((~assigned).sum())
    labels, sj = np.unique(s[assigned], return_inverse=True)
    cont = sparse.coo_matrix(
        (np.ones(int(assigned.sum())), (gi[assigned], sj)), shape=(len(a), max(len(labels), 1))
    ).tocsr()
    sum_ab = float((cont.data**2).sum()) + c / n
    sum_b = float((np.asarray(cont.sum(0)).ravel() ** 2).sum()) + c / n
    sum_a = float((a**2).sum())
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(1 - f), float(precision), float(recall)


def cremi_border_px(spacing=None) -> float:
    """CREMI's border distance in pixels of a volume with ``spacing`` (nm, arrays' axis order, sections first)."""
    pixel = CREMI_PIXEL_NM if spacing is None else float(spacing[-1])
    return CREMI_BORDER_NM / pixel


def instance_per_volume(pred: np.ndarray, target: np.ndarray, spacing=None) -> dict[str, np.ndarray]:
    """Per-volume EM instance metrics under the CREMI convention (``CONVENTIONS['VOI / ARAND']``): ``voi``
    (split + merge, bits), ``voi_split``, ``voi_merge``, ``arand`` and ``cremi_score`` = sqrt(VOI x ARAND)
    (the CREMI leaderboard's combined score). ``spacing``: spacing (nm) in the arrays' axis order (sections
    first), one for every volume or one per volume, for the border mask."""
    rows = []
    spacings = per_volume_spacings(spacing, len(target)) or [None] * len(target)
    for p, t, sp in zip(pred, target, spacings):
        gt = cremi_ground_truth(t, cremi_border_px(sp))
        split, merge = variation_of_information(p, gt)
        rows.append([split, merge, adapted_rand_error(p, gt)[0]])
    vals = np.array(rows, dtype=np.float64).reshape(-1, 3)
    voi = vals[:, 0] + vals[:, 1]
    return {
        "voi": voi,
        "voi_split": vals[:, 0],
        "voi_merge": vals[:, 1],
        "arand": vals[:, 2],
        "cremi_score": np.sqrt(voi * vals[:, 2]),
    }


def summarise_per_volume(
    values: dict[str, np.ndarray],
    patient_ids: np.ndarray | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    prefix: str = "test_",
    min_units: int = MIN_INTERVAL_UNITS,
) -> dict[str, float]:
    """Each per-volume metric's mean with its per-patient (or per-volume) bootstrap interval (none over fewer
    than ``min_units`` units)."""
    out = {}
    for name, v in values.items():
        if np.isfinite(np.asarray(v, dtype=np.float64)).any():
            out.update(volume_bootstrap(v, patient_ids, resamples, level, seed, min_units).as_dict(prefix + name))
    return out


def segmentation_summary(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int,
    patient_ids: np.ndarray | None = None,
    class_names: list[str] | None = None,
    hd95: bool = True,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    spacing=None,
) -> dict[str, float]:
    """Headline segmentation metrics with per-volume (or per-patient) bootstrap intervals: mean foreground
    Dice (+ per class), HD95, detection and FP / FN volumes. ``pred``/``target``: label maps (n_volumes, *spatial)."""
    values = segmentation_per_volume(pred, target, n_classes, class_names, hd95, spacing)
    return summarise_per_volume(values, patient_ids, resamples, level, seed)


def instance_summary(
    pred: np.ndarray,
    target: np.ndarray,
    patient_ids: np.ndarray | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    spacing=None,
) -> dict[str, float]:
    """EM instance metrics per volume with intervals: VOI split / merge / sum and adapted Rand error."""
    return summarise_per_volume(instance_per_volume(pred, target, spacing), patient_ids, resamples, level, seed)


def difference_bootstrap(
    a: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray, np.ndarray],
    metric=macro_auroc,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_units: int = MIN_INTERVAL_UNITS,
) -> Interval:
    """``metric(a) - metric(b)`` of two independent sets of patients (``(y, s, patient_ids)`` each, e.g. an
    internal and an external test set): its percentile interval from resampling the patients of each set on its
    own (independent draws, paired by draw number). No interval when either set has fewer than ``min_units``
    patients; ``units``: the smaller set's patients."""
    units = min(len(set(np.asarray(p).astype(str))) for _, _, p in (a, b))
    value = metric(a[0], a[1]) - metric(b[0], b[1])
    if units < min_units:
        return Interval(value, float("nan"), float("nan"), level, 0, units)
    draws = zip(_patient_resamples(a[2], resamples, seed), _patient_resamples(b[2], resamples, seed + 1))
    values = []
    for ia, ib in draws:
        v = metric(a[0][ia], a[1][ia]) - metric(b[0][ib], b[1][ib])
        if np.isfinite(v):
            values.append(v)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha]) if values else (np.nan, np.nan)
    return Interval(value, float(lo), float(hi), level, len(values), units)
