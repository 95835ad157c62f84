"""A trial's probe inputs: views of the feature store (read on demand), label maps, or online features.

A cell's feature set is opened memory-mapped (``FeatureStore.get``) and each split becomes the input form
its probe's descriptor declares (``dinoscale.probes.registry``): ``Split`` (a vector per unit),
``BagSplit`` (rows grouped per volume or slide) or ``SegSplit`` (grids stacked per volume, and label
maps). The arrays inside are ``dinoscale.features.rows.RowView``s: nothing is read until the probe asks,
and a split above the trial's budget (``features.resident_mb``) is read a mini-batch at a time.

Label maps are read once per split from the mask files (one volume at a time) into a ``.npy`` next to the
store, then read like features. Online cells (``features.online``, or a grid cache over
``features.cache_budget_gb``) get ``OnlineGrids``: the frozen backbone computes each mini-batch's grids
inside the head's training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from functools import partial
from pathlib import Path

import numpy as np

from dinoscale.data import DataError, RowSources, SplitUnits
from dinoscale.features import FeatureStore
from dinoscale.features.rows import RowView, take_items
from dinoscale.features.store import FeatureRows, _npy_header, _Shard
from dinoscale.probes import BagSplit, SegSplit, Split, get_probe
from dinoscale.sweep.cell import Cell
from dinoscale.tasks import get_task


def unit_rows(store: FeatureStore, digest: str, split: str, units: SplitUnits, view: str):
    """Open a feature set and find the rows of each unit: (rows, row indices in unit order, rows per unit).

    Checked against the manifest: every stored id is used exactly once, and a volume has as many slice rows
    as the manifest says."""
    fs = store.get(digest)
    ids, rows_per_id = fs.ids, fs.rows_per_id
    if view == "slices" and rows_per_id is None:  # format 2 kept one '<volume>#<k>' id per row
        ids, rows_per_id = _volumes_of_rows(ids)
    counts = np.asarray(rows_per_id if rows_per_id is not None else np.ones(len(ids)), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pos = {sid: i for i, sid in enumerate(ids)}
    groups = units.members if (units.members is not None and view != "slices") else [[sid] for sid in units.sample_ids]
    wanted = [sid for g in groups for sid in g]
    if len(pos) != len(ids) or len(wanted) != len(pos) or any(sid not in pos for sid in wanted):
        raise RuntimeError(f"feature set {digest} ({split}) lists other samples than the manifest; extract again")
    p = np.fromiter((pos[sid] for sid in wanted), dtype=np.int64, count=len(wanted))
    if view == "slices":
        expected = np.asarray(units.n_slices, dtype=np.int64)
        if rows_per_id is None or not np.array_equal(counts[p], expected):
            raise RuntimeError(
                f"feature set {digest} ({split}) has other slice counts than the manifest; extract again"
            )
    c = counts[p]
    index = np.repeat(starts[p] - np.concatenate([[0], np.cumsum(c)[:-1]]), c) + np.arange(c.sum())
    lengths = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    per_unit = np.add.reduceat(c, np.concatenate([[0], np.cumsum(lengths)[:-1]])) if len(c) else lengths
    per_unit[lengths == 0] = 0
    return fs.rows, index, per_unit


def _volumes_of_rows(row_ids: list[str]) -> tuple[list[str], list[int]]:
    """Volume ids and slice counts from consecutive ``<volume>#<k>`` row ids (``dinoscale.data.slice_row_ids``)."""
    ids: list[str] = []
    counts: list[int] = []
    for rid in row_ids:
        vol = rid.rsplit("#", 1)[0]
        if ids and ids[-1] == vol:
            counts[-1] += 1
        else:
            ids.append(vol)
            counts.append(1)
    return ids, counts


def stacked(rows, index: np.ndarray, per_unit: np.ndarray, units: SplitUnits, what: str, resident: int) -> RowView:
    """Items of equal row counts stacked: (n, S, *row) (slices of volumes), or (n, *row) for one row each."""
    if len(per_unit) and (per_unit != per_unit[0]).any():
        odd = int(np.flatnonzero(per_unit != per_unit[0])[0])
        raise ValueError(
            f"{what}: volume {units.sample_ids[odd]} has {per_unit[odd]} slices, {units.sample_ids[0]} "
            f"{per_unit[0]}; segmentation cells stack volumes, so every volume needs the same number of slices "
            "(set dataset.spacing or dataset.grid: volumes are then resampled and padded to one grid)"
        )
    return RowView(rows, index, group=None if units.n_slices is None else int(per_unit[0]), resident_bytes=resident)


