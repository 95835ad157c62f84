"""The plan: the grid of resolved cells, the feature sets they need (cached or to extract) and the cost.

A cell is (dataset, backbone, resolution, probe, strategy, seed), resolved into everything its trial
needs (``dinoscale.sweep.cell.Cell``). A feature set is one backbone forward pass over one split at
one resolution in one view; every cell of that backbone, resolution and view shares it, whatever its
probe or seed. What a probe reads (view, tokens) is asked of its descriptor, what a dataset holds
(volumes, bags, extra channels) of the prepared dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from dinoscale import record, settings
from dinoscale.data import (
    SPLITS,
    DataError,
    PreparedDataset,
    RowSources,
    dataset_color,
    dataset_replicates,
    dataset_task,
    prepare_dataset,
    published_size,
)
from dinoscale.data.external import EXTERNAL_SPLIT, class_mapping, external_dataset
from dinoscale.data.splits import describe_recipe, replicate_recipe, train_size_label, train_subset_recipe
from dinoscale.data.windows import window_range
from dinoscale.errors import UserError
from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore
from dinoscale.features.recipe import DEFAULT_PERCENTILES, resolve_intensity
from dinoscale.models import backbone_facts, get_backbone, weights_identity
from dinoscale.probes import get_probe
from dinoscale.probes.registry import GRID_TOKENS, unfit_message
from dinoscale.provenance import Provenance
from dinoscale.search import finetune_configurations
from dinoscale.spec import DatasetSpec, FeaturesSpec, ResourcesSpec, StorageSpec, SweepSpec, TrainSizeSpec
from dinoscale.strategies.registry import TRAINING, get_strategy
from dinoscale.sweep import cost
from dinoscale.sweep.cell import BackboneInfo, Cell
from dinoscale.tasks import get_task, task_names
from dinoscale.train.heads import dense_classes, head_settings
from dinoscale.train.memory import estimate_bytes, fit_in_memory, strategy_facts

# The strategies that train the encoder: a live view of the strategy registry (dinoscale.strategies). Their
# cells train under a task head (dinoscale.train.heads), labelled as the probe it stands for ('linear' on
# classification, the spec's segmentation probe on dense tasks) so frozen and trained cells pair up.
TRAINING_STRATEGIES = TRAINING
# the probe inputs whose fitted model scores external test sets (a vector or a bag per unit; not label maps)
EXTERNAL_INPUTS = ("vector", "bag")


class NotRunnableError(UserError, RuntimeError):
    """A valid spec whose cells cannot run on this dataset (said before anything starts)."""

    kind = "spec"


def backbone_info(name: str, weights: str, seed: int) -> BackboneInfo:
    """Identity of the weights + facts measured from the model on the meta device (no memory, no weights)."""
    defn = get_backbone(name)
    ident = weights_identity(defn, weights, seed)
    facts = backbone_facts(name, hub=ident["kind"] == "hub")
    return BackboneInfo(
        name,
        weights,
        seed,
        ident["kind"],
        ident["digest"],
        defn.arch_id,
        facts.n_params,
        facts.patch_size,
        tuple(facts.mean),
        tuple(facts.std),
        facts.num_prefix_tokens,
        facts.embed_dim,
    )


@dataclass(frozen=True)
class FeatureSetPlan:
    backbone: BackboneInfo
    resolution: int
    split: str
    key: FeatureKey | None  # None when the data is not available (plan without data)
    n_images: int  # manifest rows: images (tiles), or volumes for 3D
    cached: bool
    n_slices: int = 0  # backbone forward passes (= n_images for 2D and pooled-volume views count slices)
    view: str = "images"  # how the rows are laid out (dinoscale.probes.registry.VIEWS)
    tokens: str = ""  # token set of the rows
    recipe: FeatureRecipe | None = None  # how a unit becomes features (with data, the key carries it too)
    n_rows: int = 0  # stored rows: images / tiles, volumes, or slices
    row_elements: int = 0  # values per row (the token set's width, or D x h x w for grids)
    dtype: str = "float16"
    shards: tuple[tuple[int, int], ...] = ()  # manifest-row ranges [a, b), one per shard (with data)
    n_shards: int = 1
    committed_shards: int = 0  # shards already in the store (an interrupted extraction)
    online: bool = False  # grid features computed inside the trials instead of cached
    estimated: bool = False  # counts from the dataset's published size (no data)
    extraction_peak: float = 0.0  # predicted host memory of one extraction task of this set (bytes)
    external: str = ""  # the external test set (spec ``external``) whose rows it holds; '' for the internal ones

    @property
    def label(self) -> str:
        """Its rows in words: the split, or ``external:<label>`` for an external test set's."""
        return f"{self.split}:{self.external}" if self.external else self.split

    @property
    def tokens_per_image(self) -> int:
        return self.backbone.tokens_per_image(self.resolution)

    @property
    def gflops(self) -> float:
        """Forward cost of the split: measured GFLOPs per image (slice) x images (slices)."""
        return self.backbone.gflops_per_image(self.resolution) * max(self.n_slices, self.n_images)

    @property
    def nbytes(self) -> int:
        """Predicted size on disk: rows x row width x dtype, plus one ``.npy`` header per shard."""

        return self.n_rows * self.row_elements * np.dtype(self.dtype).itemsize + self.n_shards * cost.NPY_HEADER_BYTES

    @property
    def float32_bytes(self) -> int:
        return self.n_rows * self.row_elements * 4


