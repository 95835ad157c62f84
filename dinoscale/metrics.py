"""Classification metrics with patient-level bootstrap intervals.

AUROC is the Mann-Whitney statistic with average ranks for ties (identical to scikit-learn's
``roc_auc_score``), vectorised so that a thousand bootstrap resamples take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


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


def macro_auroc(y: np.ndarray, s: np.ndarray) -> float:
    per = auroc_per_class(y, s)
    return float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")


@dataclass
class Interval:
    value: float
    low: float
    high: float
    level: float
    resamples: int  # resamples in which the metric was defined

    def as_dict(self, name: str) -> dict[str, float]:
        return {name: self.value, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}


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
) -> Interval:
    """Percentile interval from resampling *patients* with replacement (all of a patient's images go together)."""
    draws = _patient_resamples(patient_ids, resamples, seed)
    values = []
    for idx in draws:
        v = metric(y[idx], s[idx])
        if np.isfinite(v):
            values.append(v)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha]) if values else (np.nan, np.nan)
    return Interval(metric(y, s), float(lo), float(hi), level, len(values))


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
    values: np.ndarray, patient_ids: np.ndarray | None = None, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Interval for the mean of a per-volume metric (Dice, HD95, VOI...), resampling volumes — or patients
    when ``patient_ids`` is given (a patient's volumes go together). ``values``: (n_volumes,) or (n, C)
    (then the mean is over volumes and classes, NaN entries skipped)."""
    values = np.asarray(values, dtype=np.float64)
    ids = np.arange(len(values)) if patient_ids is None else np.asarray(patient_ids)
    return patient_bootstrap(
        np.zeros(len(values)), values, ids, metric=mean_score, resamples=resamples, level=level, seed=seed
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
            f"{name}_diff_ci_low": self.low,
            f"{name}_diff_ci_high": self.high,
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


def dice_per_volume(
    pred: np.ndarray, target: np.ndarray, n_classes: int, include_background: bool = False
) -> np.ndarray:
    """(N, C') Dice per volume and class from label maps (N, *spatial) with MONAI's ``compute_dice``.

    NaN where a class is absent from both prediction and ground truth (undefined, skipped in means)."""
    from monai.metrics import compute_dice

    p, t = _onehot(pred, n_classes), _onehot(target, n_classes)
    d = compute_dice(p, t, include_background=include_background, ignore_empty=False).numpy().astype(np.float64)
    off = 0 if include_background else 1
    empty = (t.flatten(2).sum(-1) == 0) & (p.flatten(2).sum(-1) == 0)
    d[empty[:, off:].numpy()] = np.nan
    return d


def hd95_per_volume(pred: np.ndarray, target: np.ndarray, n_classes: int, spacing=None) -> np.ndarray:
    """(N, C-1) 95th-percentile Hausdorff distance per volume and foreground class (MONAI), in pixels or
    ``spacing`` units. NaN where the class is missing from the prediction or the ground truth."""
    import warnings

    from monai.metrics import compute_hausdorff_distance

    p, t = _onehot(pred, n_classes), _onehot(target, n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns per empty class (handled below) and about its own deprecations
        h = (
            compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=spacing)
            .numpy()
            .astype(np.float64)
        )
    missing = (t.flatten(2).sum(-1) == 0) | (p.flatten(2).sum(-1) == 0)
    h[missing[:, 1:].numpy()] = np.nan
    h[~np.isfinite(h)] = np.nan
    return h


# ---------------------------------------------------------------- EM instance segmentation


def _contingency(seg: np.ndarray, gt: np.ndarray, ignore_gt_zero: bool):
    from scipy import sparse

    seg, gt = np.asarray(seg).ravel(), np.asarray(gt).ravel()
    if ignore_gt_zero:
        keep = gt != 0
        seg, gt = seg[keep], gt[keep]
    _, s = np.unique(seg, return_inverse=True)
    _, g = np.unique(gt, return_inverse=True)
    n = len(gt)
    cont = sparse.coo_matrix((np.ones(n), (s, g))).tocsr()
    return cont, n


def variation_of_information(seg: np.ndarray, gt: np.ndarray, ignore_gt_zero: bool = False) -> tuple[float, float]:
    """(split, merge) in bits: split = H(seg | gt) (over-segmentation), merge = H(gt | seg)
    (under-segmentation); VOI = split + merge. Same convention as ``skimage.metrics.variation_of_information``."""
    cont, n = _contingency(seg, gt, ignore_gt_zero)
    if n == 0:
        return float("nan"), float("nan")
    p = cont.data / n
    ps = np.asarray(cont.sum(1)).ravel() / n
    pg = np.asarray(cont.sum(0)).ravel() / n
    h_joint = -(p * np.log2(p)).sum()
    h_s = -(ps[ps > 0] * np.log2(ps[ps > 0])).sum()
    h_g = -(pg[pg > 0] * np.log2(pg[pg > 0])).sum()
    return float(h_joint - h_g), float(h_joint - h_s)


def adapted_rand_error(seg: np.ndarray, gt: np.ndarray, ignore_gt_zero: bool = True) -> tuple[float, float, float]:
    """(error, precision, recall) of the adapted Rand index (SNEMI3D / CREMI definition, as in
    ``skimage.metrics.adapted_rand_error``): pixels labelled 0 in ``gt`` are ignored by default."""
    cont, n = _contingency(seg, gt, ignore_gt_zero)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    sum_p = (cont.data**2).sum()
    sum_s = (np.asarray(cont.sum(1)).ravel() ** 2).sum()  # predicted segments
    sum_g = (np.asarray(cont.sum(0)).ravel() ** 2).sum()  # true segments
    precision = (sum_p - n) / (sum_s - n) if sum_s > n else 1.0
    recall = (sum_p - n) / (sum_g - n) if sum_g > n else 1.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(1 - f), float(precision), float(recall)


def segmentation_per_volume(
    pred: np.ndarray, target: np.ndarray, n_classes: int, class_names: list[str] | None = None, hd95: bool = True
) -> dict[str, np.ndarray]:
    """Per-volume values from label maps (n_volumes, *spatial): ``dice`` (mean over the foreground classes
    present in the prediction or the ground truth), ``dice_<class>`` and ``hd95`` (mean over classes, in
    voxels). NaN where undefined (a class absent from both; HD95 of a missed or spurious class)."""
    names = class_names or [str(c) for c in range(1, n_classes)]
    import warnings

    d = dice_per_volume(pred, target, n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: volumes without any structure
        out = {"dice": np.nanmean(d, axis=1), **{f"dice_{n}": d[:, j] for j, n in enumerate(names)}}
        if hd95:
            out["hd95"] = np.nanmean(hd95_per_volume(pred, target, n_classes), axis=1)
    return out


def instance_per_volume(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-volume EM instance metrics: ``voi`` (split + merge, bits), ``voi_split``, ``voi_merge``, ``arand``."""
    vals = np.array([[*variation_of_information(p, t), adapted_rand_error(p, t)[0]] for p, t in zip(pred, target)])
    return {"voi": vals[:, 0] + vals[:, 1], "voi_split": vals[:, 0], "voi_merge": vals[:, 1], "arand": vals[:, 2]}


def summarise_per_volume(
    values: dict[str, np.ndarray],
    patient_ids: np.ndarray | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    prefix: str = "test_",
) -> dict[str, float]:
    """Each per-volume metric's mean with its per-patient (or per-volume) bootstrap interval."""
    out = {}
    for name, v in values.items():
        if np.isfinite(np.asarray(v, dtype=np.float64)).any():
            out.update(volume_bootstrap(v, patient_ids, resamples, level, seed).as_dict(prefix + name))
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
) -> dict[str, float]:
    """Headline segmentation metrics with per-volume (or per-patient) bootstrap intervals: mean foreground
    Dice (+ per class) and HD95. ``pred``/``target``: label maps (n_volumes, *spatial)."""
    values = segmentation_per_volume(pred, target, n_classes, class_names, hd95)
    return summarise_per_volume(values, patient_ids, resamples, level, seed)


def instance_summary(
    pred: np.ndarray,
    target: np.ndarray,
    patient_ids: np.ndarray | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """EM instance metrics per volume with intervals: VOI split / merge / sum and adapted Rand error."""
    return summarise_per_volume(instance_per_volume(pred, target), patient_ids, resamples, level, seed)
