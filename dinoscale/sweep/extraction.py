"""Extraction stage: every missing feature set of the plan is computed exactly once, as Ray tasks.

A feature set is cut by the plan into contiguous shards of its split's manifest (``FeatureSetPlan.shards``:
a few for a large split, one for a small one). The unit of work is the shard: it is extracted and
committed to the store on its own (``FeatureStore.shard_writer``), so a lost worker loses the shard it
was writing and nothing else, and a rerun extracts only the shards that are not committed. The feature
set is committed (merged into its one key) once all its shards are.

Shards are packed into Ray tasks per (backbone, weights, resolution), up to
``features.shard_forward_passes`` backbone inputs per task: the small feature sets of a demo share one
task and one model load, as before; a large feature set's shards are tasks of their own, spread over the
cluster's GPUs (one GPU per task where the cluster has GPUs). A task killed with its node is retried by
Ray (``max_retries``), skipping the shards committed meanwhile. Trials never extract.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from dinoscale import record
from dinoscale.data import RowSources
from dinoscale.errors import UserError, user_error_of
from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore
from dinoscale.features.extract import extract_features, extract_volume_features, extract_volume_slices, pick_device
from dinoscale.features.fused import FusedTarget, PassRows, Segment, extract_fused
from dinoscale.memory import PeakRSS
from dinoscale.models import gflops_per_image, load_backbone
from dinoscale.sweep import budget, cost
from dinoscale.sweep.plan import FeatureSetPlan, Plan, plan_node_memory
from dinoscale.sweep.preflight import with_room_needed
from dinoscale.sweep.progress import CountingWriter, ProgressCounter


@dataclass
class ShardInputs:
    """One shard of one feature set: manifest rows ``start:stop`` of a split, in one view."""

    split: str
    key: FeatureKey  # its recipe (how a unit becomes features) and the split's rows
    index: int
    count: int
    sources: RowSources  # the shard's rows as the readers open them
    start: int = 0  # its first manifest row in the split
    backbone: str = ""  # the backbone that extracts it (fused jobs: one of the job's encoders)

    @property
    def recipe(self) -> FeatureRecipe:
        return self.key.recipe

    @property
    def view(self) -> str:  # images | volumes | slices (dinoscale.probes.registry.VIEWS)
        return self.key.recipe.view

    @property
    def paths(self) -> list[str]:
        return self.sources.items

    @property
    def n_rows(self) -> int:
        return sum(self.sources.n_slices) if self.view == "slices" else len(self.sources.ids)

    @property
    def forward_passes(self) -> int:
        return sum(self.sources.forward_passes())

    @property
    def label(self) -> str:
        return f"{self.split} {self.view}" + (f" shard {self.index + 1}/{self.count}" if self.count > 1 else "")

    def row_ids(self) -> list[str]:
        """The ids of the stored rows: one per image or volume, or ``<volume>#<slice>`` per slice."""
        return self.sources.row_ids(self.view)


@dataclass
class ExtractionJob:
    """One Ray task: shards of one backbone x weights x resolution, extracted with one model load. What each
    shard computes is its recipe (``ShardInputs.recipe``); the job says only which model to load and how
    fast to run (the batch size decides no value)."""

    backbone: str
    weights: str
    weights_seed: int
    resolution: int
    batch_size: int
    shards: list[ShardInputs]
    extra: dict = field(default_factory=dict)  # stored with every shard (e.g. the predicted peak memory)

    @property
    def recipes(self) -> list[FeatureRecipe]:
        return list(dict.fromkeys(s.recipe for s in self.shards))

    @property
    def label(self) -> str:
        return f"{self.backbone}@{self.resolution}"


