"""Logistic regression, 3D pooling, ABMIL, segmentation / affinity heads and the per-cell search."""

import numpy as np
import pytest
import torch

from conftest import separable_splits as _separable
from dinoscale.metrics import adapted_rand_error, macro_auroc
from dinoscale.probes import BagSplit, SegSplit, run_probe
from dinoscale.probes.knn import KnnProbeSpec
from dinoscale.probes.logreg import LogRegProbeSpec
from dinoscale.probes.mil import ABMIL, AbmilProbeSpec, PoolProbeSpec, _pad
from dinoscale.probes.segmentation import (
    AffinityProbeSpec,
    SegmentationProbeSpec,
    affinity_targets,
    agglomerate_affinities,
    build_head,
)
from dinoscale.search import search_probe
from dinoscale.spec import parse_spec


def test_logreg_probe_on_separable_data_ranks_almost_perfectly():
    train, val, test = _separable()
    res = run_probe(LogRegProbeSpec(kind="logreg", cs=[0.01, 1.0]), train, val, test)
    assert macro_auroc(test.y, res.test_scores) > 0.995
    assert res.selected["C"] in (0.01, 1.0) and res.candidates == 2


def _bags(n_bags=60, d=8, seed=0, witness=True):
    """Positive bags hold one 'witness' instance (shifted feature 0) among 5-15 noise instances."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n_bags, 1)).astype(np.float32)
    bags = []
    for i in range(n_bags):
        b = rng.normal(size=(rng.integers(5, 16), d)).astype(np.float32)
        if y[i, 0]:
            b[rng.integers(len(b)), 0] += 6.0 if witness else 0.0
        bags.append(b)
    return BagSplit(bags, y)


def test_pool_probe_prefers_max_or_attention_when_one_slice_carries_the_label():
    train, val, test = _bags(seed=0), _bags(40, seed=1), _bags(40, seed=2)
    res = run_probe(
        PoolProbeSpec(
            kind="pool", learning_rates=[1e-2], weight_decays=[0.0], epochs=25, batch_size=16, attention_dim=16
        ),
        train,
        val,
        test,
    )
    assert res.candidates == 3 and res.selected["pooling"] in ("max", "attention")
    assert macro_auroc(test.y, res.test_scores) > 0.9


def test_abmil_finds_the_witness_instance_and_ignores_padding():
    train, val, test = _bags(seed=0), _bags(40, seed=1), _bags(40, seed=2)
    res = run_probe(
        AbmilProbeSpec(kind="abmil", hidden_dim=16, dropout=0.0, learning_rates=[1e-2], epochs=25), train, val, test
    )
    assert macro_auroc(test.y, res.test_scores) > 0.9
    model = ABMIL(8, 1, hidden=16).eval()
    small, big = torch.randn(3, 8), torch.randn(20, 8)
    alone = model(*_pad([small]))
    padded = model(*_pad([small, big]))[:1]
    torch.testing.assert_close(alone, padded)


def test_a_slide_dataset_gives_bags_of_tile_rows_in_order_with_per_slide_labels(tmp_path):
    """What a MIL trial reads: the dataset's units group tile rows per slide (first appearance order)."""
    import pandas as pd

    from dinoscale.data import DataError, PreparedDataset

    df = pd.DataFrame(
        {
            "sample_id": ["v2/a", "v2/b", "v1/a", "v2/c", "v1/b"],
            "patient_id": ["p2", "p2", "p1", "p2", "p1"],
            "bag_id": ["v2", "v2", "v1", "v2", "v1"],
            "path": ["x"] * 5,
            "split": ["train"] * 5,
            "tumor": [1, 1, 0, 1, 0],
        }
    )
    units = PreparedDataset("toy", "mil", ["tumor"], df, {}, tmp_path).units("train")
    assert units.sample_ids == ["v2", "v1"] and units.labels.tolist() == [[1], [0]]
    assert units.row_groups("images") == [["v2/a", "v2/b", "v2/c"], ["v1/a", "v1/b"]]
    df.loc[4, "tumor"] = 1  # one tile of v1 says tumour, the other normal: a slide has one label
    with pytest.raises(DataError, match=r"bag\(s\) \['v1'\]"):
        PreparedDataset("toy", "mil", ["tumor"], df, {}, tmp_path).units("train")


def _seg_data(n, seed, volumetric=False):
    """Token grids whose channel 0 is the (downsampled) mask: a linear head can read it off."""
    rng = np.random.default_rng(seed)
    shape = (n, 3) if volumetric else (n,)
    masks = np.zeros((*shape, 32, 32), np.int64)
    for idx in np.ndindex(*shape):
        r, c = rng.integers(0, 4, 2) * 4
        masks[idx][r * 2 : r * 2 + 16, c * 2 : c * 2 + 8] = 1
    tok = masks.reshape(*shape, 8, 4, 8, 4).mean(axis=(-3, -1)).astype(np.float32)  # (.., 8, 8)
    x = rng.normal(size=(*shape, 6, 8, 8)).astype(np.float32) * 0.3
    x[..., 0, :, :] += 2 * tok
    return SegSplit(x, masks)


