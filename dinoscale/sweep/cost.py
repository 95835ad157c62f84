"""What a sweep costs before it runs: rows and bytes of each feature set, its shards, and the peak memory
of the tasks that write and read it.

Sizes are exact where the data is prepared (the manifest gives the images, volumes and slices) and
estimated from the dataset's published size otherwise (``dinoscale.data.PublishedSize``: typical slices
per volume, tiles per slide at a magnification, sections per block). Bytes on disk are rows x the token
set's width x the store's dtype (+ one 128-byte ``.npy`` header per shard). Peak memory is a model:
a measured base (the resident set of a worker after importing its stack, on this project's CPU
machines) plus what scales with the work (model weights, loader batches, volumes in flight, the
feature bytes a trial holds or streams); a run logs the measured peaks next to these predictions
(``dinoscale.record``), which is how the model is checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Resident set of a worker running the smallest job of its kind, measured on the development machine
# (torch 2.14 CUDA build running on the CPU, timm 1.0.31, monai 1.6.1, Ray 2.60; 2026-11-28, the demo
# sweeps' peaks): an extraction task (torch, timm, MONAI transforms, a demo model) and a frozen trial
# by input form: vector and bag probes ~0.96 GB (torch, the probes), grid probes ~1.31 GB (+ MONAI's
# losses and metrics, which import most of MONAI).
EXTRACTION_BASE_BYTES = 1.35e9
TRIAL_BASE_BYTES = {"vector": 0.98e9, "bag": 0.98e9, "grid": 1.30e9}
NPY_HEADER_BYTES = 128
READ_WINDOW_BYTES = 16 << 20  # dinoscale.features.store.READ_WINDOW_BYTES
BLOCK_BYTES = 64 << 20  # dinoscale.features.rows.BLOCK_BYTES
KNN_QUERY_CHUNK = 4096  # dinoscale.probes.knn.knn_scores


def row_elements(tokens: str, view: str, embed_dim: int, grid_side: int, volume_pool: str = "mean") -> int:
    """Values per stored row of a token set (``dinoscale.features.extract.parse_token_set``)."""
    from dinoscale.features.extract import parse_token_set

    ts = parse_token_set(tokens)
    if ts.grid:
        return embed_dim * grid_side * grid_side
    width = (ts.n_last or int(ts.cls)) * embed_dim + (embed_dim if ts.mean_patch else 0)
    return width * (2 if view == "volumes" and volume_pool == "mean_max" else 1)


def shard_ranges(
    passes: Sequence[int], bytes_per_unit: Sequence[int], max_passes: int, max_bytes: int
) -> list[tuple[int, int]]:
    """Contiguous ranges of units, each at most ``max_passes`` backbone inputs and ``max_bytes`` on disk
    (a unit larger than either is a shard of its own). Deterministic: the same manifest and settings give
    the same shards, so a rerun finds the shards it committed before."""
    out, start, p, b = [], 0, 0, 0
    for i, (pi, bi) in enumerate(zip(passes, bytes_per_unit)):
        if i > start and (p + pi > max_passes or b + bi > max_bytes):
            out.append((start, i))
            start, p, b = i, 0, 0
        p, b = p + pi, b + bi
    if len(passes):
        out.append((start, len(passes)))
    return out


def even_shards(n_units: int, passes_per_unit: float, bytes_per_unit: float, max_passes: int, max_bytes: int) -> int:
    """Number of shards of ``n_units`` alike units (plans without data)."""
    if n_units <= 0:
        return 0
    per = max(
        1, min(math.floor(max_passes / max(passes_per_unit, 1e-9)), math.floor(max_bytes / max(bytes_per_unit, 1e-9)))
    )
    return math.ceil(n_units / per)


@dataclass(frozen=True)
class ExtractionShape:
    """What an extraction task holds besides its base: the model, the loader and what it reads."""

    n_params: int
    resolution: int
    tokens_per_image: int
    embed_dim: int
    batch_size: int
    row_elements: int
    volume_voxels: int = 0  # a volume read whole by the loader (3D views); 0 for 2D images
    pooled_rows: int = 0  # volumes view: per-volume sums and maxima kept for the shard's volumes
    workers: int = 0  # loader processes (0 on the CPU)
    prefetch: int = 4


def extraction_peak_bytes(e: ExtractionShape) -> float:
    """Host memory of one extraction task: base + fp32 weights + input batches in flight + the forward pass's
    activations on the CPU (a few tensors of batch x tokens x dim, and the attention of one head at a time)
    + one volume per loader (and a float copy) + the output batch + the pooled per-volume sums."""
    inputs = e.batch_size * 3 * e.resolution**2 * 4 * (2 + e.prefetch * e.workers)
    activations = e.batch_size * e.tokens_per_image * e.embed_dim * 4 * 12
    volumes = max(1, e.workers) * e.volume_voxels * 4 * 3
    out = e.batch_size * e.row_elements * 4 * 3
    pooled = e.pooled_rows * e.row_elements * 8 * 2
    return EXTRACTION_BASE_BYTES + e.n_params * 4 + inputs + activations + volumes + out + pooled


@dataclass(frozen=True)
class TrialShape:
    """What a frozen trial reads: its probe's input form and the float32 bytes of each split's features."""

    probe: str  # the probe's kind
    input: str  # vector | bag | grid (dinoscale.probes.registry.INPUTS)
    split_bytes: dict[str, float]  # float32 bytes of each split's features
    split_items: dict[str, int]  # units (images, volumes, bags) per split
    resident_bytes: int  # the trial's in-memory budget per split (features.resident_mb)
    streams: bool = True  # False: the probe takes whole float32 arrays (no batch reading)
    batch_size: int = 256  # items per mini-batch
    label_voxels: dict[str, int] | None = None  # grid probes: label-map voxels per split
    n_out: int = 2  # classes / affinity channels of a dense head
    on_gpu: bool = False  # activations of the head in device memory, not host memory
    online_params: int = 0  # online features: the backbone's parameters, held by the trial
    online_batch_bytes: float = 0.0  # online features: one forward batch's activations


def _fits(bytes_: float, budget: int) -> bool:
    return bytes_ <= budget


def trial_peak_bytes(t: TrialShape) -> float:
    """Host memory of one frozen trial: base + features (a split within the budget is held as float32 and
    standardised copies; a streamed one costs a mini-batch, an mmap window and a block of a streamed pass)
    + what the probe adds (k-NN similarities, logistic regression's copies, a dense head's label maps,
    logits and test predictions)."""
    # held splits are converted side by side (stored dtype + float32, + a standardised copy for vector
    # probes); a streamed split costs a mini-batch (predictions of dense heads: 16 items) read through one
    # mmap window, and blocks of a streamed pass (statistics, scoring) - one split at a time
    factor = 1.5 if t.input == "grid" else 2.5
    held, streamed = 0.0, 0.0
    for split, b in t.split_bytes.items():
        n = max(1, t.split_items.get(split, 1))
        batch = min(n, max(t.batch_size, 16) if t.input == "grid" else t.batch_size)
        if t.online_params:  # computed a mini-batch at a time
            streamed = max(streamed, batch * b / n * 3)
        elif t.probe == "logreg" or not t.streams:  # the whole matrix (scikit-learn; array-only probes)
            held += 3.0 * b
        elif _fits(b, t.resident_bytes):
            held += factor * b
        else:
            streamed = max(streamed, batch * b / n * 3 + READ_WINDOW_BYTES + BLOCK_BYTES)
    feats = held + streamed
    extra = 0.0
    if t.probe == "knn":
        n_train = t.split_items.get("train", 0)
        rows = (
            n_train
            if _fits(t.split_bytes.get("train", 0), t.resident_bytes)
            else max(1, BLOCK_BYTES // max(1, t.split_bytes["train"] / max(1, n_train)))
        )
        queries = min(KNN_QUERY_CHUNK, max(t.split_items.get("val", 0), t.split_items.get("test", 0)))
        extra += queries * min(rows, max(1, n_train)) * 4 * 3
    if t.input == "grid" and t.label_voxels:
        activations, batch_labels = 0.0, 0.0
        for split, vox in t.label_voxels.items():
            held = _fits(vox * 4, t.resident_bytes) or not t.streams  # label maps have their own view
            n = max(1, t.split_items.get(split, 1))
            batch_vox = vox / n * min(n, max(t.batch_size, 16))  # predictions run 16 items at a time
            if held:
                extra += vox * 9  # int64 labels (+ the uint8 cache)
            batch_labels = max(batch_labels, 0.0 if held else batch_vox * 9)
            # a mini-batch's logits, softmax, one-hot target and gradients
            activations = max(activations, batch_vox * t.n_out * 4 * 8)
        extra += batch_labels + (0.0 if t.on_gpu else activations)  # on a GPU activations live in device memory
        test_vox = t.label_voxels.get("test", 0)
        n_test = max(1, t.split_items.get("test", 1))
        extra += test_vox * 1  # test predictions, one byte per voxel
        extra += test_vox / n_test * min(n_test, 8) * t.n_out * 4 * 4  # scoring 8 volumes at a time (one-hot)
    if t.online_params:
        extra += t.online_params * 4 + t.online_batch_bytes
    return TRIAL_BASE_BYTES.get(t.input, 1.30e9) + feats + extra


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


@dataclass(frozen=True)
class FusedGroup:
    """Encoders that share one fused extraction pass (one decode of each file) and what the pass holds."""

    backbones: tuple[str, ...]
    host_bytes: float  # the pass's task: base + every encoder's weights + the largest set's work
    device_bytes: float  # the encoders' fp32 weights + the largest forward batch's activations (on a GPU)


def fused_groups(sets: Sequence, batch_size: int, device_budget: float, host_budget: float) -> list[FusedGroup]:
    """The encoders of a sweep's feature sets (``FeatureSetPlan``) packed into fused passes, smallest first: all in
    one pass where their weights and the largest batch fit one device (``device_budget``) and one task's host
    memory (``host_budget``), else as many passes as needed (each file is then decoded once per pass). An encoder
    that fits neither alone gets a pass of its own (the plan's memory check names it)."""
    by_bb: dict[str, list] = {}
    for f in sets:
        by_bb.setdefault(f.backbone.name, []).append(f)
    order = sorted(by_bb, key=lambda b: by_bb[b][0].backbone.n_params)
    groups: list[FusedGroup] = []
    current: list[str] = []
    for name in order:
        trial = _fused_group(current + [name], by_bb, batch_size)
        if current and (trial.device_bytes > device_budget or trial.host_bytes > host_budget):
            groups.append(_fused_group(current, by_bb, batch_size))
            current = [name]
        else:
            current.append(name)
    if current:
        groups.append(_fused_group(current, by_bb, batch_size))
    return groups


def _fused_group(names: list[str], by_bb: dict, batch_size: int) -> FusedGroup:
    sets = [f for n in names for f in by_bb[n]]
    weights = sum(by_bb[n][0].backbone.n_params * 4 for n in names)
    work = max((f.extraction_peak - f.backbone.n_params * 4 for f in sets), default=0.0)
    acts = max(
        (batch_size * f.backbone.tokens_per_image(f.resolution) * f.backbone.embed_dim * 4 * 12 for f in sets),
        default=0,
    )
    return FusedGroup(tuple(names), work + weights, weights + acts)
