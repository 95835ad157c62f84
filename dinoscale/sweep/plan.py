"""The plan: the grid of cells, the feature sets they need (cached or to extract) and the cost.

A cell is (dataset, backbone, resolution, probe, strategy, seed). A feature set is one backbone
forward pass over one split at one resolution; every cell of that backbone and resolution shares
it, whatever its probe or seed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from dinoscale.data import SPLITS, DataError, PreparedDataset, prepare_dataset
from dinoscale.features import FeatureKey, FeatureStore
from dinoscale.models import backbone_facts, get_backbone, gflops_per_image, weights_identity
from dinoscale.spec import SweepSpec


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    weights: str
    weights_seed: int
    weights_kind: str
    weights_digest: str
    arch_id: str
    n_params: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_prefix_tokens: int = 5  # CLS + registers (DINOv3: 1 + 4)

    def tokens_per_image(self, resolution: int) -> int:
        return self.num_prefix_tokens + (resolution // self.patch_size) ** 2

    def gflops_per_image(self, resolution: int) -> float:
        """Measured with torch's FlopCounterMode on the meta device (dinoscale.models.gflops_per_image)."""
        return gflops_per_image(self.name, resolution)


def backbone_info(name: str, weights: str, seed: int) -> BackboneInfo:
    """Identity of the weights + facts measured from the model on the meta device (no memory, no weights)."""
    defn = get_backbone(name)
    ident = weights_identity(defn, weights, seed)
    facts = backbone_facts(name, hub=ident["kind"] == "hub")
    return BackboneInfo(name, weights, seed, ident["kind"], ident["digest"], defn.arch_id, facts.n_params,
                        facts.patch_size, tuple(facts.mean), tuple(facts.std), facts.num_prefix_tokens)


@dataclass(frozen=True)
class FeatureSetPlan:
    backbone: BackboneInfo
    resolution: int
    split: str
    key: FeatureKey | None  # None when the data is not available (plan without data)
    n_images: int  # images, or volumes for 3D classification
    cached: bool
    n_slices: int = 0  # backbone forward passes per image / volume, summed (= n_images for 2D)
    view: str = "images"  # how the rows are laid out: see VIEWS
    tokens: str = ""  # token set of the rows (the key's ``tokens`` adds the view suffix)

    @property
    def tokens_per_image(self) -> int:
        return self.backbone.tokens_per_image(self.resolution)

    @property
    def gflops(self) -> float:
        """Forward cost of the split: measured GFLOPs per image (slice) x images (slices)."""
        return self.backbone.gflops_per_image(self.resolution) * max(self.n_slices, self.n_images)


@dataclass(frozen=True)
class Cell:
    backbone: BackboneInfo
    resolution: int
    probe: str
    strategy: str
    seed: int
    feature_keys: tuple[tuple[str, str], ...]  # (split, feature-store digest)
    trial_key: str

    @property
    def id(self) -> str:
        return f"{self.backbone.name}_r{self.resolution}_{self.probe}_{self.strategy}_s{self.seed}"


@dataclass
class Plan:
    spec: SweepSpec
    dataset: PreparedDataset | None
    dataset_error: str | None
    cells: list[Cell]
    feature_sets: list[FeatureSetPlan]
    storage: Path

    @property
    def missing(self) -> list[FeatureSetPlan]:
        return [f for f in self.feature_sets if not f.cached]

    @property
    def is_runnable(self) -> bool:
        return self.dataset is not None

    def estimated_gflops(self) -> float:
        """Forward cost of the missing feature sets; without data, from the dataset's published size."""
        if self.dataset is None:
            from dinoscale.data import published_images

            n = published_images(self.spec.dataset.name) or 0
            sets = {(f.backbone, f.resolution): f for f in self.feature_sets}.values()
            return sum(f.backbone.gflops_per_image(f.resolution) * n for f in sets)
        return sum(f.gflops for f in self.missing)

    def cell(self, cell_id: str) -> Cell:
        return next(c for c in self.cells if c.id == cell_id)