@dataclass(frozen=True)
class ExternalSet:
    """An external test set (spec ``external``) as the plan resolved it: its rows relabelled onto the internal
    classes (``dinoscale.data.external``), the mapping, and the data part its recipe reads (colour, intensity)."""

    label: str
    dataset: PreparedDataset
    mapping: dict[str, str]  # external class -> internal class
    rows: str  # all | test: which of its rows are scored
    data: _Data

    @property
    def classes(self) -> list[str]:
        """The internal classes it is scored on."""
        return self.dataset.classes


@dataclass
class Plan:
    spec: SweepSpec
    dataset: PreparedDataset | None
    dataset_error: str | None
    cells: list[Cell]
    feature_sets: list[FeatureSetPlan]
    storage: Path
    published: object = None  # dinoscale.data.PublishedSize the counts come from when there is no data
    externals: dict[str, ExternalSet] = dataclasses.field(default_factory=dict)  # label -> external test set

    def rows(self, fs: FeatureSetPlan) -> RowSources:
        """The rows a feature set is extracted from: its split of the internal dataset, or its external set's."""
        ds = self.externals[fs.external].dataset if fs.external else self.dataset
        return ds.sources(fs.split)

    @property
    def missing(self) -> list[FeatureSetPlan]:
        """Feature sets to extract (online ones are computed inside their trials, never extracted)."""
        return [f for f in self.feature_sets if not f.cached and not f.online]

    @property
    def is_runnable(self) -> bool:
        return self.dataset is not None

    def estimated_gflops(self) -> float:
        """Forward cost of the missing feature sets (without data: of every set, from the published size)."""
        sets = self.missing if self.dataset is not None else [f for f in self.feature_sets if not f.online]
        return sum(f.gflops for f in sets)

    def forward_passes(self) -> int:
        sets = self.missing if self.dataset is not None else [f for f in self.feature_sets if not f.online]
        return sum(max(f.n_slices, f.n_images) for f in sets)

    def cell(self, cell_id: str) -> Cell:
        return next(c for c in self.cells if c.id == cell_id)

    def provenance(self) -> Provenance:
        """The one provenance decision of the sweep: its profile, its data's tags and its backbones' weights."""
        kinds = {(c.backbone.name, c.backbone.weights): c.backbone.weights_kind for c in self.cells}
        return Provenance.of_sweep(
            self.spec.profile, self.dataset.provenance if self.dataset else {}, list(kinds.values())
        )


def storage_root(storage: StorageSpec, project_dir: Path | None = None) -> Path:
    """The one storage setting (``dinoscale.settings``): --storage / DINOSCALE_STORAGE, else ``storage.path``."""
    return settings.storage_root(storage.path, project_dir=project_dir)


def volume_window(dataset: DatasetSpec) -> tuple[float, float] | None:
    """The CT window of ``dataset.window`` (a preset or [HU min, HU max]) as a range, or None."""
    return window_range(dataset.window) if dataset.window is not None else None


def feature_recipe(
    f: FeaturesSpec,
    bb: BackboneInfo,
    resolution: int,
    view: str = "images",
    tokens: str | None = None,
    *,
    color: str = "grey",
    window: tuple[float, float] | None = None,
    channels: tuple[str, ...] = (),
    volume=None,
    intensity: str = "auto",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    modality: str = "",
) -> FeatureRecipe:
    """The one recipe of a feature set (``dinoscale.features.recipe``): the encoder and its own mean / std,
    the dataset's colour model (2D images), the intensity mapping (``intensity``: 'auto' is the default of this
    kind of data, ``features.recipe.resolve_intensity``; ``window``: a CT window), the resize, the volumes' channel map and grid (``volume``, or ``channels``
    fused under their default map), the token set and pooling, the storage dtype. ``view``: images |
    volumes | slices."""
    return FeatureRecipe(
        backbone=bb.arch_id,
        weights_digest=bb.weights_digest,
        resolution=resolution,
        mean=tuple(bb.mean),
        std=tuple(bb.std),
        color=color if view == "images" else "grey",
        **_intensity_fields(intensity, view, modality, window, percentiles),
        interpolation=f.interpolation,
        antialias="separable" if view == "images" else "gaussian",
        volume=volume if view != "images" else None,
        fusion=",".join(channels) if view != "images" and volume is None else "",
        view=view,
        tokens=tokens or f.tokens,
        pool=f.volume_pool if view == "volumes" else "",
        dtype=f.dtype,
    )


def _intensity_fields(intensity: str, view: str, modality: str, window, percentiles) -> dict:
    """The recipe's intensity mapping (its defaults and their sources: ``features.recipe.resolve_intensity``)."""
    if intensity == "range" and view != "images":
        raise NotRunnableError(
            "dataset.intensity 'range' (the file's declared range) is for 2D images: volumes are read as floats; "
            "use percentiles, minmax or a CT window (dataset.window)"
        )
    if intensity == "window" and window is None:
        raise NotRunnableError("dataset.intensity 'window' needs dataset.window (a preset or [HU min, HU max])")
    return resolve_intensity(intensity, view, modality, window, percentiles)[0]


def feature_key(recipe: FeatureRecipe, manifest_digest: str) -> FeatureKey:
    """The store key of one feature set: its recipe applied to one split's rows."""
    return FeatureKey(recipe, manifest_digest)