@dataclass
class ExtractionReport:
    feature_sets_extracted: int = 0  # committed by this stage
    feature_sets_cached: int = 0  # committed before it
    shards_extracted: int = 0
    shards_cached: int = 0  # shards of unfinished feature sets committed by an earlier, interrupted run
    images: int = 0  # backbone inputs forwarded: 2D images, or slices of volumes
    forward_batches: int = 0
    forward_seconds: float = 0.0
    wall_seconds: float = 0.0
    decodes: int = 0  # files read by the stage's tasks (a PET beside its CT is a file of its own)
    files: int = 0  # distinct files of the entries the stage extracted
    decode_seconds: float = 0.0  # of the tasks' time, reading files (fused tasks measure it)
    per_job: list[dict] = field(default_factory=list)
    per_feature_set: list[dict] = field(default_factory=list)  # predicted vs measured bytes of every set

    @property
    def decodes_per_file(self) -> float:
        return self.decodes / self.files if self.files else 0.0

    def add(self, res: dict) -> None:
        """One task's figures (``run_job`` / ``run_fused_job``)."""
        self.per_job.append(res)
        self.feature_sets_extracted += res["stored"]
        self.shards_extracted += res["shards_stored"]
        self.images += res["slices"]  # backbone inputs: 2D images, or slices of volumes
        self.forward_batches += res["batches"]
        self.forward_seconds += res["forward_seconds"]
        self.decodes += res["decodes"]
        self.decode_seconds += res.get("decode_seconds", 0.0)


def _shard_sources(plan: Plan, fs: FeatureSetPlan) -> list[RowSources]:
    src = plan.rows(fs)
    return [src.part(a, b) for a, b in (fs.shards or [(0, len(src.ids))])]


def plan_jobs(plan: Plan, store: FeatureStore | None = None) -> list[ExtractionJob]:
    """The Ray tasks of the extraction stage: the plan's missing shards (those not committed yet), packed."""
    if plan.dataset is None:
        raise RuntimeError(f"cannot extract without data: {plan.dataset_error}")
    spec = plan.spec
    store = store or FeatureStore(plan.storage / "features")
    groups: dict[tuple, list[tuple[ShardInputs, float]]] = {}
    for fs in plan.missing:
        parts = _shard_sources(plan, fs)
        done = set(store.shards_committed(fs.key, len(parts)))
        for i, src in enumerate(parts):
            if i not in done:
                shard = ShardInputs(fs.label, fs.key, i, len(parts), src)
                groups.setdefault((fs.backbone, fs.resolution), []).append((shard, fs.extraction_peak))
    jobs = []
    for (bb, res), shards in groups.items():
        packs, current, load = [], [], 0
        for shard, peak in shards:  # up to shard_forward_passes inputs per task, at least one shard
            if current and load + shard.forward_passes > spec.features.shard_forward_passes:
                packs.append(current)
                current, load = [], 0
            current.append((shard, peak))
            load += shard.forward_passes
        packs.append(current)
        jobs.extend(
            ExtractionJob(
                bb.name,
                bb.weights,
                bb.weights_seed,
                res,
                spec.features.batch_size,
                [s for s, _ in pack],
                {"predicted_peak_bytes": max(p for _, p in pack)},
            )
            for pack in packs
        )
    return jobs


@dataclass
class FusedPass:
    """Manifest rows ``start:stop`` of one split, decoded once, and the missing shards of every feature set of
    the pass's encoders that reads them (each shard inside the range: the range's ends are shard ends of all)."""

    split: str
    start: int
    stop: int
    sources: RowSources
    shards: list[ShardInputs]

    @property
    def label(self) -> str:
        return f"{self.split} rows {self.start}:{self.stop}"


@dataclass
class FusedJob:
    """One Ray task of fused extraction: its encoders loaded once and sharing the device, and the passes they
    extract (``dinoscale.features.fused``). ``backbones``: (name, weights, weights seed) of each encoder."""

    backbones: list[tuple[str, str, int]]
    passes: list[FusedPass]
    batch_size: int
    extra: dict = field(default_factory=dict)

    @property
    def shards(self) -> list[ShardInputs]:
        return [s for p in self.passes for s in p.shards]

    @property
    def label(self) -> str:
        return ", ".join(dict.fromkeys(f"{s.backbone}@{s.recipe.resolution}" for s in self.shards))


def _common_cuts(sets: list[FeatureSetPlan], n: int) -> list[tuple[int, int]]:
    """Ranges of a split whose ends are shard ends of every feature set in ``sets`` (a shard never straddles two
    passes; sets sharded alike, as by ``features.shard_forward_passes``, keep every shard end)."""
    cuts = set.intersection(*[{b for _, b in (f.shards or [(0, n)])} for f in sets]) | {0}
    ends = sorted(c for c in cuts if c <= n)
    return list(zip(ends[:-1], ends[1:]))