def storage_root(spec: SweepSpec, project_dir: Path | None = None) -> Path:
    """The one storage setting: DINOSCALE_STORAGE if set, else the spec's ``storage.path``."""
    import os

    p = Path(os.path.expandvars(os.environ.get("DINOSCALE_STORAGE") or spec.storage.path)).expanduser()
    return (p if p.is_absolute() else (project_dir or Path.cwd()) / p).resolve()


def has_volumes(ds: PreparedDataset) -> bool:
    return "n_slices" in ds.manifest.columns


def volume_window(spec: SweepSpec) -> tuple[float, float] | None:
    from dinoscale.data.windows import window_range

    return window_range(spec.dataset.window) if spec.dataset.window is not None else None


TRAINING_STRATEGIES = ("lora", "full")
CLASSIFICATION_TASKS = ("multilabel", "multiclass")
DENSE_TASKS = ("segmentation", "instance_segmentation")
DENSE_PROBES = ("segmentation", "affinity")  # heads on patch-token grids
BAG_PROBES = ("pool", "abmil")  # slice / tile features grouped per volume / slide
# Which probes serve which task (checked before a sweep starts).
TASK_PROBES = {
    "multilabel": ("linear", "knn", "logreg", "pool"),
    "multiclass": ("linear", "knn", "logreg", "pool"),
    "mil": ("abmil", "pool"),
    "segmentation": ("segmentation",),
    "instance_segmentation": ("affinity",),
}
# The rows of a feature set:
#   images  - one per manifest row (2D images; WSI tiles, grouped per slide by the trial)
#   volumes - one per volume, slice features pooled as they stream past (3D classification)
#   slices  - one per slice of each volume, in volume order (segmentation heads; attention pooling)
VIEWS = ("images", "volumes", "slices")
GRID_TOKENS = "patch_grid"


def feature_view(volumes: bool, probe: str) -> str:
    """The view a probe reads; ``volumes``: the dataset is 3D (manifest column n_slices)."""
    if not volumes:
        return "images"
    return "slices" if probe in DENSE_PROBES or probe == "pool" else "volumes"


def view_tokens(spec: SweepSpec, probe: str) -> str:
    """Segmentation heads read the patch-token grid (DESIGN.md); every other probe the spec's token set."""
    return GRID_TOKENS if probe in DENSE_PROBES else spec.features.tokens


def uses_pet(ds: PreparedDataset) -> bool:
    return "pet_path" in ds.manifest.columns


def feature_key(spec: SweepSpec, bb: BackboneInfo, resolution: int, manifest_digest: str, view: str = "images",
                tokens: str | None = None, pet: bool = False) -> FeatureKey:
    """The store key of one feature set; ``view``: images | volumes | slices (see VIEWS)."""
    from dinoscale.data.preprocess import PET_SUV_RANGE

    f = spec.features
    tokens = tokens or f.tokens
    # the CT window, the PET fusion and the per-volume pooling change the features: all in the key
    window = volume_window(spec)
    norm = f"mean={list(bb.mean)},std={list(bb.std)}" + (f",window={list(window)}" if window else "")
    if pet:
        norm += f",pet_suv={list(PET_SUV_RANGE)},channels=ct|pet|mean"
    suffix = {"images": "", "volumes": f"@volume-{f.volume_pool}", "slices": "@slices"}[view]
    return FeatureKey(
        backbone=bb.arch_id,
        weights_digest=bb.weights_digest,
        resolution=resolution,
        interpolation=f.interpolation,
        normalisation=norm,
        tokens=tokens + suffix,
        manifest_digest=manifest_digest,
        dtype=f.dtype,
    )


# The probe label of lora / full cells: a linear head trained with the encoder. Labelled 'linear' so
# that frozen-linear, lora and full cells of one backbone x resolution x seed pair up in comparisons.
FINETUNE_HEAD = "linear"


