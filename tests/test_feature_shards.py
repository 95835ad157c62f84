"""Sharded feature sets: rows streamed to .npy shards and read back through mmap windows; a shard killed
mid-write leaves nothing readable and is redone alone; an interrupted sharded extraction keeps its
finished shards when resumed."""

import json
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest

from conftest import tiny_spec_dict
from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore, FeatureStoreError
from dinoscale.features import store as store_mod

KEY = FeatureKey(
    FeatureRecipe(
        "vit_small_patch16_dinov3",
        "random-seed0",
        64,
        (0.5,) * 3,
        (0.25,) * 3,
        view="slices",
        tokens="patch_grid",
        antialias="gaussian",
        dtype="float16",
    ),
    "abc",
)


def test_rows_stream_in_any_order_and_read_back_through_small_windows(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3, 2, 2)).astype(np.float32) for n in (5, 7)]
    ids = [[f"v{i}" for i in range(2)], [f"v{i}" for i in range(2, 4)]]
    rows_per_id = [[2, 3], [4, 3]]
    for s, (x, i, r) in enumerate(zip(parts, ids, rows_per_id)):
        with store.shard_writer(KEY, s, 2, len(x), i, r, extra={"split": "train"}) as w:
            order = rng.permutation(len(x))  # rows arrive out of order (several loader workers)
            for chunk in np.array_split(order, 3):
                w.write(chunk, x[chunk])
        assert store.has_shard(KEY, s, 2) and not store.has(KEY)
    store.commit(KEY, 2)
    fs = store.get(KEY)
    full = np.concatenate(parts).astype(np.float16)
    assert fs.rows.shape == (12, 3, 2, 2) and fs.ids == ["v0", "v1", "v2", "v3"] and fs.rows_per_id == [2, 3, 4, 3]
    assert fs.sample_ids[:3] == ["v0#0", "v0#1", "v1#0"] and len(fs.sample_ids) == 12
    monkeypatch.setattr(store_mod, "READ_WINDOW_BYTES", 50)  # a window holds two rows: many maps per read
    idx = rng.integers(0, 12, 40)
    np.testing.assert_array_equal(fs.rows.take(idx), full[idx])
    np.testing.assert_array_equal(np.asarray(fs.features), full)
    np.testing.assert_array_equal(fs.rows[3:9], full[3:9])
    np.testing.assert_array_equal(np.concatenate(list(fs.rows.blocks(100))), full)
    assert fs.meta["bytes"] == sum(os.path.getsize(s.path) for s in fs.rows.shards) == store.nbytes(KEY.digest)
    assert fs.meta["split"] == "train" and store.verify(KEY.digest) is None


def test_an_unfinished_shard_is_refused(tmp_path):
    store = FeatureStore(tmp_path)
    w = store.shard_writer(KEY, 0, 1, 4, ["a"], [4])
    w.write([0, 1], np.ones((2, 3), np.float32))
    with pytest.raises(FeatureStoreError, match=r"rows \[2, 3\] never written"):
        w.close()
    w.abort()
    assert not store.has_shard(KEY, 0, 1) and not list(tmp_path.rglob("*.npy"))
    with pytest.raises(FeatureStoreError, match="shard 0 of 1 is not committed"):
        store.commit(KEY, 1)


def test_entries_of_the_previous_format_are_still_read(tmp_path):
    """Format 2: one features.npy written whole, sample ids in meta.json."""
    from dinoscale.digest import sha256_file

    d = tmp_path / KEY.digest[:2] / KEY.digest
    d.mkdir(parents=True)
    x = np.arange(12, dtype=np.float16).reshape(4, 3)
    np.save(d / "features.npy", x)
    meta = {
        "key": {},
        "digest": KEY.digest,
        "shape": [4, 3],
        "dtype": "float16",
        "data_file": "features.npy",
        "sha256": sha256_file(d / "features.npy"),
        "sample_ids": list("abcd"),
    }
    (d / "meta.json").write_text(json.dumps(meta))
    fs = FeatureStore(tmp_path).get(KEY)
    np.testing.assert_array_equal(np.asarray(fs.features), x)
    assert fs.sample_ids == list("abcd") and FeatureStore(tmp_path).verify(KEY.digest) is None
    assert FeatureStore(tmp_path).stale(older_than_s=0) == []  # its data file is referenced