def fused_encoder_groups(plan: Plan) -> list[cost.FusedGroup]:
    """The encoders of the missing feature sets in fused passes: one pass where they fit one GPU (the spec's
    ``resources.gpu_memory_gib``) and one task's host memory (the node's, ``plan_node_memory``), else several."""
    spec = plan.spec
    node, _ = plan_node_memory(spec.resources)
    return cost.fused_groups(plan.missing, spec.features.batch_size, spec.resources.gpu_memory_gib * 2**30, node)


def plan_fused_jobs(plan: Plan, store: FeatureStore | None = None) -> list[FusedJob]:
    """The Ray tasks of fused extraction: per pass group of encoders and split, ranges of the split's rows cut at
    shard ends common to its feature sets, each with the shards not yet committed, packed up to
    ``features.shard_forward_passes`` inputs a task (one decode per input, whatever the number of sets)."""
    if plan.dataset is None:
        raise RuntimeError(f"cannot extract without data: {plan.dataset_error}")
    store = store or FeatureStore(plan.storage / "features")
    jobs, groups = [], fused_encoder_groups(plan)
    for group in groups:
        sets = [f for f in plan.missing if f.backbone.name in group.backbones]
        rows = dict.fromkeys((f.external, f.split) for f in sets)  # the internal splits and each external set
        passes = [
            p
            for source in rows
            for p in _fused_passes(plan, [f for f in sets if (f.external, f.split) == source], store)
        ]
        for job in _pack_fused(plan, sets, passes, group):
            job.extra["fused_groups"] = len(groups)  # passes over each file: 1 where every encoder fits one device
            jobs.append(job)
    return jobs


def _fused_passes(plan: Plan, sets: list[FeatureSetPlan], store: FeatureStore) -> list[FusedPass]:
    """``sets``: feature sets of the same rows (one split, or one external test set's: ``Plan.rows``)."""
    src, split = plan.rows(sets[0]), sets[0].label
    missing = []
    for f in sets:
        ranges = list(f.shards or [(0, len(src.ids))])
        done = set(store.shards_committed(f.key, len(ranges)))
        missing += [(f, i, a, b, len(ranges)) for i, (a, b) in enumerate(ranges) if i not in done]
    passes = []
    for a, b in _common_cuts(sets, len(src.ids)):
        shards = [
            ShardInputs(split, f.key, i, count, src.part(sa, sb), sa, f.backbone.name)
            for f, i, sa, sb, count in missing
            if a <= sa and sb <= b
        ]
        if shards:
            passes.append(FusedPass(split, a, b, src.part(a, b), shards))
    return passes


def _pack_fused(plan: Plan, sets: list[FeatureSetPlan], passes: list[FusedPass], group) -> list[FusedJob]:
    spec, infos = plan.spec, {f.backbone.name: f.backbone for f in sets}
    packs, current, load = [], [], 0
    for p in passes:
        n = sum(p.sources.forward_passes())
        if current and load + n > spec.features.shard_forward_passes:
            packs.append(current)
            current, load = [], 0
        current.append(p)
        load += n
    if current:
        packs.append(current)
    return [
        FusedJob(
            [(b.name, b.weights, b.weights_seed) for n in group.backbones if (b := infos.get(n)) is not None],
            pack,
            spec.features.batch_size,
            {"predicted_peak_bytes": group.host_bytes},
        )
        for pack in packs
    ]


def _extract_shard(backbone, job: ExtractionJob, s: ShardInputs, writer, device):
    """One shard through the extractor: its recipe and its rows, nothing else decides the features."""
    run = {"device": device, "out": writer, "batch_size": job.batch_size}
    if s.view == "volumes":
        return extract_volume_features(backbone, s.recipe, s.paths, **run)[1]
    if s.view == "slices":
        pet = s.sources.channels.get("pet")
        return extract_volume_slices(backbone, s.recipe, s.paths, s.sources.n_slices, pet, **run)[1]
    return extract_features(backbone, s.recipe, s.paths, **run)[1]


