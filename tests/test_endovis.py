"""2D segmentation of RGB frames: EndoVis 2018 (ISINet's instrument types) and the IoU the field reports.

The end-to-end rehearsal of sweeps/endovis2018.yaml and its broken replicas run in tests/test_rehearse.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import jaccard_score

from dinoscale.data import DataError, prepare_dataset
from dinoscale.data.endovis import INSTRUMENT_TYPES, TEST_SEQUENCES
from dinoscale.data.replicas import get_replica
from dinoscale.metrics import iou_per_volume, segmentation_per_volume
from dinoscale.spec import DatasetSpec


def test_iou_matches_scikit_learn_per_image_and_class_and_skips_absent_structures():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (4, 16, 16))
    target = rng.integers(0, 3, (4, 16, 16))
    pred[1][pred[1] == 2] = 0  # image 1: class 2 only in the ground truth (IoU 0)
    pred[2][pred[2] == 2], target[2][target[2] == 2] = 1, 1  # image 2: class 2 in neither (undefined)
    pred[3], target[3] = 0, 0  # image 3: background only (every IoU undefined)
    per, binary = iou_per_volume(pred, target, 3)
    for i in range(3):
        for c in (1, 2):
            if (pred[i] == c).any() or (target[i] == c).any():
                ref = jaccard_score(target[i].ravel() == c, pred[i].ravel() == c)
                assert per[i, c - 1] == pytest.approx(ref)
        assert binary[i] == pytest.approx(jaccard_score(target[i].ravel() > 0, pred[i].ravel() > 0))
    assert per[1, 1] == 0.0 and np.isnan(per[2, 1])
    assert np.isnan(per[3]).all() and np.isnan(binary[3])
    values = segmentation_per_volume(pred, target, 3, ["a", "b"], hd95=False)
    assert values["iou"][2] == pytest.approx(per[2, 0])  # the mean over the defined structures only
    assert np.isnan(values["iou"][3]) and set(values) >= {"iou", "iou_binary", "iou_a", "iou_b"}


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("endovis")
    return get_replica("endovis2018").write(root, DatasetSpec(name="endovis2018", root=str(root)))


def _prepared(root, tmp_path, **kw):
    return prepare_dataset(DatasetSpec(name="endovis2018", root=str(root), **kw), tmp_path)


def test_endovis_splits_by_sequence_with_isinet_val_as_test_and_keeps_colour(replica, tmp_path):
    ds = _prepared(replica.root, tmp_path)
    m = ds.manifest
    seqs = {s: set(m.loc[m.split == s, "patient_id"]) for s in ("train", "val", "test")}
    assert seqs["test"] == {f"seq{n}" for n in TEST_SEQUENCES}
    assert seqs["val"] and not (seqs["train"] & seqs["val"]) and not (seqs["train"] | seqs["val"]) & seqs["test"]
    assert ds.task == "segmentation" and ds.mask_labels == INSTRUMENT_TYPES and ds.color == "rgb"
    assert all(p.endswith(".png") and "/annotations/" in p for p in m["mask_path"])
    assert m["sample_id"].is_unique


def test_a_frame_without_its_type_map_is_named(replica, tmp_path):
    missing = next((replica.root / "train" / "annotations").iterdir())
    kept = missing.read_bytes()
    missing.unlink()
    try:
        with pytest.raises(DataError, match=f"has no type map {missing}"):
            _prepared(replica.root, tmp_path)
        ds = _prepared(replica.root, tmp_path, on_bad_file="skip")
        assert [s["path"] for s in ds.skipped] == [str(missing)]
    finally:
        missing.write_bytes(kept)
