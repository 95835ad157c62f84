"""Known answers for the thresholded, segmentation and EM metrics, and for the per-volume and paired bootstraps."""

import functools

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from dinoscale.metrics import (
    adapted_rand_error,
    balanced_accuracy,
    choose_thresholds,
    dice_per_volume,
    hd95_per_volume,
    instance_summary,
    macro_f1,
    mean_score,
    multiclass_balanced_accuracy,
    paired_bootstrap,
    patient_bootstrap,
    segmentation_summary,
    variation_of_information,
    volume_bootstrap,
)


def test_f1_and_balanced_accuracy_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3))
    s = rng.random((200, 3)) * 0.6 + 0.4 * y
    t = np.array([0.3, 0.5, 0.7])
    pred = s >= t
    assert macro_f1(y, s, t) == pytest.approx(np.mean([f1_score(y[:, j], pred[:, j]) for j in range(3)]))
    assert balanced_accuracy(y, s, t) == pytest.approx(
        np.mean([balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(3)])
    )
    yc = rng.integers(0, 4, 300)
    sc = rng.random((300, 4)) + np.eye(4)[yc] * 0.5
    assert multiclass_balanced_accuracy(np.eye(4)[yc], sc) == pytest.approx(balanced_accuracy_score(yc, sc.argmax(1)))


def test_threshold_is_chosen_on_val_and_applied_on_test():
    # val scores separate at 0.8 (not at 0.5): the chosen threshold must reach F1 = 1 on val
    y_val = np.array([0, 0, 0, 1, 1])[:, None]
    s_val = np.array([0.6, 0.7, 0.75, 0.8, 0.9])[:, None]
    t = choose_thresholds(y_val, s_val)
    assert t[0] == pytest.approx(0.8)
    y_test = np.array([0, 1])[:, None]
    s_test = np.array([0.78, 0.85])[:, None]
    assert macro_f1(y_test, s_test, t) == 1.0
    assert macro_f1(y_test, s_test, 0.5) < 1.0
    ci = patient_bootstrap(
        y_test, s_test, np.array(["a", "b"]), metric=functools.partial(macro_f1, thresholds=t), resamples=50
    )
    assert ci.value == 1.0


def test_dice_and_hd95_on_hand_made_masks():
    gt = np.zeros((1, 10, 10), int)
    gt[0, 2:6, 2:6] = 1  # 16 pixels
    pred = np.zeros_like(gt)
    pred[0, 2:6, 4:8] = 1  # 16 pixels, 8 overlap
    assert dice_per_volume(pred, gt, 2)[0, 0] == pytest.approx(2 * 8 / 32)
    assert dice_per_volume(gt, gt, 2)[0, 0] == pytest.approx(1.0)
    # a shifted copy: every boundary point is at most 2 px from the other boundary
    assert hd95_per_volume(pred, gt, 2)[0, 0] == pytest.approx(2.0)
    assert hd95_per_volume(gt, gt, 2)[0, 0] == pytest.approx(0.0)
    # Dice is defined on the cases whose ground truth holds the class (AutoPET): absent from the truth it is
    # NaN, whether or not the prediction has it (a spurious prediction is scored by the FP volume instead)
    d = dice_per_volume(gt, gt, 3)
    assert d[0, 0] == pytest.approx(1.0) and np.isnan(d[0, 1])
    assert np.isnan(dice_per_volume(gt, np.zeros_like(gt), 2)[0, 0])
    # a missed (or spurious) structure scores the stated penalty, the field's diagonal (sqrt(10^2 + 10^2) px)
    assert hd95_per_volume(np.zeros_like(gt), gt, 2)[0, 0] == pytest.approx(np.hypot(10, 10))
    assert hd95_per_volume(gt, np.zeros_like(gt), 2)[0, 0] == pytest.approx(np.hypot(10, 10))
    assert np.isnan(hd95_per_volume(np.zeros_like(gt), np.zeros_like(gt), 2)[0, 0])  # absent from both