def _mask_fingerprint(masks: list[str], n_slices, n_classes, grid=None, multilabel: bool = False) -> str:
    what = [masks, list(map(int, n_slices)) if n_slices else None, n_classes]
    if multilabel:  # bit-packed structures: other label checks (digests of single-label maps unchanged)
        what.append("bits")
    if grid is not None:  # label maps on a common grid (dinoscale.data.volumes): another grid, other maps
        what.append(grid.signature())
    h = hashlib.sha256(json.dumps(what).encode())
    for m in masks:
        st = os.stat(str(m).split("::")[0])
        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def label_maps(
    store: FeatureStore,
    units: SplitUnits,
    volumes: bool,
    n_classes: int | None,
    resident: int,
    multilabel: bool = False,
) -> RowView:
    """The split's label maps as a view of a ``.npy`` cache (built once, one mask at a time): (n, S, H, W) for
    volumes, (n, H, W) for 2D images. Semantic labels in [0, n_classes) are stored as uint8 (up to 256
    classes), instance ids as int64; ``multilabel``: bit-packed overlapping structures (n_classes - 1 bits)."""
    from dinoscale.data.masks import load_label_maps

    if not units.masks:
        load_label_maps(units.masks, None)  # the data module's message: this dataset lists no masks
    n_slices = units.n_slices if volumes else None
    grid = units.volume.grid if (volumes and units.volume is not None) else None
    path = store.local_dir / "labels" / f"{_mask_fingerprint(units.masks, n_slices, n_classes, grid, multilabel)}.npy"
    if not path.is_file():
        load = partial(load_label_maps, grid=grid, multilabel=multilabel)
        _write_label_maps(path, units.masks, n_slices, n_classes, load)
    shape, dtype, offset = _npy_header(str(path))
    rows = FeatureRows([_Shard(str(path), 0, shape[0], offset)], dtype, shape[1:])
    return RowView(rows, resident_bytes=resident)


def prepare_label_maps(plan) -> int:
    """Semantic segmentation cells: every split's label maps read and cached (as the trials read them, so they
    reuse the cache) before extraction starts, so that a label outside the probe's classes or a mask that does
    not fit its image is named before anything expensive runs. Returns the number of label-map sets."""
    from dinoscale.data import SPLITS

    ds = plan.dataset
    if ds is None or not ds.has_masks:
        return 0
    wanted = {
        (int(c.probe_config["n_classes"]), c.view == "slices", get_task(c.task).overlapping)
        for c in plan.cells
        if get_task(c.task).dense and (c.probe_config or {}).get("n_classes") is not None
    }
    store = FeatureStore(plan.storage / "features")
    for n_classes, volumes, multilabel in sorted(wanted):
        for split in SPLITS:
            label_maps(store, ds.units(split), volumes, n_classes, 0, multilabel)
    return len(wanted) * len(SPLITS)