def _trial_key(spec: SweepSpec, cell_fields: dict) -> str:
    """Deterministic identity of a cell's result: same spec content + same cell -> same key."""
    trained = cell_fields["strategy"] in TRAINING_STRATEGIES  # their head is configured under 'finetuning'
    probe = None if trained else next((p for p in spec.probes if p.kind == cell_fields["probe"]), None)
    blob = json.dumps(
        {
            "sweep": spec.name,
            "dataset": spec.dataset.model_dump(mode="json"),
            "probe_config": probe.model_dump(mode="json") if probe else None,
            "metrics": spec.metrics.model_dump(mode="json"),
            "features": spec.features.model_dump(mode="json"),
            "search": spec.search.model_dump(mode="json"),
            **cell_fields,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_plan(spec: SweepSpec, project_dir: Path | None = None, require_data: bool = False) -> Plan:
    root = storage_root(spec, project_dir)
    store = FeatureStore(root / "features")
    try:
        ds: PreparedDataset | None = prepare_dataset(spec.dataset, root)
        ds_error = None
    except DataError as e:
        if require_data:
            raise
        ds, ds_error = None, str(e)

    infos = [backbone_info(b.name, b.weights, b.weights_seed) for b in spec.backbones]
    if "frozen" in spec.strategies:
        from dinoscale.features.extract import check_token_set

        for b in spec.backbones:  # e.g. CLS features from a model without a CLS token: fail before anything runs
            check_token_set(backbone_facts(b.name), spec.features.tokens)
    feature_sets: list[FeatureSetPlan] = []
    manifests: dict[str, str] = {s: ds.manifest_digest(s) for s in SPLITS} if ds is not None else {}
    keys: dict[tuple[str, int, str], dict[str, str]] = {}  # (backbone, resolution, view) -> split -> digest
    frozen = "frozen" in spec.strategies
    for bb, res in itertools.product(infos, spec.resolutions):
        if res % bb.patch_size:
            raise ValueError(f"resolution {res} is not a multiple of {bb.name}'s patch size {bb.patch_size}")
        if not frozen:
            continue
        if ds is None:
            feature_sets.extend(FeatureSetPlan(bb, res, split, None, 0, False) for split in SPLITS)
            continue
        views = {feature_view(has_volumes(ds), p.kind): view_tokens(spec, p.kind) for p in spec.probes}
        for view, tokens in views.items():
            for split in SPLITS:
                key = feature_key(spec, bb, res, manifests[split], view=view, tokens=tokens, pet=view != "images" and uses_pet(ds))
                keys.setdefault((bb.name, res, view), {})[split] = key.digest
                rows = ds.manifest[ds.manifest["split"] == split]
                n_slices = int(rows["n_slices"].sum()) if view != "images" else len(rows)
                feature_sets.append(FeatureSetPlan(bb, res, split, key, len(rows), store.has(key), n_slices, view, tokens))

    cells = []
    for bb, res, strategy, seed in itertools.product(infos, spec.resolutions, spec.strategies, spec.seeds):
        if strategy in TRAINING_STRATEGIES:
            # the encoder is trained on images: a linear head, no cached features
            fields = {"backbone": bb.name, "weights": bb.weights_digest, "resolution": res, "probe": FINETUNE_HEAD,
                      "strategy": strategy, "seed": seed, "manifest": manifests,
                      "finetuning": getattr(spec.finetuning, strategy).model_dump(mode="json")}
            cells.append(Cell(bb, res, FINETUNE_HEAD, strategy, seed, (), _trial_key(spec, fields)))
            continue
        for probe in spec.probes:
            fk = keys.get((bb.name, res, feature_view(has_volumes(ds), probe.kind)), {}) if ds is not None else {}
            fields = {
                "backbone": bb.name, "weights": bb.weights_digest, "resolution": res, "probe": probe.kind,
                "strategy": strategy, "seed": seed, "features": fk,
            }
            cells.append(Cell(bb, res, probe.kind, strategy, seed, tuple(sorted(fk.items())), _trial_key(spec, fields)))
    return Plan(spec, ds, ds_error, cells, feature_sets, root)