def test_voi_and_arand_on_hand_made_masks():
    gt = np.array([[1, 1, 2, 2]])
    # perfect
    assert variation_of_information(gt, gt) == (0.0, 0.0)
    assert adapted_rand_error(gt, gt)[0] == pytest.approx(0.0)
    # merge both objects: no split, merge = H(gt | seg) = 1 bit
    merged = np.array([[5, 5, 5, 5]])
    split, merge = variation_of_information(merged, gt)
    assert split == pytest.approx(0.0) and merge == pytest.approx(1.0)
    # split every object in two: split = 1 bit, no merge
    over = np.array([[1, 2, 3, 4]])
    split, merge = variation_of_information(over, gt)
    assert split == pytest.approx(1.0) and merge == pytest.approx(0.0)
    # ARAND by hand, CREMI's definition: merged -> sum n_ij^2 = 2^2 + 2^2 = 8, sum b_j^2 = 4^2 = 16,
    # sum a_i^2 = 8: precision 1/2, recall 1, error = 1 - 2 * (1/2) / (3/2) = 1/3
    err, prec, rec = adapted_rand_error(merged, gt)
    assert (err, prec, rec) == pytest.approx((1 / 3, 0.5, 1.0))
    # gt label 0 is the one ignore label of both VOI and ARAND: a wrong prediction there costs nothing
    gt0 = np.array([[1, 1, 0, 0]])
    assert adapted_rand_error(np.array([[3, 3, 7, 9]]), gt0)[0] == pytest.approx(0.0)
    assert variation_of_information(np.array([[3, 3, 7, 9]]), gt0) == (0.0, 0.0)


def test_dice_per_volume_interval_covers_truth_at_about_nominal_rate():
    """Volumes whose Dice scatters around a known mean: the 90% per-volume interval covers it ~90% of the time."""
    rng = np.random.default_rng(0)
    true_mean, covered, reps = 0.8, 0, 80
    for r in range(reps):
        vals = np.clip(rng.normal(true_mean, 0.08, size=40), 0, 1)
        ci = volume_bootstrap(vals, resamples=300, level=0.9, seed=r)
        covered += ci.low <= true_mean <= ci.high
    assert 0.78 <= covered / reps <= 0.98


def test_segmentation_and_instance_summaries_carry_intervals():
    rng = np.random.default_rng(0)
    gt = (rng.random((6, 16, 16)) > 0.5).astype(int)
    pred = gt.copy()
    pred[:, :2] = 0
    out = segmentation_summary(pred, gt, 2, resamples=100, patient_ids=np.arange(6))
    # six volumes: fewer than the 10 units an interval needs, so none (and no _ci_ keys at all)
    assert "test_dice" in out and "test_dice_ci_low" not in out and "test_hd95_px" in out
    many_gt, many_pred = np.concatenate([gt, gt]), np.concatenate([pred, pred])
    out = segmentation_summary(many_pred, many_gt, 2, resamples=100)
    assert out["test_dice_ci_low"] <= out["test_dice"] <= out["test_dice_ci_high"] < 1
    blocks = np.zeros((6, 32, 32), int)
    blocks[:, :, :16], blocks[:, :, 16:] = 1, 2  # two objects: the border mask leaves their interiors
    inst = instance_summary(blocks, blocks, resamples=50)
    assert inst["test_voi"] == 0 and inst["test_arand"] == pytest.approx(0)


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    n_pat = 80
    y = rng.integers(0, 2, n_pat)[:, None]
    base = rng.normal(size=(n_pat, 1))
    good, bad = y * 1.5 + base, y * 0.3 + base
    pat = np.arange(n_pat)
    d = paired_bootstrap(y, good, bad, pat, resamples=300)
    assert d.difference > 0 and d.low > 0 and d.p_value < 0.05
    same = paired_bootstrap(y, good, good + 1e-9 * rng.normal(size=good.shape), pat, resamples=300)
    assert same.low <= 0 <= same.high
    # per-volume values (segmentation): mean_score compares means
    va, vb = rng.random(30), rng.random(30)
    pv = paired_bootstrap(np.zeros(30), va, vb, np.arange(30), metric=mean_score, resamples=100)
    assert pv.difference == pytest.approx(va.mean() - vb.mean())


