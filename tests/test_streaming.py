"""Trials that stream: a probe reads the same numbers from a view of the memory-mapped store, a mini-batch at
a time, as from arrays in memory; a trial whose feature set is larger than its memory completes under a real
address-space limit (RLIMIT_AS) by streaming, and fails without streaming."""

import multiprocessing as mp
import re

import numpy as np
import pytest

from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore
from dinoscale.features import rows as rows_mod
from dinoscale.features.rows import RowView
from dinoscale.probes import BagSplit, SegSplit, Split


def _store_rows(tmp_path, x, name="k"):
    key = FeatureKey(FeatureRecipe("b", "w", 32, (0.5,) * 3, (0.25,) * 3, tokens=name), "m")
    store = FeatureStore(tmp_path)
    store.put(key, x, [str(i) for i in range(len(x))])
    return store.get(key).rows


def _views(rows, index, streamed: bool, group=None):
    return RowView(rows, index, group=group, resident_bytes=0 if streamed else 1 << 40)


def _vector_splits(tmp_path, streamed: bool):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (300, 3)).astype(np.float32)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    x[:, :3] += 2 * (2 * y - 1)
    rows = _store_rows(tmp_path, x)
    parts = np.split(rng.permutation(300), [150, 220])
    return [Split(_views(rows, p, streamed), y[p]) for p in parts]


def test_linear_and_knn_give_the_same_numbers_streamed(tmp_path, monkeypatch):
    from dinoscale.probes.knn import KnnProbeSpec, fit_knn
    from dinoscale.probes.linear import LinearProbeSpec, fit_linear

    monkeypatch.setattr(rows_mod, "BLOCK_BYTES", 24 * 4 * 40)  # blocks of 40 rows: several per split
    mem, streamed = _vector_splits(tmp_path, False), _vector_splits(tmp_path, True)
    spec = LinearProbeSpec(epochs=5, batch_size=32, learning_rates=[1e-2, 1e-1], weight_decays=[0.0])
    a, b = fit_linear(spec, *mem), fit_linear(spec, *streamed)
    assert a.selected == b.selected
    np.testing.assert_allclose(a.test_scores, b.test_scores, atol=1e-5)  # statistics merged by blocks in float64
    spec = KnnProbeSpec(ks=[5, 20, 500])
    a, b = fit_knn(spec, *mem), fit_knn(spec, *streamed)
    assert a.selected == b.selected and a.val_metric == pytest.approx(b.val_metric, abs=1e-9)
    np.testing.assert_allclose(a.test_scores, b.test_scores, atol=1e-6)  # the same neighbours, block by block


def test_bag_probe_gives_the_same_numbers_streamed(tmp_path):
    from dinoscale.probes.mil import PoolProbeSpec, fit_pool

    rng = np.random.default_rng(1)
    sizes = rng.integers(3, 9, 60)
    y = rng.integers(0, 2, (60, 1)).astype(np.float32)
    x = rng.normal(size=(int(sizes.sum()), 16)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x[np.repeat(y[:, 0] > 0, sizes), 0] += 1.5
    rows = _store_rows(tmp_path, x)

    def split(bags, streamed):
        return BagSplit([_views(rows, np.arange(starts[i], starts[i] + sizes[i]), streamed) for i in bags], y[bags])

    parts = np.split(np.arange(60), [30, 45])
    spec = PoolProbeSpec(poolings=["mean", "attention"], learning_rates=[1e-2], weight_decays=[0.0], epochs=3)
    a = fit_pool(spec, *[split(p, False) for p in parts])
    b = fit_pool(spec, *[split(p, True) for p in parts])
    assert a.selected == b.selected
    np.testing.assert_allclose(a.test_scores, b.test_scores, atol=1e-5)


def test_segmentation_gives_the_same_label_maps_streamed(tmp_path):
    from dinoscale.probes.segmentation import SegmentationProbeSpec, fit_segmentation

    rng = np.random.default_rng(2)
    n, s, d, h = 12, 3, 8, 4
    y = rng.integers(0, 3, (n, s, 16, 16)).astype(np.int64)
    x = rng.normal(size=(n * s, d, h, h)).astype(np.float32)
    x[:, 0] += np.repeat((y[:, :, ::4, ::4] == 1).reshape(n * s, h, h), 1, 0)  # a learnable signal
    rows = _store_rows(tmp_path, x)
    labels = _store_rows(tmp_path, y.astype(np.float32), "labels")

    def split(items, streamed):
        idx = (items[:, None] * s + np.arange(s)).reshape(-1)
        yv = RowView(labels, items, resident_bytes=0 if streamed else 1 << 40)
        return SegSplit(_views(rows, idx, streamed, group=s), yv if streamed else y[items], items)

    parts = np.split(np.arange(n), [6, 9])
    spec = SegmentationProbeSpec(head="conv", n_classes=3, steps=4, batch_size=2, crop=32, hidden_dim=8)
    a = fit_segmentation(spec, *[split(p, False) for p in parts])
    b = fit_segmentation(spec, *[split(p, True) for p in parts])
    assert a.val_metric == b.val_metric  # the same float32 values in the same mini-batches: identical training
    np.testing.assert_array_equal(a.test_scores, b.test_scores)


def test_a_replicate_regroups_streamed_splits_without_reading_them(tmp_path, monkeypatch):
    """A replicate redraws train / val from their units: views of the store stay views (nothing read until the
    probe asks), and the probe gets the same numbers as from the regrouped arrays."""
    from dinoscale.features.rows import ItemView
    from dinoscale.probes.linear import LinearProbeSpec, fit_linear
    from dinoscale.sweep.inputs import repartition

    monkeypatch.setattr(rows_mod, "BLOCK_BYTES", 24 * 4 * 40)
    mem, streamed = _vector_splits(tmp_path, False), _vector_splits(tmp_path, True)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(mem[0].y) + len(mem[1].y))
    tr, va = order[:170], order[170:]
    a_tr, a_va = repartition(Split(np.asarray(mem[0].x), mem[0].y), Split(np.asarray(mem[1].x), mem[1].y), tr, va)
    b_tr, b_va = repartition(streamed[0], streamed[1], tr, va)
    assert isinstance(b_tr.x, ItemView) and isinstance(b_va.x, ItemView)
    np.testing.assert_array_equal(np.asarray(b_tr.x), a_tr.x)
    np.testing.assert_array_equal(np.asarray(b_va.x[5:9]), a_va.x[5:9])
    np.testing.assert_array_equal(b_tr.y, a_tr.y)
    spec = LinearProbeSpec(epochs=3, batch_size=32, learning_rates=[1e-2, 1e-1], weight_decays=[0.0])
    a, b = fit_linear(spec, a_tr, a_va, mem[2]), fit_linear(spec, b_tr, b_va, streamed[2])
    assert a.selected == b.selected
    np.testing.assert_allclose(a.test_scores, b.test_scores, atol=1e-5)