def test_trials_find_each_units_rows_in_both_formats(tmp_path):
    """A unit's rows by id, in unit order (not store order); slices of a volume stay together and must match
    the manifest's count; a store written by format 2 (one '<volume>#<k>' id per row) reads alike."""
    from dinoscale.data import SplitUnits
    from dinoscale.digest import sha256_file
    from dinoscale.sweep.inputs import unit_rows

    units = SplitUnits(["b", "a"], np.array(["p", "q"]), np.zeros((2, 0), np.float32), n_slices=[2, 3])
    new = FeatureStore(tmp_path / "new")
    with new.shard_writer(KEY, 0, 1, 5, ["a", "b"], [3, 2]) as w:
        w.write(np.arange(5), np.arange(5, dtype=np.float32)[:, None])
    new.commit(KEY, 1)
    old_root = tmp_path / "old"
    d = old_root / KEY.digest[:2] / KEY.digest
    d.mkdir(parents=True)
    np.save(d / "features.npy", np.arange(5, dtype=np.float16)[:, None])
    (d / "meta.json").write_text(
        json.dumps(
            {
                "digest": KEY.digest,
                "shape": [5, 1],
                "dtype": "float16",
                "sha256": sha256_file(d / "features.npy"),
                "sample_ids": ["a#0", "a#1", "a#2", "b#0", "b#1"],
            }
        )
    )
    for store in (new, FeatureStore(old_root)):
        rows, index, per_unit = unit_rows(store, KEY.digest, "train", units, "slices")
        assert index.tolist() == [3, 4, 0, 1, 2] and per_unit.tolist() == [2, 3]
        np.testing.assert_array_equal(rows.take(index)[:, 0], [3, 4, 0, 1, 2])
    units.n_slices[1] = 4
    with pytest.raises(RuntimeError, match="other slice counts than the manifest"):
        unit_rows(new, KEY.digest, "train", units, "slices")


# ---------------------------------------------------------------- real extraction, killed and resumed


def _sharded_plan(tmp_path, **features):
    from dinoscale.spec import parse_spec
    from dinoscale.sweep.plan import build_plan

    raw = tiny_spec_dict(tmp_path, resolutions=[32], backbones=[{"name": "dinov3-demo-xs", "weights": "random"}])
    raw["features"] = {**raw.get("features", {}), "batch_size": 4, **features}
    return build_plan(parse_spec(raw), tmp_path)


def _extract_and_die(tmp, victim_index):
    """Run the extraction jobs in order; SIGKILL this process while shard ``victim_index`` of the train set
    is half written (no cleanup handler runs: what a lost node does)."""
    from pathlib import Path

    from dinoscale.features.store import ShardWriter
    from dinoscale.sweep.extraction import plan_jobs, run_job

    real = ShardWriter.write

    def write(self, rows, values):
        real(self, rows, values)
        if self.index == victim_index and self.count > 1 and self._written.sum() > 0:
            os.kill(os.getpid(), signal.SIGKILL)

    ShardWriter.write = write
    plan = _sharded_plan(Path(tmp), shard_forward_passes=24)
    for job in sorted(plan_jobs(plan), key=lambda j: [(s.split != "train", s.index) for s in j.shards]):
        run_job(job, str(plan.storage / "features"))


