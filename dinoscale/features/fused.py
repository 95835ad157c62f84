"""Fused extraction: one read of each file feeds every feature set that reads it.

A sweep of B backbones x R resolutions used to decode each image (or volume) B x R times, once per feature set.
Here one pass over a run of manifest entries decodes each entry's files once (``decode_image`` /
``decode_volume``), applies the transform of every distinct recipe to the decoded array (the recipe stays the
only configuration of how pixels become features: the transforms are ``data/preprocess.py``'s, minus the
read), and forwards each feature set's inputs through its own encoder; the encoders of a pass share the
device. Each feature set is written through its own sinks, one per shard (``FusedTarget.segments``), opened
at its first rows and closed (committed) once its last row is in, so a killed pass keeps its finished shards.

Byte-identical to one pass per feature set on the CPU: each target batches its rows as the unfused extractor
does (chunks of ``batch_size`` from the start of each shard, in manifest order), so every forward pass sees the
same batch. ``FusedStats.decodes`` counts the files read, measured where they are read (loader workers
included): a sweep reads each file exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dinoscale.data.dataset import DataError
from dinoscale.data.preprocess import (
    build_volume_transform,
    decode_image,
    decode_volume,
    decoded_image_transform,
    volume_files,
)
from dinoscale.features.extract import _check_recipe, _prepare, _Runner, default_workers, input_loader
from dinoscale.features.recipe import SLICE_AXIS, FeatureRecipe
from dinoscale.models import LoadedBackbone


@dataclass
class Segment:
    """One shard of a feature set inside the pass: entries ``start:stop`` of the pass (0 = its first entry) and
    ``open()``, its sink (``write(rows, values)`` with rows counted from the shard's first row, ``close()``
    commits it, ``abort()`` drops it)."""

    start: int
    stop: int
    open: Callable[[], object]


@dataclass
class FusedTarget:
    """One feature set of a pass: its encoder, its recipe and the shards of it the pass writes (entries of
    the pass outside every segment are not computed for it: shards committed before are skipped)."""

    encoder: LoadedBackbone
    recipe: FeatureRecipe
    segments: list[Segment]


@dataclass
class PassRows:
    """The entries of a pass as the readers open them: files (or volume items), PET beside each CT where the
    dataset has one, slices per volume (the manifest's)."""

    items: list[str]
    pet: list[str] | None = None
    n_slices: list[int] | None = None


@dataclass
class FusedStats:
    decodes: int = 0  # files read (a PET beside its CT is a second file)
    entries: int = 0  # images or volumes decoded
    inputs: int = 0  # encoder inputs made (images or slices, every feature set of the pass)
    forward_passes: int = 0  # batches through the encoders
    oom_backoffs: int = 0
    decode_seconds: float = 0.0  # reading files (in the loader workers where there are some)
    transform_seconds: float = 0.0  # recipe transforms of decoded arrays
    seconds: float = 0.0  # wall time of the pass
    per_target: list[dict] = field(default_factory=list)

    @property
    def decode_share(self) -> float:
        """Decode time over the pass's wall time x loader processes (0 workers: the pass's own process)."""
        return self.decode_seconds / self.seconds if self.seconds > 0 else 0.0


def pixel_key(recipe: FeatureRecipe, fuse_pet: bool = False) -> tuple:
    """Recipes that make the same encoder input share one transform: the fields the transforms do not read
    (encoder, weights, token set, pooling, storage) blanked; everything else, a field added later included, keeps
    recipes apart."""
    volumes = recipe.view != "images"
    return (
        recipe.with_(
            backbone="",
            weights_digest="",
            tokens="",
            dtype="",
            pool="",
            view="slices" if volumes else "images",
            extractor_version="",
        ),
        fuse_pet,
    )


def volume_key(recipe: FeatureRecipe, fuse_pet: bool) -> tuple:
    """Recipes whose volumes are read, scaled and put on the grid alike (they differ only after: the slice's
    resize and normalisation) share one prepared volume."""
    (k, _) = pixel_key(recipe)
    return (k.with_(resolution=0, mean=(), std=(), interpolation="bicubic"), fuse_pet)


class _ImagesOnce(torch.utils.data.Dataset):
    """Entry ``units[j]``: its file decoded once, then every distinct transform: (entry, slice 0, 1 slice,
    decodes, decode s, transform s, inputs)."""

    def __init__(self, paths: Sequence[str], units: Sequence[int], transforms: list, file_range: bool):
        self.paths, self.units, self.transforms, self.file_range = list(paths), list(units), transforms, file_range

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, j: int):
        u = self.units[j]
        t0 = time.perf_counter()
        decoded = decode_image(self.paths[u], self.file_range)
        t1 = time.perf_counter()
        xs = tuple(t(decoded) for t in self.transforms)
        return u, 0, 1, 1, t1 - t0, time.perf_counter() - t1, xs


