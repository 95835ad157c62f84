"""Feature store keys, atomic writes, verification; extraction of CLS ⊕ mean-patch features."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore, FeatureStoreError
from dinoscale.features.extract import extract_features, pool_tokens, recipe_for

RECIPE = FeatureRecipe("vit_small_patch16_dinov3", "random-seed0", 64, (0.5,) * 3, (0.25,) * 3, dtype="float16")
KEY = FeatureKey(RECIPE, "abc123")


def test_the_key_is_the_recipe_applied_to_rows():
    # every recipe field: tests/test_recipe.py
    assert FeatureKey(RECIPE.with_(resolution=128), "abc123").digest != KEY.digest
    assert FeatureKey(RECIPE, "def").digest != KEY.digest
    assert FeatureKey(RECIPE, "abc123").digest == KEY.digest


def test_put_get_roundtrip_stores_float16(tmp_path):
    store = FeatureStore(tmp_path)
    x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    assert not store.has(KEY)
    store.put(KEY, x, [f"s{i}" for i in range(10)])
    assert store.has(KEY)
    fs = store.get(KEY)
    assert fs.features.dtype == np.float16 and fs.sample_ids[3] == "s3"
    np.testing.assert_allclose(fs.features, x, atol=1e-2)
    assert store.get(KEY.digest).meta["shape"] == [10, 8]


def test_corruption_is_detected_on_read(tmp_path):
    store = FeatureStore(tmp_path)
    path = store.put(KEY, np.ones((4, 4), np.float32), list("abcd"))
    data = next(path.glob("shard-*.npy"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(FeatureStoreError, match="checksum mismatch"):
        store.get(KEY)


def test_a_killed_writer_leaves_nothing_readable(tmp_path):
    store = FeatureStore(tmp_path)

    class Boom(np.ndarray):
        def astype(self, *a, **k):
            raise KeyboardInterrupt  # the writer dies mid-write

    with pytest.raises(KeyboardInterrupt):
        store.put(KEY, np.ones((3, 3)).view(Boom), list("abc"))
    assert not store.has(KEY)
    assert not any(tmp_path.rglob("*.npy")) and not any(tmp_path.rglob("*.json"))


def _writer(root, seed):
    FeatureStore(root).put(KEY, np.full((256, 64), seed, np.float32), [str(i) for i in range(256)])


def test_concurrent_writers_of_one_key_leave_one_valid_entry(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    fs = FeatureStore(tmp_path).get(KEY)  # verified checksum: one writer's complete copy
    assert len(np.unique(fs.features)) == 1
    assert len(list(tmp_path.rglob("meta.json"))) == 1
    assert not list(tmp_path.rglob(".tmp-*"))


def test_pool_tokens_excludes_registers():
    t = torch.zeros(1, 5 + 4, 2)
    t[0, 0] = 1.0  # CLS
    t[0, 1:5] = 100.0  # registers: must not leak into the patch mean
    t[0, 5:] = torch.tensor([2.0, 4.0])
    assert pool_tokens(t, 5, "cls_mean_patch").tolist() == [[1.0, 1.0, 2.0, 4.0]]
    assert pool_tokens(t, 5, "cls").tolist() == [[1.0, 1.0]]
    assert pool_tokens(t, 5, "mean_patch").tolist() == [[2.0, 4.0]]


def test_extract_features_from_files(tmp_path):
    from PIL import Image

    from dinoscale.models import load_backbone

    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (80, 80), dtype=np.uint8)).save(p)
        paths.append(str(p))
    bb = load_backbone("dinov3-demo-xs", "random", 0)
    feats, stats = extract_features(bb, recipe_for(bb, 48), paths, batch_size=2, device=torch.device("cpu"))
    assert feats.shape == (5, 2 * 96)
    assert stats.images == 5 and stats.forward_passes == 3
    again, _ = extract_features(bb, recipe_for(bb, 48), paths[2:3], batch_size=1, device=torch.device("cpu"))
    np.testing.assert_allclose(again[0], feats[2], atol=1e-5)  # batch composition does not change a sample's features


# ---------------------------------------------------------------- object storage through fsspec


@pytest.fixture
def mem_store(tmp_path):
    import uuid

    import fsspec

    url = f"memory://dinoscale-{uuid.uuid4().hex[:8]}/features"
    yield FeatureStore(url, cache_dir=tmp_path / "node-cache")
    mem = fsspec.filesystem("memory")
    if mem.exists(url):
        mem.rm(url, recursive=True)


def test_object_store_roundtrip_and_verification(mem_store, tmp_path):
    assert not mem_store.local and not mem_store.has(KEY)
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    loc = mem_store.put(KEY, x, list("abcdef"))
    fs = mem_store.get(KEY)
    assert fs.features.dtype == np.float16 and fs.sample_ids == list("abcdef")
    np.testing.assert_allclose(fs.features, x, atol=1e-2)
    assert [m["digest"] for m in mem_store.entries()] == [KEY.digest]
    # shards are read from a verified local copy; a node that downloads a damaged object refuses it
    assert list((tmp_path / "node-cache" / "shards").glob("*.npy"))
    data = f"{loc}/{fs.meta['shards'][0]['file']}"
    raw = bytearray(mem_store.fs.cat_file(data))
    raw[-1] ^= 0xFF
    mem_store.fs.pipe_file(data, bytes(raw))
    other_node = FeatureStore(mem_store.url, cache_dir=tmp_path / "other-node")
    with pytest.raises(FeatureStoreError, match="checksum mismatch"):
        other_node.get(KEY)
    assert other_node.verify(KEY.digest) is not None
    assert mem_store.remove(KEY.digest) and not mem_store.has(KEY) and mem_store.entries() == []


def test_object_store_killed_writer_leaves_only_an_orphan(mem_store, monkeypatch):
    real = mem_store.fs.pipe_file

    def die_before_commit(path, value, **kw):
        if path.endswith(".json"):
            raise KeyboardInterrupt  # killed between the data PUT and its commit
        return real(path, value, **kw)

    monkeypatch.setattr(mem_store.fs, "pipe_file", die_before_commit)
    with pytest.raises(KeyboardInterrupt):
        mem_store.put(KEY, np.ones((3, 3), np.float32), list("abc"))
    monkeypatch.setattr(mem_store.fs, "pipe_file", real)
    assert not mem_store.has(KEY) and mem_store.entries() == []
    with pytest.raises(FeatureStoreError, match="not in the store"):
        mem_store.get(KEY)
    orphans = mem_store.stale(older_than_s=0)
    assert len(orphans) == 1 and orphans[0].endswith(".npy") and "shard-00000-of-00001" in orphans[0]
    mem_store.put(KEY, np.ones((3, 3), np.float32), list("abc"))  # a later writer commits normally
    assert mem_store.get(KEY).features.shape == (3, 3)


def test_object_store_concurrent_writers_end_with_one_valid_entry(mem_store):
    import threading

    barrier = threading.Barrier(4)
    real_has = mem_store.has

    def racing_has(key):  # every writer passes the "already there?" check before any commits
        result = real_has(key)
        if not result and threading.current_thread() is not threading.main_thread():
            try:
                barrier.wait(timeout=5)
            except threading.BrokenBarrierError:
                pass
        return result

    mem_store.has = racing_has
    threads = [
        threading.Thread(target=mem_store.put, args=(KEY, np.full((64, 8), i, np.float32), [str(j) for j in range(64)]))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    mem_store.has = real_has
    fs = mem_store.get(KEY)  # verified: meta.json names one writer's complete data
    assert len(np.unique(fs.features)) == 1 and len(mem_store.entries()) == 1


def test_local_store_remove_and_stale_leftovers(tmp_path):
    store = FeatureStore(tmp_path)
    store.put(KEY, np.ones((2, 2), np.float32), ["a", "b"])
    (tmp_path / KEY.digest[:2] / ".tmp-deadbeef-1234").mkdir()
    assert store.stale(older_than_s=3600) == []  # may still be a live writer
    assert len(store.stale(older_than_s=0)) == 1
    assert store.remove(KEY.digest) and not store.has(KEY) and not store.remove(KEY.digest)


def test_store_accepts_a_file_url(tmp_path):
    store = FeatureStore(f"file://{tmp_path}")
    assert store.local
    store.put(KEY, np.ones((2, 2), np.float32), ["a", "b"])
    assert FeatureStore(tmp_path).has(KEY)