def run_job(job: ExtractionJob, store_root: str, counter=None, counter_key: str = "") -> dict:
    """Plain function (callable without Ray): build the backbone once, then extract, write and commit each
    shard (skipping those committed meanwhile), and commit every feature set whose shards are all there.

    ``store_root``: a local path or an fsspec URL (s3://, gs://) every worker can reach. ``counter``: a
    ``ProgressCounter`` actor told the rows written under ``counter_key`` as they land (the driver's
    progress bar)."""
    store = FeatureStore(store_root)
    t0 = time.perf_counter()
    if counter is not None:
        counter.reset.remote(counter_key)
    with PeakRSS() as peak:
        backbone = load_backbone(job.backbone, job.weights, job.weights_seed)
        device = pick_device()
        gflops = gflops_per_image(job.backbone, job.resolution)
        out = {
            "job": job.label,
            "shards": [f"{s.label}" for s in job.shards],
            "device": str(device),
            "images": 0,
            "slices": 0,
            "batches": 0,
            "forward_seconds": 0.0,
            "stored": 0,  # feature sets committed by this task
            "shards_stored": 0,
            "decodes": 0,
            record.GFLOPS_PER_IMAGE: gflops,
            record.OOM_BACKOFFS: 0,
            "weights_sha256": backbone.weights.get("sha256", ""),
        }
        for s in job.shards:
            key = s.key
            if backbone.weights["digest"] != key.weights_digest:
                raise RuntimeError(
                    f"{job.label}: loaded weights {backbone.weights['digest']} differ from the planned {key.weights_digest}"
                )
            if store.has(key) or store.has_shard(key, s.index, s.count):  # written meanwhile by another worker
                if counter is not None:
                    counter.add.remote(counter_key, s.n_rows)
                continue
            extra = {
                "backbone_name": job.backbone,
                "split": s.split,
                "view": s.view,
                "n_params": backbone.n_params,
                "weights_kind": backbone.weights["kind"],
                record.GFLOPS_PER_IMAGE: gflops,
                "device": str(device),
                **({"weights_sha256": backbone.weights["sha256"]} if "sha256" in backbone.weights else {}),
            }
            rows_per_id = s.sources.n_slices if s.view == "slices" else None
            with store.shard_writer(key, s.index, s.count, s.n_rows, s.sources.ids, rows_per_id, extra) as writer:
                counting = CountingWriter(writer, counter, counter_key)
                stats = _extract_shard(backbone, job, s, counting, device)
                counting.flush()
                writer.extra["seconds"] = stats.seconds
            out["shards_stored"] += 1
            if len(store.shards_committed(key, s.count)) == s.count:
                store.commit(key, s.count)
                out["stored"] += 1
            out["images"] += stats.images
            out["decodes"] += len(_files(s.sources, s.view))  # the shard's reader opens each of its files once
            out["slices"] += stats.slices or stats.images  # 2D: one forward pass per image
            out["batches"] += stats.forward_passes
            out["forward_seconds"] += stats.seconds
            out[record.OOM_BACKOFFS] += stats.oom_backoffs
        del backbone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _settle(counter)
    _task_figures(out, job, t0, peak)
    return out


def _settle(counter) -> None:
    """Return only once the counter actor has taken every count this task sent. The counts go fire and forget,
    and an actor runs one caller's calls in order, so the answer to one more call means they are all in: the
    driver's last progress figure, read after the task ends, then counts every row it wrote."""
    if counter is not None:
        import ray

        ray.get(counter.snapshot.remote())


def _task_figures(out: dict, job, t0: float, peak: PeakRSS) -> None:
    """What every extraction task reports about itself: wall time, node, peak memory against the plan's."""
    out["wall_seconds"] = time.perf_counter() - t0
    out["node"] = _node_id()
    out["peak_rss_bytes"] = peak.bytes
    out["peak_rss_predicted_bytes"] = job.extra.get("predicted_peak_bytes", 0.0)