class _VolumesOnce(torch.utils.data.IterableDataset):
    """Streams the slices of one volume at a time per loader worker: its files decoded once (a file shared by
    several channel maps too), prepared once per distinct volume preparation (``volume_key``), then each slice
    through every distinct slice transform. Memory: one decoded volume and its prepared copies per worker."""

    def __init__(self, items: list[list], units: Sequence[int], preps: list, slicers: list[tuple[int, Callable]]):
        # items[p][u]: what preparation p opens for entry u (a CT, or CT + PET); slicers: (preparation, transform)
        self.items, self.units, self.preps, self.slicers = items, list(units), preps, slicers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for u in self.units[wid::nw]:
            t0 = time.perf_counter()
            decoded = {}
            for p in range(len(self.preps)):
                for f in volume_files(self.items[p][u]):
                    if f not in decoded:
                        decoded[f] = decode_volume(f)[0]
            t1 = time.perf_counter()
            vols = []
            for p, prepare in enumerate(self.preps):
                item = self.items[p][u]
                vols.append(prepare(item, [decoded[f] for f in volume_files(item)]))
            n_files = len(decoded)
            del decoded
            counts = {v.shape[SLICE_AXIS] for v in vols}
            if len(counts) > 1:
                raise RuntimeError(f"{self.items[0][u]}: its preparations disagree on the slice count {sorted(counts)}")
            n, prep_s = counts.pop(), time.perf_counter() - t1
            for k in range(n):
                t2 = time.perf_counter()
                xs = tuple(st(vols[p].select(SLICE_AXIS, k)) for p, st in self.slicers)
                first = k == 0
                took = time.perf_counter() - t2 + (prep_s if first else 0.0)
                yield u, k, n, n_files * first, (t1 - t0) * first, took, xs
            del vols


class _TargetRun:
    """One target's share of the pass: its rows buffered per shard and forwarded in chunks of ``batch_size`` from
    the shard's first row (the unfused extractor's batches), written through the shard's sink, which is closed
    (the shard committed) as soon as its last entry is in."""

    def __init__(self, target: FusedTarget, slot: int, device, batch_size: int, rows: PassRows):
        self.target, self.slot, self.batch, self.rows = target, slot, batch_size, rows
        self.view = target.recipe.view
        ts = _check_recipe(target.encoder, target.recipe, need_multiple=self.view != "volumes")
        if self.view == "volumes" and ts.grid:
            raise ValueError("patch_grid of volumes is not pooled per volume; extract slices")
        self.run = _Runner(target.encoder, ts, device, batch_size)
        segs = target.segments
        self.seg_of = np.full(len(rows.items), -1)
        for i, s in enumerate(segs):
            self.seg_of[s.start : s.stop] = i
        self.left = [s.stop - s.start for s in segs]  # entries of each shard not complete yet
        self.buf: list[list] = [[] for _ in segs]
        self.sinks: list = [None] * len(segs)
        self.offsets = np.concatenate([[0], np.cumsum(rows.n_slices or [])]).astype(np.int64)
        self.pooled: dict[int, list] = {}  # volumes view: entry -> [sums, maxima, slices seen]
        self.inputs = 0

    def add(self, u: np.ndarray, k: np.ndarray, n: np.ndarray, x: torch.Tensor) -> None:
        for i in np.flatnonzero(self.seg_of[u] >= 0):
            s = int(self.seg_of[u[i]])
            self.buf[s].append((int(u[i]), int(k[i]), int(n[i]), x[i]))
            if k[i] == n[i] - 1:
                self.left[s] -= 1
            if len(self.buf[s]) == self.batch or self.left[s] == 0:
                self._flush(s)

    def _flush(self, s: int) -> None:
        entries, self.buf[s] = self.buf[s], []
        if entries:
            u, k, n = (np.array([e[j] for e in entries]) for j in range(3))
            y = self.run(torch.stack([e[3] for e in entries]))
            self._write(s, u, k, n, y)
            self.inputs += len(entries)
        if self.left[s] == 0:
            sink, self.sinks[s] = self._sink(s), None
            sink.close()
            self.left[s] = -1  # closed

    def _sink(self, s: int):
        if self.sinks[s] is None:
            self.sinks[s] = self.target.segments[s].open()
        return self.sinks[s]

    def _write(self, s: int, u: np.ndarray, k: np.ndarray, n: np.ndarray, y: torch.Tensor) -> None:
        start = self.target.segments[s].start
        if self.view == "images":
            self._sink(s).write(u - start, y.numpy())
        elif self.view == "slices":
            expected = np.asarray(self.rows.n_slices)[u]
            bad = np.flatnonzero(n != expected)
            if len(bad):
                i = int(u[bad[0]])
                raise DataError(
                    f"{self.rows.items[i]}: {int(n[bad[0]])} slices along axis {SLICE_AXIS}, the manifest says "
                    f"{int(expected[bad[0]])}"
                )
            self._sink(s).write(self.offsets[u] - self.offsets[start] + k, y.numpy())
        else:
            self._pool(s, u, n, y.double().numpy())

    def _pool(self, s: int, u: np.ndarray, n: np.ndarray, y: np.ndarray) -> None:
        """Slice features pooled per volume as they pass (in slice order, as the unfused extractor adds them); a
        volume's row is written once its last slice is in."""
        for i in range(len(u)):
            acc = self.pooled.setdefault(int(u[i]), [np.zeros(y.shape[1]), np.full(y.shape[1], -np.inf), 0])
            acc[0] += y[i]
            np.maximum(acc[1], y[i], out=acc[1])
            acc[2] += 1
            if acc[2] == n[i]:
                mean = acc[0] / acc[2]
                row = {"mean": mean, "max": acc[1], "mean_max": np.concatenate([mean, acc[1]])}[self.target.recipe.pool]
                self._sink(s).write(np.array([u[i] - self.target.segments[s].start]), row[None].astype(np.float32))
                del self.pooled[int(u[i])]

    def finish(self) -> None:
        for s in range(len(self.buf)):
            if self.left[s] > 0:
                raise RuntimeError(f"{self.target.encoder.defn.name}: entries lost in streaming (shard {s})")

    def abort(self) -> None:
        for s, sink in enumerate(self.sinks):
            if sink is not None:
                sink.abort()
                self.sinks[s] = None


