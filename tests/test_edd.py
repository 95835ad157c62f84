"""Multi-label (overlapping) segmentation and EDD2020: bit-packed label maps, the sigmoid head, the per-structure
metrics against scikit-learn, and the adapter on its replica in the release layout.

The end-to-end rehearsal of sweeps/endoscopy-edd2020.yaml and its broken replicas run in tests/test_rehearse.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score

from dinoscale.data import DataError, prepare_dataset
from dinoscale.data.edd import CLASSES, STRUCTURES
from dinoscale.data.replicas import get_replica
from dinoscale.metrics import multilabel_per_volume, pack_labels, unpack_labels
from dinoscale.probes.registry import SegSplit
from dinoscale.probes.segmentation import SegmentationProbeSpec, fit_segmentation
from dinoscale.spec import DatasetSpec
from dinoscale.tasks import Scoring, get_task


def test_packed_labels_keep_overlapping_structures():
    rng = np.random.default_rng(0)
    binary = rng.random((5, 7, 9)) < 0.5  # overlapping everywhere
    packed = pack_labels(binary)
    assert packed.dtype == np.uint8 and packed.max() <= 31
    assert (unpack_labels(packed[None], 5)[0] == binary).all()
    with pytest.raises(ValueError, match="at most 8"):
        pack_labels(np.zeros((9, 2, 2), bool))


def test_per_structure_dice_and_iou_match_scikit_learn_with_the_empty_case_conventions():
    rng = np.random.default_rng(1)
    k = 3
    p = rng.random((4, k, 12, 12)) < 0.4
    t = rng.random((4, k, 12, 12)) < 0.4
    p[1, 2], t[1, 2] = True, False  # image 1: structure 3 predicted, absent from the ground truth
    p[2, 1], t[2, 1] = False, False  # image 2: structure 2 in neither map
    p[3], t[3] = False, False  # image 3: nothing anywhere
    v = multilabel_per_volume(
        np.stack([pack_labels(x) for x in p]), np.stack([pack_labels(x) for x in t]), k + 1, ["a", "b", "c"]
    )
    for i in range(4):
        for c, name in enumerate("abc"):
            gt, pr = t[i, c].ravel(), p[i, c].ravel()
            if gt.any():
                assert v[f"dice_{name}"][i] == pytest.approx(f1_score(gt, pr))
            else:  # positive cases only (as the label-map Dice)
                assert np.isnan(v[f"dice_{name}"][i])
            if gt.any() or pr.any():
                assert v[f"iou_{name}"][i] == pytest.approx(jaccard_score(gt, pr))
            else:  # neither map holds it: undefined
                assert np.isnan(v[f"iou_{name}"][i])
    assert v["iou_c"][1] == 0.0 and np.isnan(v["dice_c"][1]) and v["false_positive_rate"][1] == 1.0
    assert v["iou"][2] == pytest.approx(np.mean([v["iou_a"][2], v["iou_c"][2]]))  # mIoU over defined structures
    assert np.isnan(v["dice"][3]) and np.isnan(v["iou"][3])


def _toy(n: int, rng: np.random.Generator, side: int = 8, up: int = 4):
    """Token grids whose channels 0 / 1 say 'in A' / 'in B' (+ noise), and label maps where A (the left
    columns) and B (the right columns) overlap in a middle band of each image: the band is both at once."""
    x = rng.normal(0, 0.3, (n, 8, side, side)).astype(np.float32)
    binary = np.zeros((n, 2, side * up, side * up), bool)
    for i in range(n):
        a_end = int(rng.integers(4, 7))  # A: columns [0, a_end); B: [a_end - 2, side): 2 token columns overlap
        b_start = a_end - 2
        x[i, 0, :, :a_end] += 2.0
        x[i, 1, :, b_start:] += 2.0
        binary[i, 0, :, : a_end * up] = True
        binary[i, 1, :, b_start * up :] = True
    return x, binary


def test_the_sigmoid_head_fits_overlapping_structures_a_softmax_label_map_cannot_hold():
    rng = np.random.default_rng(0)
    splits = []
    for n in (12, 4, 6):
        x, binary = _toy(n, rng)
        packed = np.stack([pack_labels(b) for b in binary])
        splits.append((SegSplit(x, packed, np.arange(n).astype(str), multilabel=True), binary))
    (train, _), (val, _), (test, test_binary) = splits
    spec = SegmentationProbeSpec(n_classes=3, steps=80, batch_size=4, crop=32, learning_rates=[1e-2])
    result = fit_segmentation(spec, train, val, test, seed=0)
    v = multilabel_per_volume(result.test_scores, test.y, 3, ["A", "B"])
    assert np.nanmean(v["dice_A"]) > 0.8 and np.nanmean(v["dice_B"]) > 0.8
    both = unpack_labels(result.test_scores, 2).all(1)  # pixels predicted A and B at once
    assert (both & test_binary.all(1)).sum() > 0.8 * test_binary.all(1).sum()
    # a single-label map gives the band to one structure: the best it can do for B (band given to A) stays lower
    single = np.where(test_binary[:, 0], 1, np.where(test_binary[:, 1], 2, 0))
    as_bits = np.stack([pack_labels(np.stack([s == 1, s == 2])) for s in single])
    oracle = multilabel_per_volume(as_bits, test.y, 3, ["A", "B"])
    assert np.nanmean(oracle["dice_B"]) < 0.8 < np.nanmean(v["dice_B"])


def test_the_task_scores_per_structure_with_patient_intervals():
    rng = np.random.default_rng(2)
    p = np.stack([pack_labels(rng.random((2, 6, 6)) < 0.5) for _ in range(12)])
    t = np.stack([pack_labels(rng.random((2, 6, 6)) < 0.5) for _ in range(12)])
    ids = [f"f{i}" for i in range(12)]
    s = Scoring(ids, np.asarray(ids), np.zeros((12, 0)), structures={1: "BE", 2: "HGD"}, n_classes=3, resamples=50)
    task = get_task("multilabel_segmentation")
    metrics, table = task.score(p, t, s)
    assert task.overlapping and task.dense and not task.finetunable and task.headline.name == "dice"
    assert {"test_dice", "test_iou", "test_dice_BE", "test_iou_HGD"} <= set(metrics)
    assert "test_dice_ci_low" in metrics and list(table["sample_id"]) == ids
    assert not get_task("segmentation").overlapping


# ---------------------------------------------------------------- the adapter on its replica


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("edd")
    return get_replica("edd2020").write(root, DatasetSpec(name="edd2020", root=str(root)))


def _prepared(root, tmp_path, **kw):
    return prepare_dataset(DatasetSpec(name="edd2020", root=str(root), **kw), tmp_path)


def test_edd_composes_the_per_class_masks_on_the_smallest_frame_grid(replica, tmp_path):
    ds = _prepared(replica.root, tmp_path)
    m = ds.manifest
    assert ds.task == "multilabel_segmentation" and ds.mask_labels == STRUCTURES and ds.color == "rgb"
    assert list(STRUCTURES.values()) == list(CLASSES) == ["BE", "suspicious", "HGD", "cancer", "polyp"]
    assert m["sample_id"].is_unique and (m["sample_id"] == m["patient_id"]).all()  # the frame is the unit
    assert set(m["split"]) == {"train", "val", "test"}
    sizes = {Image.open(p).size for p in m["path"]}
    assert len(sizes) > 1  # frames of several sizes
    grid = (min(h for _, h in sizes), min(w for w, _ in sizes))
    for _, row in m.iterrows():
        packed = np.asarray(Image.open(row["mask_path"]))
        assert packed.shape == grid
        stem = row["sample_id"]
        for bit, cls in STRUCTURES.items():
            f = replica.root / "masks" / f"{stem}_{cls}.tif"
            on = (packed >> (bit - 1) & 1).astype(bool)
            if not f.is_file():  # a missing mask file: the class is absent
                assert not on.any()
            else:
                assert on.any() and on.mean() == pytest.approx((tifffile.imread(f) > 0).mean(), abs=0.05)
    overlap = [np.asarray(Image.open(p)) for p in m["mask_path"]]
    assert any(((a & 1) > 0).any() and ((a & 1) & (a >> 1 | a >> 2) > 0).any() for a in overlap)  # BE overlaps


def test_edd_refuses_an_unknown_class_and_a_mask_that_does_not_fit_its_frame(replica, tmp_path):
    first = sorted((replica.root / "masks").glob("*.tif"))[0]
    odd = first.with_name(first.name.rsplit("_", 1)[0] + "_ulcer.tif")
    first.rename(odd)
    try:
        with pytest.raises(DataError, match=f"{odd}: class label 'ulcer' outside"):
            _prepared(replica.root, tmp_path)
    finally:
        odd.rename(first)
    kept = tifffile.imread(first)
    tifffile.imwrite(first, kept[:-4])
    try:
        with pytest.raises(DataError, match=f"{first}: mask of shape .* does not match its frame .*\\.jpg"):
            _prepared(replica.root, tmp_path / "b")
    finally:
        tifffile.imwrite(first, kept)


def test_a_multilabel_map_with_a_structure_beyond_the_probe_is_named(tmp_path):
    from dinoscale.data.masks import load_label_maps

    f = tmp_path / "m.png"
    Image.fromarray(pack_labels(np.ones((3, 4, 4), bool))).save(f)  # structures 1-3
    assert load_label_maps([str(f)], None, 4, multilabel=True)[0].max() == 7
    with pytest.raises(DataError, match=r"structure\(s\) \[3\] of a bit-packed multi-label map beyond"):
        load_label_maps([str(f)], None, 3, multilabel=True)