@pytest.mark.parametrize("head,volumetric", [("linear", False), ("conv", False), ("conv3d", True), ("linear", True)])
def test_segmentation_heads_learn_a_readable_mask(head, volumetric):
    train, val, test = (_seg_data(n, s, volumetric) for n, s in ((12, 0), (4, 1), (6, 2)))
    spec = SegmentationProbeSpec(
        kind="segmentation",
        head=head,
        learning_rates=[5e-2 if head == "linear" else 1e-2],
        steps=30,
        batch_size=4,
        hidden_dim=16,
    )
    res = run_probe(spec, train, val, test)
    assert res.test_scores.shape == test.y.shape
    from dinoscale.metrics import dice_per_volume

    # the linear head upsamples an 8x8 grid bilinearly: object edges blur, Dice stays under 0.8
    floor = 0.6 if head == "linear" else 0.8
    assert np.nanmean(dice_per_volume(res.test_scores, test.y, 2)) > floor and res.val_metric > floor


def test_head_output_shapes():
    x2, x3 = torch.randn(2, 6, 4, 4), torch.randn(2, 3, 6, 4, 4)
    assert build_head("linear", 6, 3)(x2, (64, 64)).shape == (2, 3, 64, 64)
    assert build_head("conv", 6, 3, 8)(x2, (64, 64)).shape == (2, 3, 64, 64)
    assert build_head("conv3d", 6, 3, 8, volumetric=True)(x3, (3, 64, 64)).shape == (2, 3, 3, 64, 64)
    assert build_head("conv", 6, 3, 8, volumetric=True)(x3, (3, 64, 64)).shape == (2, 3, 3, 64, 64)


def test_affinities_round_trip_to_the_same_instances():
    labels = np.zeros((1, 8, 8), np.int64)
    labels[0, :3, :3] = 1
    labels[0, 5:, :] = 2
    labels[0, :3, 5:] = 3
    aff = affinity_targets(torch.as_tensor(labels))[0].numpy()
    assert aff.shape == (2, 8, 8)
    seg = agglomerate_affinities(aff, 0.5, min_size=2)
    assert adapted_rand_error(seg, labels[0])[0] == pytest.approx(0.0)
    assert len(np.unique(seg)) == 4  # three objects + background
    # a single cut edge row between two touching objects keeps them apart; removing it merges them
    assert agglomerate_affinities(np.ones((2, 4, 4)), 0.5).max() == 1


def test_affinity_probe_runs_and_selects_a_threshold():
    base = _seg_data(14, 0)
    # instances: label connected blobs 1..k; here one blob per image
    train, val, test = (
        SegSplit(base.x[:8], base.y[:8]),
        SegSplit(base.x[8:11], base.y[8:11]),
        SegSplit(base.x[11:], base.y[11:]),
    )
    spec = AffinityProbeSpec(
        kind="affinity", learning_rates=[1e-2], steps=10, batch_size=4, hidden_dim=8, thresholds=[0.5, 0.9]
    )
    res = run_probe(spec, train, val, test)
    assert res.test_scores.shape == test.y.shape and res.selected["threshold"] in (0.5, 0.9)
    assert res.val_metric == pytest.approx(-res.extra["val_voi"]) and res.extra["val_voi"] >= 0
    assert 0 <= res.extra["val_arand"] <= 1


def test_search_probe_uses_a_fixed_budget_and_reports_the_val_choice():
    train, val, test = _separable(n=160)
    res, study = search_probe(KnnProbeSpec(kind="knn", ks=[5, 10]), train, val, test, n_trials=4, seed=0)
    assert study.n_complete == 4 and "temperature" in res.selected and "k" in res.selected
    assert res.val_metric == pytest.approx(study.best_value)
    again, _ = search_probe(KnnProbeSpec(kind="knn", ks=[5, 10]), train, val, test, n_trials=4, seed=0)
    assert again.selected == res.selected  # seeded TPE: same study, same choice


def test_new_probe_kinds_parse_in_a_sweep_spec(tiny_spec):
    raw = tiny_spec.model_dump(mode="json")
    # a dataset whose task only its data tells (the spec cannot refuse a probe for its task before reading it)
    raw["dataset"] = {"name": "manifest", "root": "data"}
    raw["probes"] = [
        {"kind": "logreg"},
        {"kind": "pool"},
        {"kind": "abmil"},
        {"kind": "segmentation", "head": "conv"},
        {"kind": "affinity"},
    ]
    spec = parse_spec(raw)
    assert [p.label for p in spec.probes] == ["logreg", "pool", "abmil", "seg-conv", "affinity"]
    raw["probes"] = [{"kind": "abmil", "hiden_dim": 3}]
    with pytest.raises(Exception, match="hidden_dim"):
        parse_spec(raw)