def run_fused_job(job: FusedJob, store_root: str, counter=None, counter_key: str = "") -> dict:
    """Plain function (callable without Ray): load the job's encoders once (they share the device), then run each
    pass (``dinoscale.features.fused.extract_fused``: each file decoded once, every shard written and committed
    as soon as its rows are in, those committed meanwhile skipped), and commit every feature set whose shards
    are all there. Returns the ``run_job`` figures plus the decodes, decode time share and images / s."""
    store = FeatureStore(store_root)
    t0 = time.perf_counter()
    if counter is not None:
        counter.reset.remote(counter_key)
    out = {"job": job.label, "shards": [s.label for s in job.shards], "stored": 0, "shards_stored": 0}
    out.update({"images": 0, "slices": 0, "batches": 0, "forward_seconds": 0.0, record.OOM_BACKOFFS: 0})
    out.update({"decodes": 0, "entries": 0, "decode_seconds": 0.0, "transform_seconds": 0.0})
    with PeakRSS() as peak:
        device = pick_device()
        out["device"] = str(device)
        encoders = {name: load_backbone(name, w, seed) for name, w, seed in job.backbones}
        gpu = _GpuUtilisation() if device.type == "cuda" else contextlib.nullcontext()
        with gpu:
            _run_passes(job, encoders, store, device, out, counter, counter_key)
        if isinstance(gpu, _GpuUtilisation) and gpu.samples:
            out[record.EXTRACTION_GPU_UTILIZATION] = float(np.mean(gpu.samples))
        del encoders
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _settle(counter)
    _task_figures(out, job, t0, peak)
    out[record.EXTRACTION_IMAGES_PER_SECOND] = out["slices"] / out["forward_seconds"] if out["forward_seconds"] else 0.0
    out[record.EXTRACTION_DECODE_SHARE] = (
        out["decode_seconds"] / out["forward_seconds"] if out["forward_seconds"] else 0.0
    )
    return out


def _run_passes(job: FusedJob, encoders: dict, store: FeatureStore, device, out: dict, counter, counter_key) -> None:
    """Each pass of the job through ``extract_fused``, its figures added to ``out``."""
    for p in job.passes:
        targets = _fused_targets(p, encoders, store, device, counter, counter_key)
        if not targets:
            continue
        rows = PassRows(p.sources.items, p.sources.channels.get("pet"), p.sources.n_slices)
        stats = extract_fused(targets, rows, device, batch_size=job.batch_size, num_workers=job.extra.get("workers"))
        out["shards_stored"] += sum(len(t.segments) for t in targets)
        out["stored"] += _commit_complete_keys(store, p.shards)
        out["images"] += stats.entries
        out["slices"] += stats.inputs
        out["batches"] += stats.forward_passes
        out["forward_seconds"] += stats.seconds
        out[record.OOM_BACKOFFS] += stats.oom_backoffs
        out["decodes"] += stats.decodes
        out["entries"] += stats.entries
        out["decode_seconds"] += stats.decode_seconds
        out["transform_seconds"] += stats.transform_seconds


class _GpuUtilisation:
    """The GPU's utilisation (%, NVML through ``torch.cuda.utilization``) sampled twice a second while a fused job
    runs; no samples where NVML is missing."""

    def __enter__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - NVML (pynvml) not installed: utilisation is optional telemetry
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _fused_targets(
    p: FusedPass, encoders: dict, store: FeatureStore, device, counter, counter_key
) -> list[FusedTarget]:
    """The pass's feature sets as fused targets: each shard not committed meanwhile (by another worker) one
    segment, its sink the store's shard writer (rows counted for the progress bar)."""
    segments: dict[tuple, list[Segment]] = {}
    for s in p.shards:
        enc = encoders[s.backbone]
        if enc.weights["digest"] != s.key.weights_digest:
            raise RuntimeError(
                f"{s.backbone}: loaded weights {enc.weights['digest']} differ from the planned {s.key.weights_digest}"
            )
        if store.has(s.key) or store.has_shard(s.key, s.index, s.count):
            if counter is not None:
                counter.add.remote(counter_key, s.n_rows)
            continue
        start = s.start - p.start
        opener = _ShardOpener(store, s, _shard_extra(s, enc, device), counter, counter_key)
        segments.setdefault((s.backbone, s.key), []).append(Segment(start, start + len(s.sources.ids), opener))
    return [FusedTarget(encoders[bb], key.recipe, segs) for (bb, key), segs in segments.items()]