def _image_inputs(targets: list[FusedTarget], rows: PassRows, units: list[int]):
    """The 2D loader's dataset and each target's slot in its tuple of inputs (one slot per distinct transform)."""
    keys = list(dict.fromkeys(pixel_key(t.recipe) for t in targets))
    transforms = [decoded_image_transform(k[0]) for k in keys]
    file_range = any(t.recipe.intensity == "range" for t in targets)
    slots = [keys.index(pixel_key(t.recipe)) for t in targets]
    return _ImagesOnce(rows.items, units, transforms, file_range), slots


def _volume_inputs(targets: list[FusedTarget], rows: PassRows, units: list[int]):
    """The volume loader's dataset and each target's slot: one preparation per distinct ``volume_key``, one slice
    transform per distinct ``pixel_key`` (PET fused into the slices view where the rows carry one)."""
    fuse = [t.recipe.view == "slices" and rows.pet is not None for t in targets]
    vkeys = list(dict.fromkeys(volume_key(t.recipe, f) for t, f in zip(targets, fuse)))
    pkeys = list(dict.fromkeys(pixel_key(t.recipe, f) for t, f in zip(targets, fuse)))
    preps, items = [None] * len(vkeys), [None] * len(vkeys)
    slicers = []
    for pk in pkeys:
        t = next(t for t, f in zip(targets, fuse) if pixel_key(t.recipe, f) == pk)
        load_volume, slice_transform = build_volume_transform(t.recipe, fuse_pet=pk[1])
        v = vkeys.index(volume_key(t.recipe, pk[1]))
        if preps[v] is None:
            preps[v] = load_volume.prepare
            items[v] = list(zip(rows.items, rows.pet)) if pk[1] else list(rows.items)
        slicers.append((v, slice_transform))
    slots = [pkeys.index(pixel_key(t.recipe, f)) for t, f in zip(targets, fuse)]
    return _VolumesOnce(items, units, preps, slicers), slots


@torch.inference_mode()
def extract_fused(
    targets: list[FusedTarget],
    rows: PassRows,
    device: torch.device | None = None,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
) -> FusedStats:
    """Every target's shards of ``rows``, from one decode of each entry's files. The keyword arguments decide
    only how fast the features come (batch, loader workers), never their values."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for enc in {id(t.encoder): t.encoder for t in targets}.values():
        _prepare(enc, device)
    units = sorted({u for t in targets for s in t.segments for u in range(s.start, s.stop)})
    volumes = targets[0].recipe.view != "images"
    dataset, slots = (_volume_inputs if volumes else _image_inputs)(targets, rows, units)
    workers = default_workers(device) if num_workers is None else num_workers
    if volumes:
        workers = min(workers, len(units))
    loader = input_loader(dataset, batch_size, workers, device)
    runs = [_TargetRun(t, slot, device, batch_size, rows) for t, slot in zip(targets, slots)]
    stats, t0 = FusedStats(entries=len(units)), time.perf_counter()
    try:
        for u, k, n, decodes, decode_s, transform_s, xs in loader:
            stats.decodes += int(decodes.sum())
            stats.decode_seconds += float(decode_s.sum())
            stats.transform_seconds += float(transform_s.sum())
            u, k, n = u.numpy(), k.numpy(), n.numpy()
            for r in runs:
                r.add(u, k, n, xs[r.slot])
        for r in runs:
            r.finish()
    except BaseException:
        for r in runs:
            r.abort()
        raise
    stats.seconds = time.perf_counter() - t0
    for r in runs:
        stats.inputs += r.inputs
        stats.forward_passes += r.run.passes
        stats.oom_backoffs += r.run.backoffs
        stats.per_target.append({"recipe": r.target.recipe.digest, "inputs": r.inputs, "passes": r.run.passes})
    return stats
