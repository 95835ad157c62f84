"""Fused extraction (issue 31): each file decoded once per sweep for every feature set that reads it, features
byte for byte those of one pass per feature set, and a killed fused extraction resumed with its finished
shards kept."""

import multiprocessing as mp
import os
import signal
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import tiny_spec_dict
from dinoscale.data import readers
from dinoscale.features import FeatureStore
from dinoscale.features.extract import extract_volume_features, extract_volume_slices, recipe_for
from dinoscale.features.fused import FusedTarget, PassRows, Segment, extract_fused
from dinoscale.models import load_backbone
from dinoscale.spec import parse_spec
from dinoscale.sweep import budget
from dinoscale.sweep.extraction import plan_fused_jobs, plan_jobs, run_fused_job, run_job
from dinoscale.sweep.plan import build_plan

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def xs():
    return load_backbone("dinov3-demo-xs", "random", seed=0)


def _counting_reads(monkeypatch, name: str) -> Counter:
    """Every call of the reader ``name`` (read_image / read_volume) counted per file, in this process (the CPU
    runs the loaders in-process: no workers)."""
    reads, real = Counter(), getattr(readers, name)

    def read(path, *a, **k):
        reads[str(path)] += 1
        return real(path, *a, **k)

    monkeypatch.setattr(readers, name, read)
    return reads


def test_a_fused_sweep_decodes_each_image_once_and_stores_the_same_bytes(tmp_path, monkeypatch):
    """2 backbones x 2 resolutions x 3 splits: 12 feature sets, each file read once instead of 4 times."""
    raw = tiny_spec_dict(tmp_path)
    raw["dataset"]["phantom"].update({"n_patients": 12, "images_per_patient": [1, 2], "image_size": 64})
    plan = build_plan(parse_spec(raw), tmp_path)
    assert len(plan.missing) == 12
    reads = _counting_reads(monkeypatch, "read_image")
    for job in plan_jobs(plan):
        run_job(job, str(tmp_path / "unfused"))
    files = set(reads)
    assert set(reads.values()) == {4}  # today: once per backbone x resolution
    reads.clear()
    jobs = plan_fused_jobs(plan)
    assert len(jobs) == 1 and len(jobs[0].backbones) == 2  # small sets: one task, both encoders on one device
    out = [run_fused_job(job, str(tmp_path / "fused")) for job in jobs]
    assert set(reads) == files and set(reads.values()) == {1}
    assert sum(r["decodes"] for r in out) == len(files) and sum(r["stored"] for r in out) == 12
    assert out[0]["extraction_images_per_second"] > 0 and 0 < out[0]["extraction_decode_share"] < 1
    unfused, fused = FeatureStore(tmp_path / "unfused"), FeatureStore(tmp_path / "fused")
    for f in plan.missing:
        a, b = unfused.get(f.key), fused.get(f.key)
        assert a.ids == b.ids and np.asarray(a.features).tobytes() == np.asarray(b.features).tobytes()


class Sink:
    """A shard sink in memory (``write`` rows from the shard's first one; ``close`` keeps them)."""

    def __init__(self, out: dict, key):
        self.out, self.key, self.parts = out, key, []

    def write(self, rows, values):
        self.parts.append((np.asarray(rows), np.asarray(values)))

    def close(self):
        n = max(int(r.max()) for r, _ in self.parts) + 1
        full = np.empty((n, *self.parts[0][1].shape[1:]), np.float32)
        for r, v in self.parts:
            full[r] = v
        self.out[self.key] = full

    def abort(self):
        self.parts = []


def _target(backbone, recipe, shards, out):
    return FusedTarget(backbone, recipe, [Segment(a, b, lambda k=(recipe, a): Sink(out, k)) for a, b in shards])


def _volume(path, shape, scale=1.0, seed=0):
    a = (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(path))
    return str(path)


def test_volumes_pooled_and_sliced_from_one_read_match_one_read_per_set(xs, tmp_path, monkeypatch):
    paths = [_volume(tmp_path / f"v{i}.nii.gz", (40, 36, 5 + i), seed=i) for i in range(3)]
    pooled = recipe_for(xs, 32, view="volumes", pool="mean_max", antialias="gaussian")
    pooled48 = recipe_for(xs, 48, view="volumes", pool="mean", antialias="gaussian")
    sliced = recipe_for(xs, 32, view="slices", antialias="gaussian", tokens="patch_grid")
    shards = {pooled: [(0, 2), (2, 3)], pooled48: [(0, 3)], sliced: [(1, 3)]}  # shard 0 of `sliced` committed before
    out: dict = {}
    reads = _counting_reads(monkeypatch, "read_volume")
    rows = PassRows(paths, n_slices=[5, 6, 7])
    stats = extract_fused([_target(xs, r, s, out) for r, s in shards.items()], rows, CPU, batch_size=4)
    assert stats.decodes == 3 and set(reads.values()) == {1} and stats.inputs == 18 + 18 + 13
    for a, b in shards[pooled]:
        ref, _ = extract_volume_features(xs, pooled, paths[a:b], CPU, batch_size=4, num_workers=0)
        assert out[(pooled, a)].tobytes() == ref.tobytes()
    ref, _ = extract_volume_features(xs, pooled48, paths, CPU, batch_size=4, num_workers=0)
    assert out[(pooled48, 0)].tobytes() == ref.tobytes()
    ref, _ = extract_volume_slices(xs, sliced, paths[1:], [6, 7], device=CPU, batch_size=4, num_workers=0)
    assert out[(sliced, 1)].tobytes() == ref.tobytes()