def _shard_extra(s: ShardInputs, backbone, device) -> dict:
    """What a shard's commit record keeps of its encoder (as ``run_job`` writes it)."""
    return {
        "backbone_name": s.backbone,
        "split": s.split,
        "view": s.view,
        "n_params": backbone.n_params,
        "weights_kind": backbone.weights["kind"],
        record.GFLOPS_PER_IMAGE: gflops_per_image(s.backbone, s.recipe.resolution),
        "device": str(device),
        **({"weights_sha256": backbone.weights["sha256"]} if "sha256" in backbone.weights else {}),
    }


@dataclass
class _ShardOpener:
    """A fused segment's sink: the shard's writer, opened at its first rows, its rows counted for the progress
    bar, closed (committed) with the seconds it was open."""

    store: FeatureStore
    shard: ShardInputs
    extra: dict
    counter: object = None
    counter_key: str = ""

    def __call__(self):
        s = self.shard
        rows_per_id = s.sources.n_slices if s.view == "slices" else None
        writer = self.store.shard_writer(s.key, s.index, s.count, s.n_rows, s.sources.ids, rows_per_id, self.extra)
        return _CountedShard(CountingWriter(writer, self.counter, self.counter_key), time.perf_counter())


@dataclass
class _CountedShard:
    writer: CountingWriter
    opened: float

    def write(self, rows, values) -> None:
        self.writer.write(rows, values)

    def close(self) -> None:
        self.writer.flush()
        self.writer.extra["seconds"] = time.perf_counter() - self.opened
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


def _commit_complete_keys(store: FeatureStore, shards: list[ShardInputs]) -> int:
    """Commit the feature sets of ``shards`` whose shards are all in the store; returns how many."""
    n = 0
    for key, count in dict.fromkeys((s.key, s.count) for s in shards):
        if not store.has(key) and len(store.shards_committed(key, count)) == count:
            store.commit(key, count)
            n += 1
    return n


def _files(sources: RowSources, view: str) -> list[str]:
    """The files a shard's reader opens: its items, and the PET beside each CT where the slices fuse one."""
    pet = sources.channels.get("pet") if view == "slices" else None
    return list(sources.items) + list(pet or [])


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - informational only
        return ""


def commit_complete(plan: Plan, store: FeatureStore) -> tuple[int, list[str]]:
    """Commit every planned feature set whose shards are all in the store (a task may have died after its
    last shard); returns (feature sets committed now, labels of those still incomplete)."""
    committed, incomplete = 0, []
    for fs in plan.missing:
        count = len(fs.shards) or 1
        if store.has(fs.key):
            continue
        done = store.shards_committed(fs.key, count)
        if len(done) == count:
            store.commit(fs.key, count)
            committed += 1
        else:
            incomplete.append(f"{fs.backbone.name}@{fs.resolution} {fs.split} {fs.view}: {len(done)}/{count} shards")
    return committed, incomplete


def feature_set_sizes(plan: Plan, store: FeatureStore) -> list[dict]:
    """Predicted against measured bytes on disk of every planned (non-online) feature set in the store."""
    out = []
    for fs in plan.feature_sets:
        if fs.online or fs.key is None or not store.has(fs.key):
            continue
        out.append(
            {
                "digest": fs.key.digest,
                "backbone": fs.backbone.name,
                "resolution": fs.resolution,
                "split": fs.split,
                "view": fs.view,
                "rows": fs.n_rows,
                "shards": len(fs.shards) or 1,
                "predicted_bytes": fs.nbytes,
                "measured_bytes": store.nbytes(fs.key.digest),
                "extraction_peak_predicted_bytes": fs.extraction_peak,
            }
        )
    return out


GPU_CLUSTER_ENV = "DINOSCALE_GPU_CLUSTER"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher's copy of the YAML on the head