def _ten_lesions() -> np.ndarray:
    """One 3D volume with ten separate 2x2x2 lesions of structure 1 (gaps of 2 voxels, so none touch)."""
    gt = np.zeros((4, 8, 40), int)
    for k in range(10):
        gt[1:3, 2:4, 4 * k : 4 * k + 2] = 1
    return gt


def test_lesion_wise_detection_counts_connected_lesions_not_the_structure():
    """Finding 1 of 10 lesions: the per-structure rate says 1.0 (the structure was found), the lesion-wise rate
    0.1; a predicted blob away from every lesion is one false-positive lesion."""
    from dinoscale.metrics import segmentation_per_volume

    gt = _ten_lesions()
    one = np.zeros_like(gt)
    one[1, 2, 0] = 1  # a single voxel inside the first lesion
    one[3, 6, 38] = 1  # one voxel outside every lesion
    seven = gt.copy()
    seven[:, :, 28:] = 0  # lesions 8-10 missed
    out = segmentation_per_volume(np.stack([one, seven, gt]), np.stack([gt, gt, gt]), 2, hd95=False)
    assert out["detection_rate"].tolist() == [1.0, 1.0, 1.0]
    assert out["lesion_detection_rate"].tolist() == pytest.approx([0.1, 0.7, 1.0])
    assert out["false_positive_lesions"].tolist() == [1, 0, 0]
    empty = segmentation_per_volume(np.zeros((1, 4, 8, 40), int), np.zeros((1, 4, 8, 40), int), 2, hd95=False)
    assert np.isnan(empty["lesion_detection_rate"][0])  # no lesion: undefined, not 0 or 1


def test_one_spacing_for_every_volume_equals_the_same_spacing_per_volume():
    """``spacing`` may be one tuple (every volume's) or one per volume; the volumes (ml) and HD95 (mm) agree, and
    a per-volume list scales each volume by its own spacing."""
    from dinoscale.metrics import instance_per_volume, segmentation_per_volume

    gt = np.stack([_ten_lesions()] * 2)
    pred = np.zeros_like(gt)
    pred[:, 1, 6, 38] = 1  # one false-positive voxel in each volume, all lesions missed
    sp = (2.0, 1.0, 0.5)  # 1 mm^3 per voxel
    one = segmentation_per_volume(pred, gt, 2, spacing=sp)
    each = segmentation_per_volume(pred, gt, 2, spacing=[sp, sp])
    assert one["fp_volume_ml"].tolist() == pytest.approx([0.001, 0.001])  # not prod(sp[i]): 0.002, 0.001
    assert one["fn_volume_ml"].tolist() == pytest.approx([0.08, 0.08])  # ten 8-voxel lesions of 1 mm^3
    for k in one:
        np.testing.assert_allclose(one[k], each[k])
    mixed = segmentation_per_volume(pred, gt, 2, spacing=[sp, (1.0, 1.0, 1.0)], hd95=False)
    assert mixed["fn_volume_ml"].tolist() == pytest.approx([0.08, 0.08])
    bigger = segmentation_per_volume(pred, gt, 2, spacing=[sp, (4.0, 1.0, 0.5)], hd95=False)
    assert bigger["fn_volume_ml"].tolist() == pytest.approx([0.08, 0.16])
    inst_one = instance_per_volume(gt, gt, spacing=(40.0, 4.0, 4.0))
    inst_each = instance_per_volume(gt, gt, spacing=[(40.0, 4.0, 4.0)] * 2)
    np.testing.assert_allclose(inst_one["voi"], inst_each["voi"])
    with pytest.raises(ValueError, match="one per volume"):
        segmentation_per_volume(pred, gt, 2, spacing=[sp, sp, sp])