def test_pet_ct_slices_from_one_read_of_each_file_match_one_read_per_set(xs, tmp_path, monkeypatch):
    cts = [_volume(tmp_path / f"ct{i}.nii.gz", (24, 24, 4), 300.0, i) for i in range(2)]
    pets = [_volume(tmp_path / f"pet{i}.nii.gz", (24, 24, 4), 4.0, 10 + i) for i in range(2)]
    recipes = [
        recipe_for(xs, res, window=(-160, 240), view="slices", antialias="gaussian", fusion="pet") for res in (32, 48)
    ]
    out: dict = {}
    reads = _counting_reads(monkeypatch, "read_volume")
    rows = PassRows(cts, pets, [4, 4])
    stats = extract_fused([_target(xs, r, [(0, 2)], out) for r in recipes], rows, CPU, batch_size=3)
    assert stats.decodes == 4 and set(reads) == set(cts + pets) and set(reads.values()) == {1}
    for r in recipes:
        ref, _ = extract_volume_slices(xs, r, cts, [4, 4], pets, device=CPU, batch_size=3, num_workers=0)
        assert out[(r, 0)].tobytes() == ref.tobytes()


def test_encoders_that_do_not_fit_one_device_are_split_into_passes(tmp_path):
    raw = tiny_spec_dict(tmp_path)
    raw["dataset"]["phantom"].update({"n_patients": 12, "images_per_patient": [1, 2], "image_size": 64})
    raw["resources"] = {**raw.get("resources", {}), "gpu_memory_gib": 0.001}
    plan = build_plan(parse_spec(raw), tmp_path)
    jobs = plan_fused_jobs(plan)
    assert sorted(b for j in jobs for b, _, _ in j.backbones) == ["dinov3-demo-s", "dinov3-demo-xs"]
    assert all(len(j.backbones) == 1 and j.extra["fused_groups"] == 2 for j in jobs)
    feed = budget.fused_feed(plan, budget.this_machine())  # what `dinoscale plan` shows: the same 2 passes
    assert [f.backbones for f in feed] == [("dinov3-demo-xs",), ("dinov3-demo-s",)]
    assert all(f.bound in ("decode", "encoder") and f.workers == 0 for f in feed)  # the CPU decodes inline


# ---------------------------------------------------------------- killed and resumed


def _sharded_plan(tmp_path):
    raw = tiny_spec_dict(tmp_path, resolutions=[32])
    raw["dataset"]["phantom"].update({"n_patients": 12, "images_per_patient": [1, 2], "image_size": 64})
    raw["features"] = {**raw.get("features", {}), "batch_size": 4, "shard_forward_passes": 6}
    return build_plan(parse_spec(raw), tmp_path)


def _extract_and_die(tmp, victim):
    """Run the fused jobs in order; SIGKILL this process while shard ``victim`` of a train set is half written."""
    from pathlib import Path

    from dinoscale.features.store import ShardWriter

    real = ShardWriter.write

    def write(self, rows, values):
        real(self, rows, values)
        if self.index == victim and self.count > 1 and self.extra["split"] == "train":
            os.kill(os.getpid(), signal.SIGKILL)

    ShardWriter.write = write
    plan = _sharded_plan(Path(tmp))
    for job in plan_fused_jobs(plan):
        run_fused_job(job, str(plan.storage / "features"))


@pytest.mark.slow
def test_a_killed_fused_extraction_resumes_with_its_finished_shards_kept(tmp_path):
    plan = _sharded_plan(tmp_path)
    train = [f for f in plan.feature_sets if f.split == "train"]
    count = len(train[0].shards)
    assert count >= 2 and len(train) == 2
    p = mp.get_context("spawn").Process(target=_extract_and_die, args=(str(tmp_path), 1))
    p.start()
    p.join(300)
    assert p.exitcode == -signal.SIGKILL
    store = FeatureStore(plan.storage / "features")
    assert [store.shards_committed(f.key, count) for f in train] == [[0], [0]]  # both encoders' first shard
    kept = {f: os.stat(f).st_mtime_ns for f in (plan.storage / "features").rglob("shard-*-of-*.npy")}

    jobs = plan_fused_jobs(_sharded_plan(tmp_path))
    redone = [(s.key, s.index) for j in jobs for s in j.shards if s.split == "train"]
    assert sorted(i for _, i in redone) == sorted(list(range(1, count)) * 2)
    for job in jobs:
        run_fused_job(job, str(plan.storage / "features"))
    assert all(store.has(f.key) for f in plan.feature_sets)
    assert all(os.stat(f).st_mtime_ns == t for f, t in kept.items())  # finished shards were not rewritten