def cluster_has_gpus() -> bool:
    """Whether extraction tasks and trials ask for GPUs: decided from what the cluster CAN have, not from
    the nodes up now (GPU workers autoscale from zero, so at submit time often none is). In order:
    DINOSCALE_GPU_CLUSTER (1/0; cluster/cluster.env sets 1 for the cloud clusters), the launcher's node
    types (a GPU in any type's resources), else the GPUs of the live nodes (embedded Ray, Slurm)."""
    import ray  # here, as in the rest of this module: importing Ray takes seconds

    env = os.environ.get(GPU_CLUSTER_ENV, "").strip()
    if env:
        return env not in ("0", "false", "no")
    boot = Path(BOOTSTRAP_CONFIG).expanduser()
    if boot.is_file():
        types = (yaml.safe_load(boot.read_text()) or {}).get("available_node_types") or {}
        if any((t.get("resources") or {}).get("GPU", 0) > 0 for t in types.values()):
            return True
    return ray.cluster_resources().get("GPU", 0) > 0


def run_extraction_stage(
    plan: Plan, store_root: Path, num_cpus: float, num_gpus: float, on_done=None, on_progress=None, fused=True
) -> ExtractionReport:
    """Submit one Ray task per job (GPU resources where the cluster has GPUs), wait for all, then commit
    the feature sets whose shards are complete. A job that fails keeps the shards it committed.

    ``fused``: fused jobs (``plan_fused_jobs``: each file decoded once for every feature set that reads it);
    False: one job per backbone x resolution (``plan_jobs``, each reading its files itself: the baseline of
    ``benchmarks/bench_fused.py``). ``on_progress(done_rows, total_rows)``: called about twice a second with the
    rows the tasks have written so far (images, slices, volumes or tiles, as stored), from a ``ProgressCounter``
    actor."""
    import ray

    store = FeatureStore(store_root)
    report = ExtractionReport(feature_sets_cached=len([f for f in plan.feature_sets if f.cached]))
    jobs = plan_fused_jobs(plan, store) if fused else plan_jobs(plan, store)
    report.files = len({f for job in jobs for s in job.shards for f in _files(s.sources, s.view)})
    report.shards_extracted = 0
    report.shards_cached = sum(f.committed_shards for f in plan.missing)
    t0 = time.perf_counter()
    errors = []
    if jobs:
        has_gpu = cluster_has_gpus()
        if fused and has_gpu:
            _feed_workers(plan, jobs)
        remote = ray.remote(run_fused_job if fused else run_job).options(
            num_cpus=num_cpus, num_gpus=num_gpus if has_gpu else 0, max_retries=2
        )
        counter = ray.remote(num_cpus=0)(ProgressCounter).remote() if on_progress else None
        total = sum(s.n_rows for job in jobs for s in job.shards)
        pending = {remote.remote(job, str(store_root), counter, str(i)): job for i, job in enumerate(jobs)}
        polled = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5 if counter is not None else None)
            if counter is not None:
                polled = _poll(counter, polled, total, on_progress)
            if not done:
                continue
            job = pending.pop(done[0])
            try:
                res = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a user error stops the stage; others are reported together below
                user = user_error_of(e)
                if user is not None:
                    _cancel(pending)
                    try:
                        commit_complete(plan, store)  # feature sets whose shards all landed are usable as they are
                    except (UserError, OSError):
                        pass  # a full or read-only store refuses these commits too: the worker's error says it
                    raise _in_job(with_room_needed(user, plan, store), job, len(pending)) from None
                errors.append(f"{job.label} ({', '.join(s.label for s in job.shards)}): {e}")
                continue
            report.add(res)
            if on_done:
                on_done(res)
        if counter is not None:
            on_progress(min(total, sum(ray.get(counter.snapshot.remote()).values())), total)
            ray.kill(counter)
    committed, incomplete = commit_complete(plan, store)
    report.feature_sets_extracted += committed
    report.wall_seconds = time.perf_counter() - t0
    report.per_feature_set = feature_set_sizes(plan, store)
    if errors or incomplete:
        kept = sum(1 for _ in incomplete)
        raise RuntimeError(
            "feature extraction failed:\n"
            + "\n".join(errors + [f"incomplete: {i}" for i in incomplete])
            + (
                f"\n(the committed shards of the {kept} incomplete set(s) are kept: a rerun extracts only the rest)"
                if kept
                else ""
            )
        )
    return report


def _feed_workers(plan: Plan, jobs: list[FusedJob]) -> None:
    """Loader workers of each fused job on a GPU: as many as its encoders need to keep pace with the decode
    (``budget.fused_feed``: the calibration's decode per core against the encoders' FLOPs on the plan's GPU)."""
    feed = {frozenset(f.backbones): f.workers for f in budget.fused_feed(plan, budget.plan_cluster(plan.spec))}
    for job in jobs:
        job.extra["workers"] = feed.get(frozenset(b for b, _, _ in job.backbones))


