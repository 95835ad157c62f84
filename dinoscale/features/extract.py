"""Backbone forward passes: 2D images or 3D volumes on disk -> features of one token set.

Token sets (registers are always excluded):

- ``cls``                 the CLS token of the last block (normed)
- ``mean_patch``          the mean of the last block's patch tokens (CNNs: global average pool)
- ``cls_mean_patch``      CLS ⊕ mean patch (the DINOv3 classification features)
- ``last<n>_cls``         the CLS tokens of the last n blocks, each normed, concatenated (DINOv2 linear eval)
- ``last<n>_cls_mean_patch``  the same ⊕ the mean patch of the last block (DINOv2's ``avgpool=True``)
- ``patch_grid``          the patch-token grid [N, D, H/p, W/p] for segmentation probes

GPU: ``inference_mode``, bf16 autocast, channels-last, pinned-memory DataLoader workers, and a
batch that halves on CUDA out-of-memory and retries (sticky for the rest of the run).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dinoscale.features.recipe import SLICE_AXIS, FeatureRecipe
from dinoscale.models import BackboneFacts, LoadedBackbone

log = logging.getLogger(__name__)

_LAST_N = re.compile(r"^last(\d+)_cls(_mean_patch)?$")
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class TokenSet:
    name: str
    n_last: int = 0  # > 0: CLS of the last n blocks
    cls: bool = False
    mean_patch: bool = False
    grid: bool = False


def parse_token_set(name: str) -> TokenSet:
    fixed = {
        "cls": TokenSet(name, cls=True),
        "mean_patch": TokenSet(name, mean_patch=True),
        "cls_mean_patch": TokenSet(name, cls=True, mean_patch=True),
        "patch_grid": TokenSet(name, grid=True),
    }
    if name in fixed:
        return fixed[name]
    m = _LAST_N.match(name)
    if m and int(m.group(1)) >= 1:
        return TokenSet(name, n_last=int(m.group(1)), cls=True, mean_patch=bool(m.group(2)))
    raise ValueError(f"unknown token set '{name}'; known: {', '.join(fixed)}, last<n>_cls, last<n>_cls_mean_patch")


def check_token_set(backbone: LoadedBackbone | BackboneFacts, token_set: str) -> TokenSet:
    """Fail before any forward pass (or at plan time, given ``backbone_facts``) when the backbone cannot
    give this token set."""
    ts = parse_token_set(token_set)
    facts = backbone.facts if isinstance(backbone, LoadedBackbone) else backbone
    name = facts.name if facts else backbone.defn.name
    has_cls = facts.has_cls if facts else True
    if ts.cls and not has_cls:
        raise ValueError(
            f"backbone '{name}' has no CLS token; token set '{token_set}' needs one (use 'mean_patch' or 'patch_grid')"
        )
    if ts.n_last and facts is not None and facts.output != "tokens":
        raise ValueError(f"backbone '{name}' has no token blocks for '{token_set}'")
    return ts


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, token_set: str, has_cls: bool = True) -> torch.Tensor:
    """``tokens``: [B, prefix + patches, D] from ``forward_features`` (already normed), or [B, D, h, w]
    from a CNN. Prefix tokens are ``[CLS?, registers...]``; registers never leak into the features."""
    ts = parse_token_set(token_set)
    if tokens.ndim == 4:  # CNN feature map: no CLS, no registers
        if ts.cls:
            raise ValueError(f"token set '{token_set}' needs a CLS token; a CNN feature map has none")
        return tokens.float() if ts.grid else tokens.mean((2, 3))
    patches = tokens[:, num_prefix_tokens:]
    if ts.grid:
        n = patches.shape[1]
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot reshape {n} patch tokens into a square grid")
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    if ts.n_last:
        raise ValueError("last-n token sets need the intermediate blocks: use forward_token_set")
    if ts.cls and not has_cls:
        raise ValueError(f"token set '{token_set}' needs a CLS token; this model has none")
    parts = ([tokens[:, 0]] if ts.cls else []) + ([patches.mean(1)] if ts.mean_patch else [])
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def forward_token_set(backbone: LoadedBackbone, x: torch.Tensor, ts: TokenSet) -> torch.Tensor:
    """One forward pass of ``x`` through the backbone, reduced to the token set."""
    model = backbone.model
    if ts.n_last:
        # Each intermediate block's tokens go through the final norm (DINOv2 ``get_intermediate_layers(norm=True)``).
        inter = model.forward_intermediates(
            x, indices=ts.n_last, norm=True, return_prefix_tokens=True, output_fmt="NCHW", intermediates_only=True
        )
        parts = [prefix[:, 0] for _, prefix in inter]
        if ts.mean_patch:
            parts.append(inter[-1][0].mean((2, 3)))
        return torch.cat(parts, dim=-1)
    tokens = model.forward_features(x)
    if ts.grid and tokens.ndim == 3:
        p = backbone.patch_size
        grid = tokens[:, backbone.num_prefix_tokens :]
        h, w = x.shape[-2] // p, x.shape[-1] // p
        return grid.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], h, w)
    return pool_tokens(tokens, backbone.num_prefix_tokens, ts.name, backbone.has_cls)


def _check_recipe(backbone: LoadedBackbone, recipe: FeatureRecipe, need_multiple: bool = True) -> TokenSet:
    """The recipe's token set, checked against the loaded backbone, and the recipe's encoder against it: the
    weights and the normalisation the recipe names are the ones loaded (else the key would lie)."""
    ts = check_token_set(backbone, recipe.tokens)
    if backbone.weights.get("digest", recipe.weights_digest) != recipe.weights_digest:
        raise RuntimeError(
            f"{backbone.defn.name}: loaded weights {backbone.weights['digest']} differ from the recipe's {recipe.weights_digest}"
        )
    if need_multiple and recipe.resolution % backbone.patch_size:
        raise ValueError(
            f"resolution {recipe.resolution} is not a multiple of {backbone.defn.name}'s patch size {backbone.patch_size}"
        )
    return ts


def recipe_for(backbone: LoadedBackbone, resolution: int, **fields) -> FeatureRecipe:
    """The recipe of ``backbone`` (its architecture, weights digest and own mean / std) at ``resolution``;
    ``fields``: any other recipe field (tokens, color, window + intensity, view, pool, volume, dtype, ...)."""
    if fields.get("window") is not None:
        fields.setdefault("intensity", "window")
    return FeatureRecipe(
        backbone=backbone.defn.arch_id,
        weights_digest=backbone.weights["digest"],
        resolution=resolution,
        mean=tuple(float(v) for v in backbone.mean),
        std=tuple(float(v) for v in backbone.std),
        **fields,
    )


@dataclass
class ExtractionStats:
    images: int
    forward_passes: int  # batches through the backbone (after any OOM back-off)
    seconds: float
    batch_size: int = 0  # the batch size in use at the end (smaller than asked after an OOM back-off)
    oom_backoffs: int = 0
    slices: int = 0  # 3D: 2D slices forwarded

    @property
    def images_per_second(self) -> float:
        return (self.slices or self.images) / self.seconds if self.seconds > 0 else 0.0


def pick_device() -> torch.device:
    # Choose from torch, not from Ray: a simulated GPU node sets CUDA_VISIBLE_DEVICES without a GPU.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_workers(device: torch.device) -> int:
    """CPU: 0 (the forward pass already uses every core; decoding inline avoids oversubscription).
    GPU: enough decoding processes to keep the GPU fed, leaving one core to the driver loop."""
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class _Runner:
    """Forwards host batches through the model in chunks; on CUDA OOM halves the chunk and retries."""

    def __init__(self, backbone: LoadedBackbone, ts: TokenSet, device: torch.device, batch_size: int):
        self.backbone, self.ts, self.device = backbone, ts, device
        self.micro, self.passes, self.backoffs = batch_size, 0, 0
        self.cuda = device.type == "cuda"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:  # [B, C, 3, H, W]: each channel through the encoder as grey, features averaged over C
            b, c = x.shape[:2]
            y = self(x.flatten(0, 1))
            return y.reshape(b, c, *y.shape[1:]).mean(1)
        outs, i = [], 0
        while i < x.shape[0]:
            m = self.micro
            try:
                outs.append(self._forward(x[i : i + m]))
            except _OOM:
                if m == 1:
                    raise
                oom = True
            else:
                oom = False
            if oom:  # outside the except block: the failed chunk's tensors are released first
                self.micro, self.backoffs = max(1, m // 2), self.backoffs + 1
                if self.cuda:
                    torch.cuda.empty_cache()
                log.warning("out of memory at batch %d: retrying with batch %d", m, self.micro)
                continue
            i += m
            self.passes += 1
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        chunk = chunk.to(self.device, non_blocking=True)
        if self.cuda:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            y = forward_token_set(self.backbone, chunk, self.ts)
        return y.float().cpu()


class ArraySink:
    """Rows collected in memory (what the extraction functions return when no sink is given); a
    ``dinoscale.features.store.ShardWriter`` is the other sink: rows streamed to a shard on disk."""

    def __init__(self, n_rows: int, dtype: str = "float32"):
        self.n_rows, self.dtype, self.array = n_rows, dtype, None

    def write(self, rows, values: np.ndarray) -> None:
        if self.array is None:  # preallocated once: memory = the result, not the result twice
            self.array = np.empty((self.n_rows, *values.shape[1:]), dtype=self.dtype)
        self.array[rows] = values

    def result(self) -> np.ndarray:
        return self.array if self.array is not None else np.zeros((0, 0), self.dtype)


def _progress(total: int, desc: str, progress: bool | None):

    # disable=None: quiet when stderr is not a terminal (Ray workers, CI logs).
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress is None else not progress, leave=False)


def _prepare(backbone: LoadedBackbone, device: torch.device):
    model = backbone.model.to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def extract_features(
    backbone: LoadedBackbone,
    recipe: FeatureRecipe,
    rows: Sequence[str] | torch.utils.data.Dataset,
    device: torch.device | None = None,
    out=None,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray | None, ExtractionStats]:
    """Features of 2D images under ``recipe``, in input order: [N, D] (or [N, D, H/p, W/p] for ``patch_grid``).

    ``recipe``: everything that decides the features (``dinoscale.features.recipe``); the keyword arguments
    decide only how fast they come (batch, loader workers, progress bar), never their values.
    ``rows``: image files (read through MONAI under the recipe's colour model, intensity mapping, resize and
    normalisation) or any Dataset of preprocessed [3, H, W] tensors.
    ``out``: a sink (``write(rows, values)``, e.g. a store ``ShardWriter``) that receives each batch as it
    is computed, so memory is one batch; then the returned array is None. Default: returned in memory
    (in the recipe's dtype).
    """
    from dinoscale.data.preprocess import ImageFiles, build_transform

    resolution = recipe.resolution
    ts = _check_recipe(backbone, recipe)
    device = device or pick_device()
    _prepare(backbone, device)
    if isinstance(rows, torch.utils.data.Dataset):
        dataset = rows
    else:
        dataset = ImageFiles(list(rows), build_transform(recipe))
    workers = default_workers(device) if num_workers is None else num_workers
    loader = input_loader(dataset, batch_size, workers, device)
    run = _Runner(backbone, ts, device, batch_size)
    n, done, t0 = len(dataset), 0, time.perf_counter()
    sink = out if out is not None else ArraySink(n, recipe.dtype)
    with _progress(n, f"{backbone.defn.name}@{resolution}", progress) as bar:
        for x in loader:
            y = run(x).numpy()
            sink.write(np.arange(done, done + len(y)), y)
            done += len(y)
            bar.update(len(y))
    feats = sink.result() if out is None else None
    return feats, ExtractionStats(n, run.passes, time.perf_counter() - t0, run.micro, run.backoffs)


class _VolumeSlices(torch.utils.data.IterableDataset):
    """Streams (volume index, slice count, slice tensor) one volume at a time per worker, so memory is
    one volume per worker plus the prefetched batches, whatever the number of volumes."""

    def __init__(self, paths: Sequence, load_volume, slice_transform, axis: int):
        self.paths, self.load_volume, self.slice_transform, self.axis = list(paths), load_volume, slice_transform, axis

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for v in range(wid, len(self.paths), nw):
            vol = self.load_volume(self.paths[v])  # [H, W, D] (or [C, H, W, D]) float in [0, 1]
            n = vol.shape[self.axis]
            for k in range(n):
                yield v, k, n, self.slice_transform(vol.select(self.axis, k))
            del vol


def _volume_loader(
    items: Sequence,
    load_volume,
    slice_transform,
    axis: int,
    batch_size: int,
    device: torch.device,
    num_workers: int | None,
) -> torch.utils.data.DataLoader:
    """Batches of (volume index, slice index, slice count, slice tensor), one volume in memory per worker."""
    workers = default_workers(device) if num_workers is None else min(num_workers, len(items))
    return input_loader(_VolumeSlices(items, load_volume, slice_transform, axis), batch_size, workers, device)


def input_loader(dataset, batch_size: int, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    """The loader every extraction reads its inputs through: ``workers`` decode beside the encoder, pinned
    memory on a GPU, four batches prefetched per worker."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


@torch.inference_mode()
def extract_volume_features(
    backbone: LoadedBackbone,
    recipe: FeatureRecipe,
    rows: Sequence[str],
    device: torch.device | None = None,
    out=None,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray | None, ExtractionStats]:
    """Per-volume features of 3D volumes (NIfTI etc. through MONAI) under ``recipe`` (view 'volumes'), slice
    by slice along the slice axis (RAS: axial).

    Slice features are pooled per volume as they stream past (``recipe.pool``: mean, max, or mean_max =
    mean ⊕ max); only [volumes, D] running sums/maxima are kept. The recipe's intensity mapping (a CT window,
    else each volume's min-max), channel map and grid (``recipe.volume``) decide the slices. ``out``: a sink
    given the pooled rows at the end (then None is returned), as for ``extract_features``.
    """
    from dinoscale.data.preprocess import build_volume_transform

    paths, pool, resolution = list(rows), recipe.pool, recipe.resolution
    if pool not in ("mean", "max", "mean_max"):
        raise ValueError(f"unknown volume pooling '{pool}' (mean, max, mean_max)")
    ts = _check_recipe(backbone, recipe, need_multiple=False)
    if ts.grid:
        raise ValueError("patch_grid of volumes is not pooled per volume; extract slices with extract_volume_slices")
    device = device or pick_device()
    _prepare(backbone, device)
    load_volume, slice_transform = build_volume_transform(recipe)
    loader = _volume_loader(paths, load_volume, slice_transform, SLICE_AXIS, batch_size, device, num_workers)
    run = _Runner(backbone, ts, device, batch_size)
    sums: np.ndarray | None = None
    maxs: np.ndarray | None = None
    seen = np.zeros(len(paths), np.int64)
    expected = np.zeros(len(paths), np.int64)
    slices, t0 = 0, time.perf_counter()
    with _progress(len(paths), f"{backbone.defn.name}@{resolution} volumes", progress) as bar:
        for vidx, _, nslices, x in loader:
            y = run(x).double().numpy()
            if sums is None:
                sums = np.zeros((len(paths), y.shape[1]))
                maxs = np.full((len(paths), y.shape[1]), -np.inf)
            v = vidx.numpy()
            np.add.at(sums, v, y)
            np.maximum.at(maxs, v, y)
            np.add.at(seen, v, 1)
            expected[v] = nslices.numpy()
            slices += len(v)
            bar.update(int(((seen == expected) & (expected > 0)).sum()) - bar.n)
    if sums is None:
        return np.zeros((0, 0), np.float32), ExtractionStats(0, 0, time.perf_counter() - t0)
    if (seen != expected).any():
        raise RuntimeError(f"volume slices lost in streaming: {np.flatnonzero(seen != expected).tolist()}")
    mean = sums / seen[:, None]
    feats = {"mean": mean, "max": maxs, "mean_max": np.concatenate([mean, maxs], 1)}[pool].astype(np.float32)
    stats = ExtractionStats(len(paths), run.passes, time.perf_counter() - t0, run.micro, run.backoffs, slices)
    if out is not None:
        out.write(np.arange(len(feats)), feats)
        return None, stats
    return feats, stats


@torch.inference_mode()
def extract_volume_slices(
    backbone: LoadedBackbone,
    recipe: FeatureRecipe,
    rows: Sequence[str],
    n_slices: Sequence[int],
    pet_paths: Sequence[str] | None = None,
    device: torch.device | None = None,
    out=None,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray | None, ExtractionStats]:
    """Per-slice features of 3D volumes under ``recipe`` (view 'slices'), one row per slice, volume after
    volume (slice k of volume v at row ``sum(n_slices[:v]) + k``): [sum(n_slices), D] or, for
    ``patch_grid``, [sum, D, h, w]. ``out``: a sink receiving each batch of rows at their offsets (memory:
    one batch and one volume per loader worker, whatever the number of volumes); then None is returned.

    The rows feed segmentation heads (slice feature maps, stacked back into volumes by the trial) and
    the attention pooling of 3D classification. The rows are ``rows`` (volume files), ``n_slices`` (the
    manifest's slice count per volume, of the recipe's grid if it has one; a volume with another count
    is an error naming its file) and ``pet_paths``: PET volumes co-registered with the CT ``rows``, fused
    into the three input channels (see ``build_volume_transform``).
    """
    from dinoscale.data import DataError
    from dinoscale.data.preprocess import build_volume_transform

    paths, resolution, axis = list(rows), recipe.resolution, SLICE_AXIS
    ts = _check_recipe(backbone, recipe)
    device = device or pick_device()
    _prepare(backbone, device)
    load_volume, slice_transform = build_volume_transform(recipe, fuse_pet=pet_paths is not None)
    items = list(zip(paths, pet_paths)) if pet_paths is not None else list(paths)
    offsets = np.concatenate([[0], np.cumsum(n_slices)]).astype(np.int64)
    loader = _volume_loader(items, load_volume, slice_transform, axis, batch_size, device, num_workers)
    run = _Runner(backbone, ts, device, batch_size)
    sink = out if out is not None else ArraySink(int(offsets[-1]), recipe.dtype)
    seen = np.zeros(offsets[-1], bool)
    t0 = time.perf_counter()
    with _progress(int(offsets[-1]), f"{backbone.defn.name}@{resolution} slices", progress) as bar:
        for vidx, kidx, nslices, x in loader:
            v, k, n = vidx.numpy(), kidx.numpy(), nslices.numpy()
            bad = np.flatnonzero(n != np.asarray(n_slices)[v])
            if len(bad):
                i = int(v[bad[0]])
                raise DataError(
                    f"{paths[i]}: {int(n[bad[0]])} slices along axis {axis}, the manifest says {n_slices[i]}"
                )
            y = run(x).numpy()
            rows = offsets[v] + k
            sink.write(rows, y)
            seen[rows] = True
            bar.update(len(rows))
    if not seen.all():
        raise RuntimeError(f"volume slices lost in streaming: rows {np.flatnonzero(~seen)[:10].tolist()}")
    stats = ExtractionStats(len(items), run.passes, time.perf_counter() - t0, run.micro, run.backoffs, int(offsets[-1]))
    return (sink.result() if out is None else None), stats