@pytest.mark.slow
def test_a_shard_killed_mid_write_leaves_nothing_readable_and_is_redone_alone(tmp_path):
    from dinoscale.sweep.extraction import plan_jobs, run_job

    plan = _sharded_plan(tmp_path, shard_forward_passes=24)
    train = next(f for f in plan.feature_sets if f.split == "train")
    count = len(train.shards)
    assert count >= 2
    victim = count - 1
    p = mp.get_context("spawn").Process(target=_extract_and_die, args=(str(tmp_path), victim))
    p.start()
    p.join(300)
    assert p.exitcode == -signal.SIGKILL

    store = FeatureStore(plan.storage / "features")
    assert not store.has(train.key)  # nothing readable...
    with pytest.raises(FeatureStoreError, match="not in the store"):
        store.get(train.key)
    assert store.shards_committed(train.key, count) == list(range(victim))  # ...but the finished shards are kept
    leftovers = store.stale(older_than_s=0)
    assert len(leftovers) == 1 and ".tmp-shard-" in leftovers[0] and os.path.getsize(leftovers[0]) > 0
    kept = {f: os.stat(f).st_mtime_ns for f in (plan.storage / "features").rglob("shard-*-of-*.npy")}

    replanned = _sharded_plan(tmp_path, shard_forward_passes=24)
    again = next(f for f in replanned.feature_sets if f.split == "train")
    assert again.committed_shards == victim
    jobs = [j for j in plan_jobs(replanned) if any(s.key == train.key for s in j.shards)]
    assert [(s.index, s.count) for j in jobs for s in j.shards if s.key == train.key] == [(victim, count)]
    for job in plan_jobs(replanned):
        run_job(job, str(replanned.storage / "features"))
    assert store.has(train.key)
    for f, mtime in kept.items():
        assert os.stat(f).st_mtime_ns == mtime  # finished shards were not rewritten
    # the resumed entry holds what an uninterrupted extraction gives
    clean = _sharded_plan(tmp_path / "clean", shard_forward_passes=24)
    for job in plan_jobs(clean):
        run_job(job, str(clean.storage / "features"))
    ref = FeatureStore(clean.storage / "features").get(train.key)
    got = store.get(train.key)
    assert got.ids == ref.ids
    np.testing.assert_array_equal(np.asarray(got.features), np.asarray(ref.features))


@pytest.mark.slow
def test_a_resumed_sharded_extraction_keeps_finished_shards(tmp_path, ray_local):
    """Through the Ray stage: a damaged image in the last shard stops the stage with a message naming the
    shard (the jobs still pending are cancelled); the shards committed before are kept and, once the file is
    repaired, the rerun extracts exactly the shards that are missing."""
    from dinoscale.data import DataError
    from dinoscale.features import FeatureStore
    from dinoscale.sweep.extraction import run_extraction_stage

    plan = _sharded_plan(tmp_path, shard_forward_passes=16)
    test = next(f for f in plan.feature_sets if f.split == "test")
    train = next(f for f in plan.feature_sets if f.split == "train")
    assert len(train.shards) >= 3
    bad = plan.dataset.sources("test").part(*test.shards[-1]).items[0]  # in the last job submitted
    original = open(bad, "rb").read()
    damaged = bytearray(original)
    damaged[len(damaged) // 3 : len(damaged) // 3 + 64] = bytes(64)  # same size: the manifest digest is unchanged
    open(bad, "wb").write(bytes(damaged))
    store_root = plan.storage / "features"
    # one job at a time (each asks for every CPU of the embedded Ray): the jobs run in the order submitted, so
    # the train shards are all committed when the test split's last shard meets the bad file
    one_at_a_time = ray_local.cluster_resources()["CPU"]
    with pytest.raises(
        DataError, match=r"(?s)extraction of dinov3-demo-xs@32: test images.*shards already committed are kept"
    ):
        run_extraction_stage(plan, store_root, one_at_a_time, 0)
    store = FeatureStore(store_root)
    done = {(f.key.digest, i) for f in plan.feature_sets for i in store.shards_committed(f.key, len(f.shards))}
    total = sum(len(f.shards) for f in plan.feature_sets)
    assert store.has(train.key) and 0 < len(done) < total
    kept = {f: os.stat(f).st_ino for f in store_root.rglob("shard-*-of-*.npy")}

    open(bad, "wb").write(original)
    replanned = _sharded_plan(tmp_path, shard_forward_passes=16)
    cached = {f.key.digest for f in replanned.feature_sets if f.cached}
    assert sum(f.committed_shards for f in replanned.feature_sets) == len([d for d in done if d[0] not in cached])
    seen: list[tuple[int, int]] = []  # the progress bar's feed, from the tasks through the counter actor
    report = run_extraction_stage(replanned, store_root, 1, 0, on_progress=lambda d, t: seen.append((d, t)))
    assert report.shards_extracted == total - len(done)
    rows = sum(b - a for f in replanned.missing for i, (a, b) in enumerate(f.shards) if (f.key.digest, i) not in done)
    assert seen and seen[-1] == (rows, rows) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert all(store.has(f.key) for f in replanned.feature_sets)
    for f, inode in kept.items():
        assert os.stat(f).st_ino == inode  # finished shards were not rewritten
    sizes = {r["digest"]: r for r in report.per_feature_set}
    assert sizes[train.key.digest]["measured_bytes"] == sizes[train.key.digest]["predicted_bytes"]