def _poll(counter, polled, total: int, on_progress):
    """Ask the counter for its rows without blocking the stage: the previous question's answer, if ready."""
    import ray

    if polled is not None:
        ready, _ = ray.wait([polled], timeout=0)
        if not ready:
            return polled
        on_progress(min(total, sum(ray.get(polled).values())), total)
    return counter.snapshot.remote()


def _cancel(pending: dict) -> None:
    """Stop the other jobs: the same input problem (a bad file of a split) would stop them as well.
    What they already stored stays in the store; a half-written entry is never read."""
    import ray

    for ref in pending:
        ray.cancel(ref)


def _in_job(error: UserError, job: ExtractionJob, n_cancelled: int) -> UserError:
    """The user's error as raised in the worker (its message, not Ray's wrapper), with the job named."""
    note = (
        f"; {n_cancelled} other extraction job(s) cancelled; shards already committed are kept: "
        "a rerun extracts only the rest"
        if n_cancelled
        else "; shards already committed are kept: a rerun extracts only the rest"
    )
    try:
        return type(error)(f"{error} [extraction of {job.label}: {', '.join(s.label for s in job.shards)}{note}]")
    except TypeError:  # a subclass with another constructor: keep the original
        return error


def extraction_record(report: ExtractionReport) -> dict:
    """The stage's metrics for the parent run: shards, bytes on disk and peak memory, each measured next to
    the plan's prediction, and its feed: files read per file, encoder inputs per second of the stage, the tasks'
    decode time share and the GPU's utilisation where there is one (names from ``dinoscale.record``)."""

    out = {
        record.EXTRACTION_SHARDS_EXTRACTED: report.shards_extracted,
        record.EXTRACTION_SHARDS_CACHED: report.shards_cached,
    }
    if report.per_feature_set:
        out[record.FEATURE_BYTES_MEASURED] = sum(f["measured_bytes"] for f in report.per_feature_set)
        out[record.FEATURE_BYTES_PREDICTED] = sum(f["predicted_bytes"] for f in report.per_feature_set)
    if report.files:
        out[record.EXTRACTION_DECODES_PER_FILE] = report.decodes_per_file
    if report.wall_seconds > 0 and report.images:
        out[record.EXTRACTION_IMAGES_PER_SECOND] = report.images / report.wall_seconds
    if report.forward_seconds > 0 and report.decode_seconds > 0:
        out[record.EXTRACTION_DECODE_SHARE] = report.decode_seconds / report.forward_seconds
    gpu = [j[record.EXTRACTION_GPU_UTILIZATION] for j in report.per_job if record.EXTRACTION_GPU_UTILIZATION in j]
    if gpu:
        out[record.EXTRACTION_GPU_UTILIZATION] = float(np.mean(gpu))
    if report.per_job:
        worst = max(report.per_job, key=lambda j: j.get("peak_rss_bytes", 0))
        out[record.EXTRACTION_PEAK_RSS_MB] = worst.get("peak_rss_bytes", 0) / 2**20
        out[record.EXTRACTION_PEAK_RSS_PREDICTED_MB] = worst.get("peak_rss_predicted_bytes", 0) / 2**20
    return out


def declared_node_memory() -> tuple[float, str]:
    """The most memory one node of the running Ray cluster declares (its ``memory`` resource)."""
    import ray

    mem = [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")]
    return (max(mem) if mem else 0.0), "the largest node of the Ray cluster declares"


def check_cluster_memory(plan: Plan) -> None:
    """Refuse (before the sweep's run is recorded or anything extracted) a sweep whose extraction task or trial
    cannot fit on any node of the Ray cluster, by the memory its nodes declare. (A spec that states
    ``resources.node_memory_gb`` is checked against it earlier, with the plan: ``check_runnable``.)"""
    from dinoscale.sweep.plan import check_memory

    if plan.spec.resources.node_memory_gb is None:
        node, how = declared_node_memory()
        if node > 0:
            check_memory(plan, node, how)
