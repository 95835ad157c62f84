"""Extraction stage: every missing feature set of the plan is computed exactly once, as Ray tasks.

Work is grouped by (backbone, weights, resolution) so that a model is built once and runs over
all three splits; each split is stored under its own key. Trials never extract.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dinoscale.data import RowSources
from dinoscale.errors import UserError, user_error_of
from dinoscale.features import FeatureKey, FeatureStore
from dinoscale.sweep.plan import Plan, volume_window


@dataclass
class SplitInputs:
    """One feature set to write: a split of the dataset in one view (see ``dinoscale.probes.registry.VIEWS``)."""

    split: str
    key: FeatureKey
    view: str  # images | volumes | slices
    tokens: str
    sources: RowSources  # what the readers open, row by row (the dataset's ``sources(split)``)

    @property
    def paths(self) -> list[str]:
        return self.sources.items

    def row_ids(self) -> list[str]:
        """The ids of the stored rows: one per image or volume, or ``<volume>#<slice>`` per slice."""
        return self.sources.row_ids(self.view)


@dataclass
class ExtractionJob:
    backbone: str
    weights: str
    weights_seed: int
    resolution: int
    interpolation: str
    batch_size: int
    splits: list[SplitInputs]
    volume_pool: str = "mean"  # volumes view: how slice features are pooled per volume
    window: tuple[float, float] | None = None  # CT window (HU): volumes, and 2D CT slices

    @property
    def label(self) -> str:
        return f"{self.backbone}@{self.resolution}"


@dataclass
class ExtractionReport:
    feature_sets_extracted: int = 0
    feature_sets_cached: int = 0
    images: int = 0  # backbone inputs forwarded: 2D images, or slices of volumes
    forward_batches: int = 0
    forward_seconds: float = 0.0
    wall_seconds: float = 0.0
    per_job: list[dict] = field(default_factory=list)


def plan_jobs(plan: Plan) -> list[ExtractionJob]:
    if plan.dataset is None:
        raise RuntimeError(f"cannot extract without data: {plan.dataset_error}")
    spec, jobs = plan.spec, {}
    for fs in plan.missing:
        bb = fs.backbone
        job = jobs.setdefault(
            (bb.name, bb.weights, fs.resolution),
            ExtractionJob(
                bb.name,
                bb.weights,
                bb.weights_seed,
                fs.resolution,
                spec.features.interpolation,
                spec.features.batch_size,
                [],
                spec.features.volume_pool,
                volume_window(spec),
            ),
        )
        job.splits.append(SplitInputs(fs.split, fs.key, fs.view, fs.tokens, plan.dataset.sources(fs.split)))
    return list(jobs.values())


def run_job(job: ExtractionJob, store_root: str) -> dict:
    """Plain function (callable without Ray): build the backbone once, extract and store each split.

    ``store_root``: a local path or an fsspec URL (s3://, gs://) every worker can reach."""
    import torch

    from dinoscale.features.extract import extract_features, extract_volume_features, extract_volume_slices, pick_device
    from dinoscale.models import gflops_per_image, load_backbone

    store = FeatureStore(store_root)
    t0 = time.perf_counter()
    backbone = load_backbone(job.backbone, job.weights, job.weights_seed)
    device = pick_device()
    gflops = gflops_per_image(job.backbone, job.resolution)
    out = {
        "job": job.label,
        "device": str(device),
        "images": 0,
        "slices": 0,
        "batches": 0,
        "forward_seconds": 0.0,
        "stored": 0,
        "gflops_per_image": gflops,
        "oom_backoffs": 0,
        "weights_sha256": backbone.weights.get("sha256", ""),
    }
    for s in job.splits:
        key = s.key
        if store.has(key):  # written meanwhile by another worker
            continue
        if s.view == "volumes":
            feats, stats = extract_volume_features(
                backbone,
                s.paths,
                job.resolution,
                s.tokens,
                job.volume_pool,
                job.interpolation,
                job.batch_size,
                window=job.window,
                device=device,
            )
        elif s.view == "slices":
            feats, stats = extract_volume_slices(
                backbone,
                s.paths,
                s.sources.n_slices,
                job.resolution,
                s.tokens,
                job.interpolation,
                job.batch_size,
                window=job.window,
                pet_paths=s.sources.channels.get("pet"),
                device=device,
                out_dtype=key.dtype,
            )
        else:
            feats, stats = extract_features(
                backbone,
                s.paths,
                job.resolution,
                s.tokens,
                job.interpolation,
                job.batch_size,
                device,
                out_dtype=key.dtype,
                window=job.window,
            )
        if backbone.weights["digest"] != key.weights_digest:
            raise RuntimeError(
                f"{job.label}: loaded weights {backbone.weights['digest']} differ from the planned {key.weights_digest}"
            )
        store.put(
            key,
            feats,
            s.row_ids(),
            extra={
                "backbone_name": job.backbone,
                "split": s.split,
                "view": s.view,
                "n_params": backbone.n_params,
                "weights_kind": backbone.weights["kind"],
                "seconds": stats.seconds,
                "gflops_per_image": gflops,
                "device": str(device),
                **({"weights_sha256": backbone.weights["sha256"]} if "sha256" in backbone.weights else {}),
            },
        )
        out["images"] += stats.images
        out["slices"] += stats.slices or stats.images  # 2D: one forward pass per image
        out["batches"] += stats.forward_passes
        out["forward_seconds"] += stats.seconds
        out["oom_backoffs"] += stats.oom_backoffs
        out["stored"] += 1
    out["wall_seconds"] = time.perf_counter() - t0
    del backbone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def run_extraction_stage(
    plan: Plan, store_root: Path, num_cpus: float, num_gpus: float, on_done=None
) -> ExtractionReport:
    """Submit one Ray task per job (GPU resources where the cluster has GPUs) and wait for all."""
    import ray

    report = ExtractionReport(feature_sets_cached=len(plan.feature_sets) - len(plan.missing))
    jobs = plan_jobs(plan)
    if not jobs:
        return report
    t0 = time.perf_counter()
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    remote = ray.remote(run_job).options(num_cpus=num_cpus, num_gpus=num_gpus if has_gpu else 0, max_retries=2)
    pending = {remote.remote(job, str(store_root)): job for job in jobs}
    errors = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            res = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - a user error stops the stage; others are reported together below
            user = user_error_of(e)
            if user is not None:
                _cancel(pending)
                raise _in_job(user, job, len(pending)) from None
            errors.append(f"{job.label}: {e}")
            continue
        report.per_job.append(res)
        report.feature_sets_extracted += res["stored"]
        report.images += res["slices"]  # backbone inputs: 2D images, or slices of volumes
        report.forward_batches += res["batches"]
        report.forward_seconds += res["forward_seconds"]
        if on_done:
            on_done(res)
    report.wall_seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError("feature extraction failed:\n" + "\n".join(errors))
    return report


def _cancel(pending: dict) -> None:
    """Stop the other jobs: the same input problem (a bad file of a split) would stop them as well.
    What they already stored stays in the store; a half-written entry is never read."""
    import ray

    for ref in pending:
        ray.cancel(ref)


def _in_job(error: UserError, job: ExtractionJob, n_cancelled: int) -> UserError:
    """The user's error as raised in the worker (its message, not Ray's wrapper), with the job named."""
    note = (
        f" ({n_cancelled} other extraction job(s) cancelled; feature sets already stored are kept)"
        if n_cancelled
        else ""
    )
    try:
        return type(error)(f"{error} [extraction of {job.label}{note}]")
    except TypeError:  # a subclass with another constructor: keep the original
        return error