# ---------------------------------------------------------------- a trial under a memory limit


def _mri_spec(tmp, resident_mb: int):
    from dinoscale.spec import parse_spec

    raw = {
        "name": "mri-stream",
        "modality": "mri",
        "profile": "demo",
        "dataset": {
            "name": "phantom-mri",
            "phantom": {"seed": 0, "n_patients": 120, "images_per_patient": [1, 1], "image_size": 64, "depth": 8},
            "split": {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0},
        },
        "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
        "resolutions": [1024],  # a 64 x 64 grid of 96 dims per slice: 0.75 MiB in float16
        "probes": [{"kind": "segmentation", "head": "linear", "n_classes": 4, "steps": 2, "batch_size": 4, "crop": 32}],
        "features": {"tokens": "patch_grid", "dtype": "float16", "resident_mb": resident_mb},
        "metrics": {"bootstrap": {"resamples": 50}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlruns.db"},
        "storage": {"path": f"{tmp}/store"},
    }
    return parse_spec(raw)


def _vm_size() -> int:
    return int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def _trial_under_limit(tmp, resident_mb, headroom, queue):
    """Run the sweep's trial function for the plan's one cell with RLIMIT_AS = what the process maps after its
    imports and a warm-up + ``headroom``: every further allocation or mapping counts against it."""
    import resource
    from pathlib import Path

    import torch

    from dinoscale.sweep.plan import build_plan
    from dinoscale.sweep.trial import SweepContext, evaluate_cell

    plan = build_plan(_mri_spec(tmp, resident_mb), Path(tmp))
    ds = plan.dataset
    ctx = SweepContext(
        {c.id: c for c in plan.cells},
        ds.classes,
        {s: ds.units(s) for s in ("train", "val", "test")},
        str(plan.storage / "features"),
        "",
        "",
        "",
        mask_labels=dict(ds.mask_labels),
    )
    from monai.losses import DiceCELoss  # noqa: F401  (what the trial imports, loaded before the limit)

    conv = torch.nn.Conv2d(8, 8, 3)
    conv(torch.randn(4, 8, 16, 16)).sum().backward()  # torch's threads and allocator arenas exist already
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + headroom, resource.RLIM_INFINITY))
    try:
        out = evaluate_cell(plan.cells[0], ctx)
        queue.put(("ok", out["metrics"]["test_dice"], out["metrics"]["memory_trial_peak_rss_mb"]))
    except (MemoryError, RuntimeError) as e:
        queue.put(("out of memory", f"{type(e).__name__}: {e}"[:300], 0))


@pytest.mark.slow
def test_a_trial_over_a_feature_set_larger_than_its_memory_completes_by_streaming(tmp_path, monkeypatch):
    from dinoscale.sweep.plan import build_plan

    plan = build_plan(_mri_spec(tmp_path, 64), tmp_path)
    store = FeatureStore(plan.storage / "features")
    rng = np.random.default_rng(0)
    for fs in plan.feature_sets:  # stand-in features (random grids) written as extraction writes them
        src = plan.dataset.sources(fs.split)
        row = (fs.backbone.embed_dim, 64, 64)
        with store.shard_writer(fs.key, 0, 1, fs.n_rows, src.ids, src.n_slices) as w:
            for a in range(0, fs.n_rows, 64):
                rows = np.arange(a, min(fs.n_rows, a + 64))
                w.write(rows, rng.standard_normal((len(rows), *row), dtype=np.float32))
        store.commit(fs.key, 1)
    train_f32 = next(f for f in plan.feature_sets if f.split == "train").float32_bytes
    headroom = 700 << 20
    assert train_f32 > headroom  # the training split alone does not fit in what the trial may map
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    ctx = mp.get_context("spawn")
    results = {}
    for resident_mb in (64, 1 << 20):  # streamed (64 MiB budget), then everything held in memory
        q = ctx.Queue()
        p = ctx.Process(target=_trial_under_limit, args=(str(tmp_path), resident_mb, headroom, q))
        p.start()
        results[resident_mb] = q.get(timeout=900)
        p.join(60)
    status, dice, peak_mb = results[64]
    assert status == "ok", dice
    assert 0.0 <= dice <= 1.0 and peak_mb > 0
    assert results[1 << 20][0] == "out of memory"  # the limit binds: without streaming the same trial fails