def _write_label_maps(path: Path, masks, n_slices, n_classes, load_label_maps) -> None:
    dtype = np.dtype(np.uint8 if n_classes is not None and n_classes <= 256 else np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    first = None
    try:
        with open(tmp, "wb") as f:
            for i, m in enumerate(masks):
                arr = load_label_maps([m], [n_slices[i]] if n_slices is not None else None, n_classes)[0]
                if first is None:
                    first = arr.shape
                    header = {
                        "descr": np.lib.format.dtype_to_descr(dtype),
                        "fortran_order": False,
                        "shape": (len(masks), *first),
                    }
                    np.lib.format.write_array_header_1_0(f, header)
                elif arr.shape != first:
                    raise DataError(
                        f"{m}: mask shape {tuple(arr.shape)} differs from {masks[0]} {tuple(first)}; "
                        "segmentation cells stack volumes, so every image / volume needs one shape"
                    )
                f.write(np.ascontiguousarray(arr.astype(dtype)).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ImageMaps:
    """The units' images on their label maps' grid (``dinoscale.data.masks.image_on_label_grid``), read one item
    at a time when indexed: ``images[i]`` (H, W), or (S, H, W) for volumes. For probes that read the images
    beside the features (``ProbeDef.images``: registration's foreground mask and MIND-SSC)."""

    def __init__(self, items, volumes: bool, grid=None):
        self.items, self.volumes, self.grid = list(items), volumes, grid

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        from dinoscale.data.masks import image_on_label_grid

        return image_on_label_grid(self.items[int(i)], self.volumes, self.grid)

    @classmethod
    def joined(cls, parts: list[ImageMaps], idx) -> ImageMaps:
        """The items at positions ``idx`` of the parts one after the other (a replicate's regrouped split)."""
        items = [it for p in parts for it in p.items]
        return cls([items[int(i)] for i in idx], parts[0].volumes, parts[0].grid)


class OnlineGrids:
    """Patch-token grids computed by the frozen backbone when a mini-batch asks for them (``features.online``):
    ``x[idx]`` reads the units' images or volumes and runs the backbone, like extraction but nothing is
    stored. Rounded to the store's dtype, so online and cached features agree. Shape (n, S, D, h, w) for
    volumes, (n, D, h, w) for 2D images."""

    resident_bytes = 0  # never loaded whole: always read per mini-batch

    def __init__(self, cell: Cell, sources: RowSources, volumes: bool):
        self.cell, self.sources, self.volumes = cell, sources, volumes
        side = cell.resolution // cell.backbone.patch_size
        row = (cell.backbone.embed_dim, side, side)
        if volumes:
            s = set(sources.n_slices)
            if len(s) > 1:
                raise ValueError(
                    f"feature maps: volumes of {sorted(s)} slices; segmentation cells stack volumes, so every "
                    "volume needs the same number of slices (set dataset.spacing or dataset.grid: volumes are then resampled and padded to one grid)"
                )
            self.shape = (len(sources.ids), sources.n_slices[0], *row) if sources.ids else (0, 0, *row)
        else:
            self.shape = (len(sources.ids), *row)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)
        self._backbone = None

    @property
    def float32_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    def __len__(self) -> int:
        return self.shape[0]

    def _model(self):
        if self._backbone is None:
            from dinoscale.features.extract import _prepare, pick_device
            from dinoscale.models import load_backbone

            bb = self.cell.backbone
            self._backbone = load_backbone(bb.name, bb.weights, bb.weights_seed)
            self.device = pick_device()
            _prepare(self._backbone, self.device)
            if self._backbone.weights["digest"] != bb.weights_digest:
                raise RuntimeError(f"{bb.name}: loaded weights differ from the planned {bb.weights_digest}")
        return self._backbone

    def __getitem__(self, key) -> np.ndarray:
        from dinoscale.features.extract import extract_features, extract_volume_slices
        from dinoscale.features.rows import _index

        items = _index(key, len(self))
        c, bb = self.cell, self._model()
        recipe = c.recipe  # the feature sets' own recipe: patch grids, rounded to the stored dtype
        common = dict(device=self.device, batch_size=c.feature_batch, progress=False)
        if not self.volumes:
            paths = [self.sources.items[i] for i in items]
            x, _ = extract_features(bb, recipe, paths, **common)
            return x.astype(np.float32)
        pet = self.sources.channels.get("pet")
        out = []
        for i in items:
            x, _ = extract_volume_slices(
                bb,
                recipe,
                [self.sources.items[i]],
                [self.sources.n_slices[i]],
                pet_paths=[pet[i]] if pet else None,
                **common,
            )
            out.append(x.astype(np.float32))
        return np.stack(out) if out else np.zeros((0, *self.shape[1:]), np.float32)


def probe_inputs(
    cell: Cell, units: SplitUnits, store: FeatureStore, split: str, probe_spec, sources: RowSources | None = None
):
    """The probe's input for one split, by the input form its descriptor declares: ``Split`` (a vector per
    unit), ``BagSplit`` (rows grouped per volume / slide) or ``SegSplit`` (grids stacked per volume + label
    maps). Views of the store (or online features): nothing is loaded before the probe asks."""
    defn = get_probe(cell.probe)
    if not defn.streams:  # a probe that takes plain arrays gets the whole split in memory, as float32
        return _in_memory(probe_inputs_views(cell, units, store, split, probe_spec, sources))
    return probe_inputs_views(cell, units, store, split, probe_spec, sources)


def _in_memory(inp):
    if isinstance(inp, Split):
        return Split(np.asarray(inp.x, dtype=np.float32), inp.y, inp.exclusive, inp.select)
    if isinstance(inp, BagSplit):
        return BagSplit([np.asarray(b, dtype=np.float32) for b in inp.x], inp.y, inp.exclusive, inp.select)
    return SegSplit(
        np.asarray(inp.x, dtype=np.float32),
        np.asarray(inp.y).astype(np.int64),
        inp.volume_ids,
        inp.spacing,
        inp.multilabel,
        inp.images,  # read per item when the probe asks (ImageMaps)
    )


def label_spacing(units: SplitUnits, volume: bool) -> list | None:
    """Per-unit spacing in the label maps' axis order (None when any unit's is unknown: distances in voxels)."""
    from dinoscale.data.masks import label_map_spacing

    if units.spacing is None or any(sp is None for sp in units.spacing):
        return None
    return [label_map_spacing(sp, volume) for sp in units.spacing] if volume else None


def probe_inputs_views(cell: Cell, units: SplitUnits, store: FeatureStore, split: str, probe_spec, sources=None):
    resident = int(cell.memory.get("resident_bytes", 1 << 30))
    form = get_probe(cell.probe).input
    task = get_task(cell.task)
    if form == "grid":
        volumes, multilabel = cell.view == "slices", task.overlapping
        y = label_maps(store, units, volumes, getattr(probe_spec, "n_classes", None), resident, multilabel)
        spacing = label_spacing(units, volumes)
        grid = units.volume.grid if units.volume else None
        images = ImageMaps(units.items, volumes, grid) if get_probe(cell.probe).images else None
        if cell.online:
            src = sources or RowSources(units.sample_ids, units.items, units.n_slices, volume=units.volume)
            return SegSplit(OnlineGrids(cell, src, volumes), y, units.patient_ids, spacing, multilabel, images)
        rows, index, per_unit = unit_rows(store, dict(cell.feature_keys)[split], split, units, cell.view)
        x = stacked(rows, index, per_unit, units, "feature maps", resident)
        return SegSplit(x, y, units.patient_ids, spacing, multilabel, images)
    rows, index, per_unit = unit_rows(store, dict(cell.feature_keys)[split], split, units, cell.view)
    if form == "bag":
        ends = np.cumsum(per_unit)
        bags = [RowView(rows, index[e - n : e], resident_bytes=resident) for e, n in zip(ends, per_unit)]
        return BagSplit(bags, units.labels, task.exclusive, task.headline.name)
    if (per_unit != 1).any():
        raise RuntimeError(f"feature set of {cell.id} ({split}) has several rows per unit; a vector probe needs one")
    return Split(RowView(rows, index, resident_bytes=resident), units.labels, task.exclusive, task.headline.name)


def repartition(train, val, train_idx, val_idx):
    """The probe inputs of a replicate: the units of ``train`` + ``val`` (in that order) regrouped into a new
    train and val split by position (``dinoscale.data.splits.replicate_indices``). Works for every input form;
    views of the store stay views (nothing is read here)."""

    def take(idx):
        idx = np.asarray(idx, dtype=int)
        y = take_items([train.y, val.y], idx)
        if isinstance(train, BagSplit):
            bags = list(train.x) + list(val.x)
            return BagSplit([bags[i] for i in idx], y, train.exclusive, train.select)
        if isinstance(train, SegSplit):
            ids = None
            if train.volume_ids is not None and val.volume_ids is not None:
                ids = np.concatenate([train.volume_ids, val.volume_ids])[idx]
            spacing = None
            if train.spacing is not None and val.spacing is not None:
                both = list(train.spacing) + list(val.spacing)
                spacing = [both[i] for i in idx]
            images = None
            if train.images is not None and val.images is not None:
                images = ImageMaps.joined([train.images, val.images], idx)
            return SegSplit(take_items([train.x, val.x], idx), y, ids, spacing, train.multilabel, images)
        return Split(take_items([train.x, val.x], idx), y, train.exclusive, train.select)

    return take(train_idx), take(val_idx)