def _trial_key(spec: SweepSpec, cell_fields: dict) -> str:
    """Deterministic identity of a cell's result: same spec content + same cell -> same key."""
    blob = json.dumps(
        {
            "sweep": spec.name,
            record.DATASET_PARAM: spec.dataset.model_dump(mode="json"),
            "metrics": spec.metrics.model_dump(mode="json"),
            # how features are sharded, held or budgeted changes no number: not part of a result's identity
            "features": spec.features.model_dump(
                mode="json", exclude={"shard_forward_passes", "shard_mb", "resident_mb", "cache_budget_gb", "online"}
            ),
            "search": spec.search.model_dump(mode="json"),
            **cell_fields,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _flat(config: dict, prefix: str) -> dict:
    out = {}
    for k, v in config.items():
        if k == "kind":
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _protocol_params(
    spec: SweepSpec, bb: BackboneInfo, gflops: float, config: dict, prefix: str, replicate: dict
) -> dict:
    """The constants a cell's run logs beside its axes, so a reader can compare with a paper line by line."""
    return {
        "replicate_split": describe_recipe(replicate),
        record.MACRO_MIN_PATIENTS: spec.metrics.macro_min_patients,
        "min_interval_units": spec.metrics.min_interval_units,
        record.DATASET_PARAM: spec.dataset.name,
        record.MODALITY_PARAM: spec.modality,
        "backbone_arch": bb.arch_id,
        record.WEIGHTS_PARAM: bb.weights,
        record.GFLOPS_PER_IMAGE: round(gflops, 4),
        "tokens": spec.features.tokens,
        "interpolation": spec.features.interpolation,
        "feature_dtype": spec.features.dtype,
        "bootstrap_resamples": spec.metrics.bootstrap.resamples,
        "bootstrap_level": spec.metrics.bootstrap.level,
        **_flat(config, prefix),
    }


def build_plan(spec: SweepSpec, project_dir: Path | None = None, require_data: bool = False) -> Plan:
    root = storage_root(spec.storage, project_dir)
    ds, ds_error = _prepared_dataset(spec.dataset, root, require_data)
    infos = [backbone_info(b.name, b.weights, b.weights_seed) for b in spec.backbones]
    if "frozen" in spec.strategies:
        from dinoscale.features.extract import check_token_set

        for b in spec.backbones:  # e.g. CLS features from a model without a CLS token: fail before anything runs
            check_token_set(backbone_facts(b.name), spec.features.tokens)
    for bb, res in itertools.product(infos, spec.resolutions):
        if res % bb.patch_size:
            raise ValueError(f"resolution {res} is not a multiple of {bb.name}'s patch size {bb.patch_size}")
    published = published_size(spec.dataset.name, spec.dataset.subset) if ds is None else None
    data = _Data.of(spec, ds, published)
    externals = external_sets(spec, ds, root, require_data)
    sets = _FeatureSets.of(data, spec, infos, FeatureStore(root / "features"), externals)
    task = ds.task if ds is not None else dataset_task(spec.dataset.name)
    common = {
        "task": task,
        "search": spec.search.model_dump(mode="json"),
        "bootstrap": {
            **spec.metrics.bootstrap.model_dump(mode="json"),
            record.MACRO_MIN_PATIENTS: spec.metrics.macro_min_patients,
            "min_interval_units": spec.metrics.min_interval_units,
        },
    }
    cells = []
    grid = itertools.product(infos, spec.resolutions, spec.strategies, spec.seeds, _train_sizes(spec.train_size))
    for bb, res, strategy, seed, size in grid:
        replicate = replicate_recipe(
            seed,
            spec.dataset.split.seed,
            ds.replicates if ds is not None else dataset_replicates(spec.dataset.name),
            spec.dataset.split.replicates,
            ds.folds if ds is not None else (spec.dataset.split.folds or 0),  # without data: the spec's folds
        )
        if size is not None:  # the training-set-size axis: a subset of the replicate's train patients
            replicate = {
                **replicate,
                "train": train_subset_recipe(spec.train_size.unit, size, spec.dataset.split.seed, seed),
            }
        if strategy in TRAINING_STRATEGIES:
            new = _finetune_cells(spec, data, task, bb, res, strategy, seed, sets.manifests, common, replicate)
        else:
            new = _frozen_cells(spec, data, sets, bb, res, strategy, seed, replicate, common)
        cells.extend(new if size is None else [_at_train_size(c, spec.train_size, size) for c in new])
    ordered = order_cells(cells, spec.resources.cell_order, spec.seeds, spec.strategies)
    return Plan(spec, ds, ds_error, ordered, sets.feature_sets, root, published, externals)


def external_sets(spec: SweepSpec, ds: PreparedDataset | None, root: Path, require_data: bool) -> dict:
    """The external test sets (spec ``external``), each prepared by its adapter and mapped onto the internal
    classes (an unmapped class is refused here, before anything runs). None without the internal data."""
    out: dict[str, ExternalSet] = {}
    if ds is None or not spec.external:
        return out
    if get_task(ds.task).dense:
        raise NotRunnableError(
            f"external test sets score classification cells; '{ds.name}' is a {ds.task} dataset (drop 'external')"
        )
    for e in spec.external:
        try:
            ext = prepare_dataset(e.dataset, root)
        except DataError as err:
            if require_data:
                raise DataError(f"external '{e.label}': {err}") from None
            continue  # a plan without the external data: its sets are not counted
        if get_task(ext.task).dense:
            raise NotRunnableError(
                f"external '{e.label}': '{ext.name}' is a {ext.task} dataset; external sets classify"
            )
        mapping = class_mapping(e.label, ext.classes, ds.classes, e.classes, e.drop)
        mapped = external_dataset(ext, e.split, mapping, ds.classes, e.label, e.centers)
        out[e.label] = ExternalSet(e.label, mapped, mapping, e.split, _Data.of(spec, mapped, None, e.dataset))
    return out


def _train_sizes(train_size: TrainSizeSpec | None) -> list:
    """The training-set sizes of the grid: [None] (every train patient) where the spec has no such axis."""
    return train_size.values if train_size is not None else [None]


def _at_train_size(cell: Cell, train_size: TrainSizeSpec, size: float) -> Cell:
    """A cell at one training-set size: the axis in its position (its id and params); the features, their
    store keys and recipe are those of the whole split (a size costs probe fits only)."""
    return dataclasses.replace(
        cell, axes={**cell.axes, record.TRAIN_SIZE_AXIS: train_size_label(train_size.unit, size)}
    )


def order_cells(cells: list[Cell], order: str, seeds: list[int], strategies: list[str]) -> list[Cell]:
    """The order the trials run in (``resources.cell_order``): 'cheapest' puts one replicate of every cell
    before the next, frozen before the training strategies (in the spec's order), then the smaller forward
    pass first, so that a sweep stopped halfway has whole curves; 'grid' keeps the spec's order."""
    if order == "grid":
        return cells
    seed_rank, strategy_rank = {s: i for i, s in enumerate(seeds)}, {s: i for i, s in enumerate(strategies)}
    rank = {id(c): i for i, c in enumerate(cells)}  # ties keep the grid's order (probes of one cell together)
    return sorted(
        cells,
        key=lambda c: (
            seed_rank[c.seed],
            c.strategy != "frozen",
            strategy_rank[c.strategy],
            c.gflops_per_image,
            rank[id(c)],
        ),
    )


def _prepared_dataset(
    dataset: DatasetSpec, root: Path, require_data: bool
) -> tuple[PreparedDataset | None, str | None]:
    """The dataset, or None and why (a plan without data counts from the published size)."""
    try:
        return prepare_dataset(dataset, root), None
    except DataError as e:
        if require_data:
            raise
        return None, str(e)


@dataclass(frozen=True)
class _Data:
    """What the recipe, feature-set and memory helpers read: the dataset and features parts of the spec, the
    prepared dataset (None without data: the published size counts then) and where the work runs."""

    dataset: DatasetSpec
    features: FeaturesSpec
    modality: str
    ds: PreparedDataset | None
    published: object  # dinoscale.data.PublishedSize, without data
    on_gpu: bool  # the paper profile: extraction and trials on GPUs
    extraction_workers: int  # loader workers of one extraction task on a GPU node

    @classmethod
    def of(cls, spec: SweepSpec, ds: PreparedDataset | None, published, dataset: DatasetSpec | None = None) -> _Data:
        """``dataset``: the section of the data (an external set's); default the spec's ``dataset``."""
        gpu = spec.profile == "paper"
        workers = min(8, max(1, int(spec.resources.cpus_per_extraction) - 1)) if gpu else 0
        return cls(dataset or spec.dataset, spec.features, spec.modality, ds, published, gpu, workers)

    @property
    def volumetric(self) -> bool:
        return self.ds.volumetric if self.ds is not None else bool(self.published and self.published.volumetric)

    def recipe(self, bb: BackboneInfo, res: int, view: str, tokens: str) -> FeatureRecipe:
        """The recipe of one (backbone, resolution, view, tokens) group of feature sets: what the spec's features
        part says, with the dataset's colour model (its adapter's declaration without data), CT window and
        volumes."""
        ds, volumes = self.ds, self.ds is not None and view != "images"
        return feature_recipe(
            self.features,
            bb,
            res,
            view,
            tokens,
            color=ds.color if ds is not None else dataset_color(self.dataset),
            window=volume_window(self.dataset),
            channels=ds.channels if volumes else (),
            volume=ds.volume if volumes else None,
            intensity=self.dataset.intensity,
            percentiles=self.dataset.percentiles,
            modality=self.modality,
        )

    def typical_pixels(self, resolution: int) -> int:
        """In-plane pixels of one input (label maps, volumes in a loader): the phantom's size, the published
        typical size, else the resolution."""
        ph, published = self.dataset.phantom, self.published
        if ph is not None:
            return ph.image_size**2
        if published is not None and published.pixels[0]:
            return published.pixels[0] * published.pixels[1]
        return resolution**2


@dataclass
class _FeatureSets:
    """The feature sets of a sweep's frozen cells, and what the cells need to find theirs."""

    feature_sets: list[FeatureSetPlan]
    reads: dict[str, tuple[str, str]]  # probe kind -> (view, tokens) it reads
    recipes: dict[tuple, FeatureRecipe]  # (backbone, resolution, view, tokens) -> the sets' recipe
    keys: dict[tuple, dict[str, str]]  # (backbone, resolution, view, tokens) -> split -> digest
    online: set[tuple]  # (backbone, resolution, view, tokens) computed inside the trials
    manifests: dict[str, str]  # split -> manifest digest (with data)
    published: object
    bags: dict[str, int] | None  # MIL datasets: bags per split
    external: dict[tuple, dict[str, str]] = dataclasses.field(default_factory=dict)  # group -> label -> digest

    @classmethod
    def of(
        cls, data: _Data, spec: SweepSpec, infos: list[BackboneInfo], store: FeatureStore, externals: dict | None = None
    ) -> _FeatureSets:
        """``spec``: its probes, strategies and resolutions (the grid the sets serve); ``externals``: the external
        test sets, each with one feature set per group read by a vector probe."""
        ds, published = data.ds, data.published
        manifests = {s: ds.manifest_digest(s) for s in SPLITS} if ds is not None else {}
        reads = {
            p.kind: (get_probe(p.kind).view(data.volumetric), get_probe(p.kind).tokens(data.features.tokens))
            for p in spec.probes
        }
        bags = {s: len(ds.units(s).sample_ids) for s in SPLITS} if ds is not None and ds.bagged else None
        out = cls([], reads, {}, {}, set(), manifests, published, bags)
        if "frozen" not in spec.strategies:
            return out
        grid_views = {reads[p.kind] for p in spec.probes if get_probe(p.kind).input == "grid"}
        scored_views = {reads[p.kind] for p in spec.probes if get_probe(p.kind).input in EXTERNAL_INPUTS}
        budget = data.features.cache_budget_gb
        for bb, res in itertools.product(infos, spec.resolutions):
            if ds is None and published is None:
                out.feature_sets.extend(
                    FeatureSetPlan(bb, res, split, None, 0, False, estimated=True) for split in SPLITS
                )
                continue
            for view, tokens in dict.fromkeys(reads.values()):
                group = (bb.name, res, view, tokens)
                recipe = out.recipes[group] = data.recipe(bb, res, view, tokens)
                sets = [_feature_set(data, recipe, bb, split, store, manifests) for split in SPLITS]
                if (view, tokens) in grid_views and (
                    data.features.online or (budget is not None and sum(f.nbytes for f in sets) > budget * 2**30)
                ):
                    out.online.add(group)
                    sets = [dataclasses.replace(f, online=True, cached=False) for f in sets]
                for f in sets:
                    if f.key is not None and not f.online:
                        out.keys.setdefault(group, {})[f.split] = f.key.digest
                out.feature_sets.extend(sets)
                if (view, tokens) in scored_views:  # external sets are scored by vector and bag probes
                    out.feature_sets.extend(out.external_sets(externals or {}, bb, res, view, tokens, store))
        return out

    def external_sets(self, externals: dict, bb, res: int, view: str, tokens: str, store) -> list[FeatureSetPlan]:
        """One feature set per external test set for a (backbone, resolution, view, tokens) group: the same
        recipe as the internal sets, resolved from the external data (its colour model, its intensity)."""
        out = []
        for label, ext in externals.items():
            recipe = ext.data.recipe(bb, res, view, tokens)
            manifests = {EXTERNAL_SPLIT: ext.dataset.manifest_digest(EXTERNAL_SPLIT)}
            f = _feature_set(ext.data, recipe, bb, EXTERNAL_SPLIT, store, manifests)
            self.external.setdefault((bb.name, res, view, tokens), {})[label] = f.key.digest
            out.append(dataclasses.replace(f, external=label))
        return out


def _frozen_cells(
    spec: SweepSpec, data: _Data, sets: _FeatureSets, bb, res, strategy, seed, replicate, common
) -> list[Cell]:
    """One cell per probe of a frozen (backbone, resolution, seed): its feature sets, trial key and memory."""
    gflops, cells = bb.gflops_per_image(res), []
    for probe in spec.probes:
        view, tokens = sets.reads.get(probe.kind, ("images", spec.features.tokens))
        group = (bb.name, res, view, tokens)
        recipe = sets.recipes.get(group) or data.recipe(bb, res, view, tokens)
        fk, is_online = sets.keys.get(group, {}), group in sets.online
        ext = sets.external.get(group, {}) if get_probe(probe.kind).input in EXTERNAL_INPUTS else {}
        config = probe.model_dump(mode="json")
        key = _trial_key(
            spec,
            {
                **_key_axes(bb, res, probe.kind, strategy, seed),
                "features": fk,
                "probe_config": config,
                **({"online": True} if is_online else {}),
                **({"external": _external_identity(spec, ext)} if ext else {}),
                "replicate": replicate,
            },
        )
        reads_sets = [
            f
            for f in sets.feature_sets
            if (f.backbone.name, f.resolution, f.view, f.tokens) == group and not f.external
        ]
        cells.append(
            Cell(
                _axes(bb, res, probe.kind, strategy, seed),
                bb,
                key,
                gflops_per_image=gflops,
                view=view,
                tokens=tokens,
                recipe=recipe,
                feature_keys=tuple(sorted(fk.items())),
                external_keys=tuple(ext.items()),
                probe_config=config,
                params=_protocol_params(spec, bb, gflops, config, "probe", replicate),
                replicate=replicate,
                online=is_online,
                feature_dtype=spec.features.dtype,
                feature_batch=spec.features.batch_size,
                memory=_trial_memory(data, probe, reads_sets, is_online, sets.bags),
                **common,
            )
        )
    return cells


def _external_identity(spec: SweepSpec, keys: dict[str, str]) -> list:
    """What of the external sets a cell's result depends on: each one's section and feature set."""
    return [[e.model_dump(mode="json"), keys[e.label]] for e in spec.external or [] if e.label in keys]


def _feature_set(data: _Data, recipe: FeatureRecipe, bb: BackboneInfo, split: str, store, manifests):
    """One split's feature set: its key and cache status (with data), its rows, bytes and shards, and the
    predicted memory of the task that extracts it."""

    f, res, view, tokens = data.features, recipe.resolution, recipe.view, recipe.tokens
    ds, published = data.ds, data.published
    width = cost.row_elements(tokens, view, bb.embed_dim, res // bb.patch_size, f.volume_pool)
    itemsize = np.dtype(f.dtype).itemsize
    if ds is not None:
        src = ds.sources(split)
        passes = src.forward_passes()
        per_row = passes if view == "slices" else [1] * len(passes)
        shards = tuple(
            cost.shard_ranges(passes, [r * width * itemsize for r in per_row], f.shard_forward_passes, f.shard_mb << 20)
        )
        key = feature_key(recipe, manifests[split])
        cached = store.has(key)
        committed = 0 if cached else len(store.shards_committed(key, len(shards)))
        n_units, n_passes, n_rows = len(passes), int(sum(passes)), int(sum(per_row))
        volume_slices = max(passes) if ds.volumetric else 0
        estimated = False
    else:
        frac = {"val": data.dataset.split.val_fraction, "test": data.dataset.split.test_fraction}
        frac["train"] = 1 - frac["val"] - frac["test"]
        per = published.inputs_per_unit(data.dataset.tile_mpp)
        units = published.units * frac[split]  # fractions of the inputs (CREMI cuts sections, not blocks)
        if published.bagged:  # manifest rows are tiles
            n_units, passes_per_unit = round(units * per), 1.0
        else:
            n_units, passes_per_unit = max(1, round(units)), per
        n_passes = round(units * per)
        n_rows = n_passes if view == "slices" else n_units
        rows_per_unit = passes_per_unit if view == "slices" else 1
        n_shards = cost.even_shards(
            n_units, passes_per_unit, rows_per_unit * width * itemsize, f.shard_forward_passes, f.shard_mb << 20
        )
        shards, key, cached, committed, estimated = (), None, False, 0, True
        volume_slices = round(per) if published.volumetric else 0
    n_shards = len(shards) if shards else (n_shards if ds is None else 1)
    largest_shard = max((b - a for a, b in shards), default=n_units // max(1, n_shards))
    shape = cost.ExtractionShape(
        n_params=bb.n_params,
        resolution=res,
        tokens_per_image=0 if data.on_gpu else bb.tokens_per_image(res),  # on a GPU: activations in device memory
        embed_dim=bb.embed_dim,
        batch_size=f.batch_size,
        row_elements=width,
        volume_voxels=data.typical_pixels(res) * volume_slices if view != "images" else 0,
        pooled_rows=largest_shard if view == "volumes" else 0,
        workers=data.extraction_workers,
    )
    return FeatureSetPlan(
        bb,
        res,
        split,
        key,
        n_units,
        cached,
        n_passes,
        view,
        tokens,
        recipe=recipe,
        n_rows=n_rows,
        row_elements=width,
        dtype=f.dtype,
        shards=shards,
        n_shards=max(1, n_shards),
        committed_shards=committed,
        estimated=estimated,
        extraction_peak=cost.extraction_peak_bytes(shape),
    )


def _trial_memory(data: _Data, probe, sets: list[FeatureSetPlan], online: bool, bags: dict | None) -> dict:
    """The trial's feature budget and its predicted peak host memory (``dinoscale.sweep.cost``)."""
    defn = get_probe(probe.kind)
    ds, published = data.ds, data.published
    resident = data.features.resident_mb << 20
    if not sets:
        return {"resident_bytes": resident}
    by_split = {f.split: f for f in sets}
    items = {}
    for split, f in by_split.items():
        if bags is not None and defn.input == "bag":
            items[split] = bags[split]
        elif ds is None and published is not None and published.bagged:
            items[split] = max(1, round(f.n_images / max(1.0, published.inputs_per_unit(data.dataset.tile_mpp))))
        else:
            items[split] = f.n_images
    labels = None
    if defn.input == "grid":
        pixels = data.typical_pixels(sets[0].resolution)
        labels = {s: f.n_slices * pixels for s, f in by_split.items()}
    bb = sets[0].backbone
    shape = cost.TrialShape(
        probe=probe.kind,
        input=defn.input,
        streams=defn.streams,
        split_bytes={s: float(f.float32_bytes) for s, f in by_split.items()},
        split_items=items,
        resident_bytes=resident,
        batch_size=getattr(probe, "batch_size", 256),
        label_voxels=labels,
        n_out=getattr(probe, "n_classes", 3),
        on_gpu=data.on_gpu,
        online_params=bb.n_params if online else 0,
        online_batch_bytes=(data.features.batch_size * bb.tokens_per_image(sets[0].resolution) * bb.embed_dim * 4 * 12)
        if online
        else 0.0,
    )
    return {"resident_bytes": resident, "predicted_peak_bytes": cost.trial_peak_bytes(shape)}


def finetune_heads(probes: list, volume_pool: str, task: str, strategy: str | None = None) -> list[dict]:
    """The heads training cells train under (``dinoscale.train.heads``): a linear head on CLS ⊕ mean patch
    (volumes: pooled over the slices as the frozen volumes view pools them) for classification; for dense
    tasks, the spec's segmentation probe entries (decoder kind, classes, width). ``probes``: the spec's probe
    entries; ``strategy``: only the heads it can train (``StrategyDef.heads``)."""
    serving = [p for p in probes if task in get_probe(p.kind).tasks]
    heads = head_settings(get_task(task).dense, serving, volume_pool)
    if strategy is not None:
        heads = [h for h in heads if h["probe"] in get_strategy(strategy).heads]
    return heads


def _sample_shape(ds: PreparedDataset | None, head: dict) -> tuple[int, int]:
    """(images per training sample, logits per sample) for the memory estimate: slices of the largest
    volume (1 for 2D images), and for segmentation classes x label-map voxels (the first train mask)."""
    if ds is None:
        return 1, 0
    units = ds.units("train")
    images = max(units.n_slices) if units.n_slices else 1
    n_classes = dense_classes(head)
    if n_classes is None or not units.masks:
        return images, 0
    from dinoscale.data.masks import load_label_maps

    grid = units.volume.grid if (units.n_slices and units.volume is not None) else None
    first = load_label_maps(units.masks[:1], units.n_slices[:1] if units.n_slices else None, grid=grid)[0]
    return images, n_classes * int(first.size)


def training_memory(
    st, gpu_memory_gib: float, ds: PreparedDataset | None, bb: BackboneInfo, resolution: int, head: dict
):
    """The GPU memory of one training trial of this cell, and how it is made to fit in
    ``resources.gpu_memory_gib`` (gradient checkpointing, then micro-batches): ``dinoscale.train.memory``,
    with the strategy's memory model (what gets gradients, what the optimiser updates). ``st``: the
    strategy's part of ``finetuning``."""
    facts, trained = strategy_facts(st, bb.name, resolution)
    images, head_values = _sample_shape(ds, head)
    head_params = 4 * facts.embed_dim * 64  # linear (2D x classes) or a light decoder: tens of thousands of weights

    def estimate(micro: int, ckpt: bool) -> float:
        return estimate_bytes(facts, micro, images, ckpt, True, trained + head_params, head_values)

    return fit_in_memory(estimate, st.batch_size, gpu_memory_gib * 2**30, st.grad_checkpointing)


def _axes(bb: BackboneInfo, res: int, probe: str, strategy: str, seed: int) -> dict:
    """A cell's grid coordinates (dinoscale.record.CELL_AXES)."""
    return {
        "backbone": bb.name,
        "n_params": bb.n_params,
        "resolution": res,
        "probe": probe,
        "strategy": strategy,
        "seed": seed,
    }


def _key_axes(bb: BackboneInfo, res: int, probe: str, strategy: str, seed: int) -> dict:
    """What of a cell's coordinates its trial key hashes: the weights themselves, not the parameter count."""
    return {
        "backbone": bb.name,
        record.WEIGHTS_PARAM: bb.weights_digest,
        "resolution": res,
        "probe": probe,
        "strategy": strategy,
        "seed": seed,
    }


def _finetune_cells(spec, data: _Data, task, bb, res, strategy, seed, manifests, common, replicate) -> list[Cell]:
    """Cells of a training strategy (lora, full, ...): the encoder is trained on images under the task's head;
    each cell searches the same number of configurations (sampled once by the plan, dinoscale.search),
    memory permitting. ``spec``: the whole spec is the identity of a result (its trial key)."""
    ds, gflops = data.ds, bb.gflops_per_image(res)
    view = "slices" if ds is not None and ds.volumetric else "images"
    st = spec.finetuning.of(strategy)
    config = st.model_dump(mode="json")
    budget = st.budget or spec.search.n_trials
    early = spec.finetuning.early_stopping.model_dump(mode="json")
    cells = []
    for head in finetune_heads(spec.probes, data.features.volume_pool, task, strategy):
        mem = training_memory(st, spec.resources.gpu_memory_gib, ds, bb, res, head)
        fitted = {
            "grad_checkpointing": mem.grad_checkpointing,
            record.MICRO_BATCH_SIZE: mem.micro_batch_size,
            "num_workers": max(0, int(spec.resources.cpus_per_trial) - 1),  # loader workers beside the trainer
        }
        configurations = tuple(
            {**c, **fitted} for c in finetune_configurations(config, budget, spec.search.seed + seed)
        )
        axes = _axes(bb, res, head["probe"], strategy, seed)
        key = _trial_key(
            spec,
            {
                **_key_axes(bb, res, head["probe"], strategy, seed),
                "manifest": manifests,
                "finetuning": config,
                "budget": budget,
                "head": head,
                "early_stopping": early,
                "replicate": replicate,
            },
        )
        params = {
            **_protocol_params(spec, bb, gflops, config, strategy, replicate),
            **_flat({k: v for k, v in head.items() if k != "probe"}, "head"),
            **_flat(early, "early_stopping"),
            "search.budget": budget,
            "train.est_gpu_gib": round(mem.gib, 3),
            "train.fits_gpu_memory": mem.fits,
            "train.grad_checkpointing": mem.grad_checkpointing,
            "train.micro_batch_size": mem.micro_batch_size,
            "train.gpu_memory_gib": spec.resources.gpu_memory_gib,
        }
        cells.append(
            Cell(
                axes,
                bb,
                key,
                gflops_per_image=gflops,
                view="",
                strategy_config=config,
                configurations=configurations,
                finetune_head=head,
                recipe=data.recipe(bb, res, view, data.features.tokens),
                params=params,
                replicate=replicate,
                **common,
            )
        )
    return cells


def check_runnable(plan: Plan) -> None:
    """Probes that fit the dataset's task and shape, token sets that fit the probes, strategies that fit the
    task: checked before anything starts, each answer from a descriptor (probe, task) or the dataset."""
    ds, spec = plan.dataset, plan.spec
    if ds.task not in task_names():
        raise NotRunnableError(f"dataset '{ds.name}' has task '{ds.task}', which no probe serves")
    unfit = unfit_message([p.kind for p in spec.probes], ds.name, ds.task, ds.volumetric, ds.bagged)
    if unfit:
        raise NotRunnableError(unfit)
    if "frozen" in spec.strategies and not ds.has_masks and any(get_probe(p.kind).input == "grid" for p in spec.probes):
        raise NotRunnableError(f"dataset '{ds.name}' lists no label maps (masks); segmentation heads train on them")
    if (
        "frozen" in spec.strategies
        and spec.features.tokens == GRID_TOKENS
        and any(get_probe(p.kind).input != "grid" for p in spec.probes)
    ):
        raise NotRunnableError(
            "features.tokens 'patch_grid' is the input of segmentation heads; classification and "
            "bag probes need a vector per image (e.g. cls_mean_patch)"
        )
    if spec.resources.node_memory_gb is not None:  # declared in the spec: checked before anything starts
        check_memory(plan, spec.resources.node_memory_gb * 2**30, "resources.node_memory_gb says each node has")
    training = [s for s in spec.strategies if s in TRAINING_STRATEGIES]
    if training:
        _check_finetunable(plan, training)


def _check_finetunable(plan: Plan, training: list[str]) -> None:
    """lora / full train the encoder under a linear head (2D images, volumes pooled over slices) or under the
    spec's segmentation head (2D images, volumes slice by slice); each trial must fit in GPU memory."""
    ds, spec = plan.dataset, plan.spec
    task = get_task(ds.task)

    def heads(strategy: str | None = None) -> list[dict]:
        return finetune_heads(spec.probes, spec.features.volume_pool, ds.task, strategy)

    shape = f"{ds.task} dataset{' of 3D volumes' if ds.volumetric else ''}"
    finetunable = ", ".join(t for t in task_names() if get_task(t).finetunable)
    why = None
    if not task.finetunable:
        why = f"'{ds.name}' is a {shape}; the tasks they can train on are {finetunable}"
    elif ds.bagged:
        why = f"'{ds.name}' scores bags of tiles (slides), which they do not train on"
    elif ds.channels:
        why = f"'{ds.name}' fuses extra input channels {list(ds.channels)}, which they do not read yet"
    elif ds.volume is not None and ds.volume.channels.mode == "each":
        why = "dataset.channels.mode 'each' averages features over channels, which they do not train through"
    elif task.dense and not heads():
        why = f"'{ds.name}' is a {shape}: they train the spec's segmentation probe as their head, and it lists none"
    elif task.dense and not ds.has_masks:
        why = f"'{ds.name}' lists no label maps (masks) to train a segmentation head on"
    if why:
        raise NotRunnableError(
            f"strategies {training} train the encoder under a task head; {why}. Use strategies: [frozen]."
        )
    headless = [s for s in training if heads() and not heads(s)]
    if headless:
        served = sorted({h["probe"] for h in heads()})
        raise NotRunnableError(
            f"strategies {headless} train under heads {[list(get_strategy(s).heads) for s in headless]}; "
            f"'{ds.name}' is a {shape} whose cells train under {served}. Drop them from strategies."
        )
    if task.dense and not ds.volumetric and any(h["head"] == "conv3d" for h in heads()):
        raise NotRunnableError(f"head 'conv3d' needs volumes; '{ds.name}' holds 2D images (use head: conv)")
    if task.dense and ds.volumetric:
        depths = {n for s in SPLITS for n in (ds.units(s).n_slices or [])}
        if len(depths) > 1:
            raise NotRunnableError(
                f"'{ds.name}' has volumes of {sorted(depths)[:5]} slices; segmentation cells stack volumes, so every "
                "volume needs the same number of slices (set dataset.spacing or dataset.grid: volumes are then resampled and padded to one grid)"
            )
    too_big = [c for c in plan.cells if c.trains_encoder and not c.params["train.fits_gpu_memory"]]
    if too_big:
        c = too_big[0]
        raise NotRunnableError(
            f"{len(too_big)} training cell(s) do not fit in resources.gpu_memory_gib = {spec.resources.gpu_memory_gib:g} "
            f"even one sample at a time with gradient checkpointing (e.g. {c.id}: ~{c.params['train.est_gpu_gib']:g} GiB); "
            "lower the resolution, pick a smaller backbone, or raise gpu_memory_gib if the GPUs have more"
        )


def memory_problems(plan: Plan, node_bytes: float) -> list[str]:
    """Cells whose trial, and feature sets whose extraction task, are predicted to need more than a node has."""
    out = []
    for c in plan.cells:
        need = c.memory.get("predicted_peak_bytes", 0.0)
        if need > node_bytes:
            out.append(f"cell {c.id}: a trial needs ~{cost.gib(need)}")
    seen = set()
    for f in plan.feature_sets:
        group = (f.backbone.name, f.resolution, f.view)
        if not f.online and f.extraction_peak > node_bytes and group not in seen:
            seen.add(group)
            out.append(
                f"extraction of {f.backbone.name}@{f.resolution} ({f.view}): a task needs ~{cost.gib(f.extraction_peak)}"
            )
    return out


def check_memory(plan: Plan, node_bytes: float, how: str) -> None:
    """Refuse, naming the cells and the figures, a sweep with a task that cannot fit the memory of a node."""
    problems = memory_problems(plan, node_bytes)
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise NotRunnableError(
            f"{len(problems)} task(s) of sweep '{plan.spec.name}' would not fit in memory: {how} "
            f"{cost.gib(node_bytes)}:\n  " + "\n  ".join(problems[:8]) + more + "\nLower features.resident_mb "
            "(trials then stream their splits), use features.online for grid probes, give the nodes more memory "
            "(resources.node_memory_gb states it), or lower features.batch_size."
        )


def plan_node_memory(resources: ResourcesSpec) -> tuple[float, str]:
    """The node memory a task is sized against: ``resources.node_memory_gb``, else this machine's."""
    if resources.node_memory_gb is not None:
        return resources.node_memory_gb * 2**30, "resources.node_memory_gb"
    return float(psutil.virtual_memory().total), "this machine"
