"""The sweep spec: one YAML file, validated by pydantic before anything starts.

Every model forbids unknown keys, so a misspelt key is an error that names its full path
(``probes.1.temprature``) and the keys that are allowed there, never a silent default.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dinoscale import record
from dinoscale.datasettings import PhantomSpec  # a spec section, kept in a leaf that data/ reads too
from dinoscale.models.families import family_names, get_family
from dinoscale.probes.registry import ProbeSpec, ProbeSpecBase, probe_spec_class, unfit_message
from dinoscale.specfile import SpecError, load_raw
from dinoscale.strategies.registry import (
    StrategyKind,
    StrategySettings,
    StrategySpecBase,
    settings_with_kinds,
    strategy_spec_class,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitSpec(Strict):
    """Patient-level split: no patient is ever in two splits."""

    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="fraction of patients held out for validation")
    test_fraction: float = Field(
        0.25, gt=0, lt=0.6, description="fraction of patients for test (when no official list)"
    )
    seed: int = Field(0, description="seed of the patient shuffle")
    official: bool = Field(True, description="use the dataset's official split lists where it has them")
    replicates: Literal["resplit", "fixed"] = Field(
        "resplit",
        description="how the replicates (seeds) vary the data: resplit: replicate k > 0 pools the train and val "
        "patients and redraws val (same size) with seed (split.seed, k); fixed: every replicate keeps the "
        "dataset's split (only initialisation and batch order change). Test is never touched; replicate 0 is "
        "the dataset's split; a dataset with cross-validation folds validates replicate k on fold k; a dataset "
        "whose protocol fixes the split (CREMI) keeps it",
    )
    folds: int | None = Field(
        None,
        ge=0,
        le=20,
        description="cross-validation by patient: train + val patients cut into this many folds, replicate k "
        "validating on fold k mod folds (test held out by test_fraction); none: the dataset's protocol (MSD: 5, "
        "as the reference benchmark), 0: no folds",
    )


class ChannelSpec(Strict):
    """How a multi-channel volume feeds the encoder's 3 input channels (dinoscale.data.volumes)."""

    mode: Literal["pick", "each"] = Field(
        "pick",
        description="pick: three channels to R, G, B; each: every listed channel through the encoder as grey, "
        "features averaged (one forward pass per channel)",
    )
    pick: list[str | int] | None = Field(
        None,
        description="channels by name (the dataset's, e.g. MSD's FLAIR, T1w, t1gd, T2w; PET/CT: ct, pet) or index; "
        "'mean' (pick only): the mean of the other picked channels. Default: MSD BrainTumour FLAIR, t1gd, T2w; "
        "PET/CT ct, pet, mean; one channel repeated; otherwise the first three",
    )


class DatasetSpec(Strict):
    name: str = Field(description="dataset adapter name (see `dinoscale datasets`)")
    root: str | None = Field(None, description="data root for real datasets; ${ENV_VARS} are expanded at run time")
    phantom: PhantomSpec | None = Field(None, description="phantom generator settings (phantom datasets only)")
    split: SplitSpec = SplitSpec()
    subset: str | None = Field(
        None,
        description="part of a multi-part dataset: a MedMNIST+ file ('organmnist3d_64'), a Decathlon task "
        "folder ('Task09_Spleen'), CREMI samples ('A,B,C')",
    )
    classes: list[str] | None = Field(
        None, description="generic 'manifest' adapter: the class list (a label outside it is an error)"
    )
    window: str | tuple[float, float] | None = Field(
        None,
        description="CT window mapped to [0, 1]: a preset (lung, mediastinum, bone, brain, abdomen) or "
        "[HU min, HU max]; none: see dataset.intensity",
    )
    color: Literal["auto", "grey", "rgb"] = Field(
        "auto",
        description="2D images: the colour model the encoder sees. rgb: colour kept as R, G, B (alpha dropped, grey "
        "files replicated); grey: one channel replicated to R, G, B (colour files averaged); auto: the dataset's "
        "declaration (whole-slide tiles and the MedMNIST+ colour sets: rgb; a generic manifest: grey)",
    )
    intensity: Literal["auto", "minmax", "range", "percentiles", "window"] = Field(
        "auto",
        description="how intensities become [0, 1] before the encoder's mean / std: range (2D: the file's declared "
        "range, 8-bit / 255, 16-bit / 65535, a DICOM's VOI window or stored bits), percentiles (of the nonzero "
        "values, see dataset.percentiles), minmax (each image's / volume's own), window (dataset.window, HU). "
        "auto: a CT window where one is set, else range for 2D images, percentiles for MRI volumes, minmax for "
        "other volumes (`dinoscale protocol` states the one used and why)",
    )
    percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="intensity 'percentiles': the lower and upper percentile of the nonzero values"
    )
    tile_mpp: float | None = Field(
        None,
        gt=0,
        description="whole-slide tiles: microns per pixel they were cut at (0.5 = 20x, 0.25 = 40x); the plan "
        "counts tiles per slide at this magnification when the data is absent (default: the published one)",
    )
    channels: ChannelSpec | None = Field(
        None, description="multi-channel volumes: which channels the encoder sees (default: see ChannelSpec.pick)"
    )
    spacing: Literal["auto"] | tuple[float, float, float] | None = Field(
        None,
        description="volumes: resample to this voxel spacing [x, y, z] in mm (RAS order), or 'auto' (the dataset's "
        "median per axis); predictions are mapped back to each volume's native grid before scoring. None: "
        "native spacing",
    )
    grid: tuple[int, int, int] | None = Field(
        None,
        description="volumes: centre-crop / zero-pad the (resampled) volumes to [x, y, z] voxels; none: the largest "
        "extent per axis (nothing cropped) whenever the spacing is set or a split's volumes differ in shape",
    )
    patient_ids: Literal["auto", "required"] = Field(
        "auto",
        description="slide cohorts (wsi-tiles): 'required' refuses a slide table without a patient_id for every "
        "slide (set it when patients have several slides); 'auto' requires them where the dataset is known to "
        "hold several slides per patient (Camelyon17) and otherwise takes each slide as its own patient, recorded "
        "on the run (data.patient_ids)",
    )
    on_bad_file: Literal["error", "skip"] = Field(
        "error",
        description="an unreadable file: 'error' stops naming the file; 'skip' checks every file up front "
        "and drops unreadable ones, recorded as skipped (logged with the run)",
    )

    @field_validator("window")
    @classmethod
    def _window(cls, v):
        # lazy: the data package (its registry) adds ~0.9 s to importing spec (0.4 s alone), measured
        from dinoscale.data.windows import CT_WINDOWS

        if isinstance(v, str) and v not in CT_WINDOWS:
            raise ValueError(_unknown_name("window preset", v, sorted(CT_WINDOWS)))
        if isinstance(v, tuple) and not v[0] < v[1]:
            raise ValueError(f"window must be [HU min, HU max] with min < max, got {list(v)}")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v):
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"percentiles must be [lower, upper] with 0 <= lower < upper <= 100, got {list(v)}")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v):
        if isinstance(v, tuple) and min(v) <= 0:
            raise ValueError(f"spacing is [x, y, z] in mm, each > 0 (or 'auto'), got {list(v)}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError(f"grid is [x, y, z] voxels, each >= 1, got {list(v)}")
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        # lazy: the data package (its registry) adds ~0.9 s to importing spec (0.4 s alone), measured
        from dinoscale.data import dataset_names

        if v not in dataset_names():
            raise ValueError(_unknown_name("dataset", v, dataset_names()))
        return v

    @model_validator(mode="after")
    def _phantom_only_for_phantoms(self) -> DatasetSpec:
        # lazy: the data package (its registry) adds ~0.9 s to importing spec (0.4 s alone), measured
        from dinoscale.data import is_phantom

        if is_phantom(self.name):
            if self.root is not None:
                raise ValueError(f"dataset '{self.name}' is generated; it takes no 'root'")
        else:
            if self.phantom is not None:
                raise ValueError(f"'phantom' settings only apply to phantom datasets, not '{self.name}'")
            if not self.root:
                raise ValueError(f"dataset '{self.name}' is real data and needs a 'root' (its folder)")
        if self.intensity == "window" and self.window is None:
            raise ValueError("intensity 'window' needs dataset.window (a preset or [HU min, HU max])")
        if self.window is not None and self.intensity not in ("auto", "window"):
            raise ValueError(f"dataset.window is set but dataset.intensity is '{self.intensity}': drop one of them")
        return self


class BackboneSpec(Strict):
    name: str = Field(description="backbone registry name, e.g. dinov3-vitb16 (see `dinoscale backbones`)")
    weights: str = Field(
        "random",
        description="'random' (seeded init, labelled as such), 'hub' (the registry's pretrained tag through timm), "
        "or a path to a .safetensors / .pth state dict",
    )
    weights_seed: int = Field(0, description="seed of the random init when weights='random'")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from dinoscale.models import backbone_names, is_backbone

        if not is_backbone(v):
            raise ValueError(_unknown_name("backbone", v, backbone_names()) + " (or any timm model as 'timm:<name>')")
        return v

    @property
    def label(self) -> str:
        return self.name


class EncoderSpec(Strict):
    """A family and its sizes, written compactly (``encoders: [{family: dinov3, sizes: [s, b, l]}]``); expanded
    into one backbone entry per size when the spec is read (``SweepSpec.backbones``, the resolved spec)."""

    family: str = Field(description="encoder family (`dinoscale backbones`), e.g. dinov3, rad-dino, uni")
    sizes: list[str] | None = Field(
        None, min_length=1, description="the family's sizes by key (e.g. [s, b, l]); none: every size it has"
    )
    weights: str = Field("random", description="as a backbone's weights: random | hub | a file | local-dir:<folder>")
    weights_seed: int = 0

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        try:
            return get_family(v).name
        except KeyError:
            raise ValueError(_unknown_name("encoder family", v, family_names())) from None

    @model_validator(mode="after")
    def _known_sizes(self) -> EncoderSpec:
        family = get_family(self.family)
        for k in self.sizes or []:
            if k not in family.size_keys:
                raise ValueError(_unknown_name(f"size of family {family.name}", k, family.size_keys))
        return self

    def backbones(self) -> list[dict]:
        family = get_family(self.family)
        keys = self.sizes or family.size_keys
        entry = {"weights": self.weights, "weights_seed": self.weights_seed}
        return [{"name": family.size(k).backbone, **entry} for k in keys]


def expand_encoders(data: Any) -> Any:
    """``encoders:`` (families and sizes) appended to ``backbones:`` as plain entries; the resolved spec, its
    digest and everything downstream see backbones only."""
    if not isinstance(data, dict) or "encoders" not in data:
        return data
    data = dict(data)
    raw = data.pop("encoders") or []
    if not isinstance(raw, list):
        raise ValueError("encoders: a list of {family: ..., sizes: [...]} entries")
    expanded = []
    for i, item in enumerate(raw):
        try:
            expanded += EncoderSpec.model_validate(item).backbones()
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in (f"encoders.{i}", *err["loc"]))
            raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    data["backbones"] = list(data.get("backbones") or []) + expanded
    return data


class EarlyStoppingSpec(Strict):
    """Asynchronous successive halving (ASHA) among the configurations of one cell, run by Ray Tune: at
    rungs of ``grace_epochs * reduction_factor**k`` epochs, a configuration whose val metric is below the
    top 1/``reduction_factor`` of those that reached the rung before it is stopped, and its GPU freed."""

    enabled: bool = Field(True, description="off: every configuration trains to its last epoch (FIFO)")
    grace_epochs: int = Field(1, ge=1, description="epochs a configuration always gets before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="the top 1/reduction_factor continue at each rung")


class FinetuningSpec(Strict):
    """Settings of the strategies that train the encoder (one cell per backbone x resolution x head x seed,
    each searching ``budget`` configurations): one entry per registered training strategy
    (``finetuning.<kind>``, validated by the spec class its module registers, ``dinoscale.strategies``),
    defaults filled in, and the early stopping they share."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, StrategySettings] = Field(init=False)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)

    @model_validator(mode="before")
    @classmethod
    def _strategy_entries(cls, data: Any) -> Any:
        return settings_with_kinds(data if data is not None else {}, set(cls.model_fields))

    def of(self, kind: str) -> StrategySpecBase:
        """The settings of training strategy ``kind``."""
        return (self.__pydantic_extra__ or {})[kind]


class SearchSpec(Strict):
    """Hyper-parameters are selected on val by the task's headline metric; test is reported, never selected on."""

    n_trials: int = Field(
        1,
        ge=1,
        description="Optuna trials per frozen cell (seeded TPE over the probe's search space, "
        "declared by the probe's module); 1: the probe's own built-in grid only. The same budget for "
        "every cell, so curves compare like with like; lora / full cells search as many configurations "
        "unless their 'budget' says otherwise",
    )
    seed: int = Field(
        0,
        description="seed of the per-cell samplers (Optuna for frozen cells, the Latin "
        "hypercube of lora / full configurations); the cell's seed axis is added to it",
    )


class FeaturesSpec(Strict):
    tokens: Literal["cls_mean_patch", "cls", "mean_patch", "last4_cls", "last4_cls_mean_patch", "patch_grid"] = Field(
        "cls_mean_patch",
        description="features; registers are always excluded. last4_*: CLS of the last 4 blocks "
        "(DINOv2 linear eval, + mean patch); patch_grid: [N, D, H/p, W/p] for segmentation probes",
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="storage dtype in the feature store")
    volume_pool: Literal["mean", "max", "mean_max"] = Field(
        "mean",
        description="3D classification (volumes): slice features pooled per volume (the reference benchmark: mean)",
    )
    interpolation: Literal["bilinear", "bicubic", "area"] = "bicubic"
    batch_size: int = Field(32, ge=1)
    shard_forward_passes: int = Field(
        50_000,
        ge=1,
        description="a feature set of more backbone inputs (images, slices, tiles) than this is cut into "
        "contiguous shards of its manifest, each extracted by its own Ray task (its own GPU) and committed on "
        "its own: a lost worker loses one shard, a rerun extracts only the missing ones",
    )
    shard_mb: int = Field(2048, ge=1, description="at most this many MiB per shard file on disk")
    resident_mb: int = Field(
        1024,
        ge=1,
        description="feature MiB (as float32) a trial may hold in memory per split; larger splits are read "
        "batch by batch from the memory-mapped store, so a trial's memory is its batch and its model",
    )
    online: bool = Field(
        False,
        description="patch-grid probes (segmentation, affinity): run the frozen backbone inside the head's "
        "training loop instead of caching the grids (no feature store; compute once per epoch)",
    )
    cache_budget_gb: float | None = Field(
        None,
        gt=0,
        description="patch-grid feature sets predicted larger than this on disk (all splits of one backbone x "
        "resolution) are computed online instead of cached; none: always cached unless 'online'",
    )


class BootstrapSpec(Strict):
    resamples: int = Field(1000, ge=50)
    level: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 0


class MetricsSpec(Strict):
    """The headline metric is the dataset task's (dinoscale.tasks); this sets how its interval is computed.
    The conventions behind every metric are in dinoscale.metrics.CONVENTIONS (and each sweep's protocol table)."""

    bootstrap: BootstrapSpec = BootstrapSpec()
    macro_min_patients: int = Field(
        5,
        ge=1,
        description="a macro metric averages the classes with at least this many positive and as many negative "
        "patients in test, fixed before resampling (fewer qualify for none: 1, logged as macro_min_patients)",
    )
    min_interval_units: int = Field(
        10, ge=2, description="no bootstrap interval over fewer test patients (the count is reported instead)"
    )


class ResourcesSpec(Strict):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(
        0.25,
        ge=0,
        le=1,
        description="frozen-encoder trials (probes on cached features) share "
        "a GPU; used only where the cluster has GPUs",
    )
    gpus_per_training_trial: float = Field(
        1,
        ge=0,
        le=1,
        description="lora / full fine-tuning trials train the encoder; used only where the cluster has GPUs",
    )
    cpus_per_extraction: float = Field(1, gt=0)
    gpus_per_extraction: float = Field(1, ge=0, le=1, description="used only where the cluster has GPUs")
    max_concurrent_trials: int | None = Field(None, ge=1)
    trial_retries: int = Field(
        2, ge=0, description="retries of a failed trial (a lost node, a crash) before it is recorded FAILED"
    )
    node_memory_gb: float | None = Field(
        None,
        gt=0,
        description="memory of each node for the plan's check that every extraction task and trial fits; "
        "none: this machine's memory for `dinoscale plan`, the memory the Ray nodes declare in a sweep",
    )
    gpu_memory_gib: float = Field(
        80.0,
        gt=0,
        description="memory of one GPU assumed by the plan for lora / full trials (a planning figure): a trial "
        "estimated above it gets gradient checkpointing, then smaller micro-batches, instead of failing",
    )
    cell_order: Literal["cheapest", "grid"] = Field(
        "cheapest",
        description="the order cells are run in. cheapest: one replicate of every cell before the next, frozen "
        "before lora before full, then by forward GFLOPs per image (small encoders and resolutions first), so a "
        "sweep stopped halfway already has whole curves; grid: the spec's order (backbone, resolution, strategy, "
        "seed, probe). `dinoscale plan` shows it",
    )


class TrackingSpec(Strict):
    uri: str = Field("sqlite:///mlruns.db", description="MLflow tracking URI (relative sqlite paths: project folder)")
    experiment: str | None = Field(
        None,
        description="MLflow experiment; default: dinoscale-<spec name>, one per spec, so two datasets of a modality "
        "never mix unless given the same experiment",
    )
    artifact_location: str | None = Field(None, description="default for sqlite: mlartifacts/ beside the database")
    pseudonymize: Literal["auto", "on", "off"] = Field(
        "auto",
        description="per-sample predictions carry sample_id/patient_id as keyed hashes (HMAC-SHA256, key beside "
        "the data root) instead of the manifest's: auto = on unless the dataset is a phantom or a registered "
        "public dataset (dinoscale.pseudonym)",
    )


class StorageSpec(Strict):
    path: str = Field(
        ".dinoscale",
        description="root for the feature store, Tune state, sweep state and generated "
        "data; on a cluster a path every node sees. The environment variable DINOSCALE_STORAGE "
        "overrides it (one setting for the whole cluster)",
    )


class RaySpec(Strict):
    address: str | None = Field(None, description="existing cluster ('auto', 'ray://host:10001'); none: embedded Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray (default: all)")


class TrainSizeSpec(Strict):
    """The training-set-size axis (label efficiency): exactly one of fractions, patients or shots. Each replicate
    draws its subsets from its own train patients, by patient, stratified by label and nested (a smaller size's
    patients are inside a larger's); val and test are untouched, and the features are those of the whole split
    (each size costs probe fits only)."""

    fractions: list[float] | None = Field(
        None, description="fractions of the train patients, in (0, 1], e.g. [0.01, 0.1, 1.0] (1: all of them)"
    )
    patients: list[int] | None = Field(None, description="numbers of train patients, e.g. [20, 100, 500]")
    shots: list[int] | None = Field(
        None, description="k train patients per class, e.g. [1, 5, 10] (multi-label: k positive patients per class)"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> TrainSizeSpec:
        given = [k for k in ("fractions", "patients", "shots") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of fractions, patients or shots (got {given or 'none'})")
        values = getattr(self, given[0])
        if not values:
            raise ValueError(f"{given[0]}: at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"{given[0]}: duplicate values in {values}")
        if given[0] == "fractions" and not all(0 < v <= 1 for v in values):
            raise ValueError(f"fractions must be in (0, 1], got {values}")
        if given[0] != "fractions" and not all(v >= 1 for v in values):
            raise ValueError(f"{given[0]} must be at least 1, got {values}")
        return self

    @property
    def unit(self) -> str:
        return next(k for k in ("fractions", "patients", "shots") if getattr(self, k) is not None)

    @property
    def values(self) -> list[float]:
        """The sizes, smallest first."""
        return sorted(getattr(self, self.unit))


class ExternalSpec(Strict):
    """An external test set ("does it hold at another hospital"): another dataset whose rows every frozen cell's
    probe (fitted on the cell's train, selected on val) also scores, on the internal classes it maps onto. Its
    features are extracted with the same recipe as the internal sets (its own colour model and intensity, from
    its adapter), under its own store keys."""

    label: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="its name in the record and the report (external.<label>.*)"
    )
    dataset: DatasetSpec = Field(description="the external dataset: the same schema as 'dataset' (adapter, root, ...)")
    split: Literal["all", "test"] = Field(
        "all", description="which of its rows to score: all (none of them is ever trained on) or its test split"
    )
    classes: dict[str, str] | None = Field(
        None,
        description="{external class: internal class}; none: each external class maps onto the internal class of "
        "the same name. Every external class must be mapped or listed in 'drop'",
    )
    drop: list[str] = Field(default_factory=list, description="external classes left out (not scored)")
    centers: list[str | int] | None = Field(
        None,
        description="only the rows of these centres (hospitals), by the dataset's centre column (a slide table's "
        "'center', e.g. Camelyon17's five centres): the unseen centres of an external validation; none: every row",
    )


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    modality: Literal["xray", "ct", "mri", "wsi", "em", "petct", "endoscopy", "ultrasound"]
    profile: Literal["demo", "paper", "rehearsal"] = Field(
        description="demo: phantom data, random weights, CPU; paper: real data and weights, GPUs; rehearsal: a paper "
        "spec run by `dinoscale rehearse` on a replica of its dataset with random weights (never a result)"
    )
    description: str = ""
    dataset: DatasetSpec
    backbones: list[BackboneSpec] = Field(
        min_length=1,
        description="the encoders, one entry per model; or compactly by family under 'encoders:' "
        "([{family: dinov3, sizes: [s, b]}, {family: rad-dino}]), expanded into these entries",
    )
    resolutions: list[int] = Field(min_length=1)
    probes: list[ProbeSpec] = Field(min_length=1)
    strategies: list[StrategyKind] = Field(
        default_factory=lambda: ["frozen"],
        min_length=1,
        description="frozen: probes on cached features; lora / full (and any registered strategy, "
        "dinoscale.strategies): the encoder is trained (settings under 'finetuning')",
    )
    finetuning: FinetuningSpec = Field(default_factory=FinetuningSpec, description="lora / full settings")
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="replicates: seed k seeds each probe's initialisation and batch order and, per "
        "dataset.split.replicates, draws replicate k's train / val split (0: the dataset's own); the analysis "
        "pools replicates with the patient bootstrap",
    )
    train_size: TrainSizeSpec | None = Field(
        None,
        description="the training-set-size axis (label efficiency): fractions, counts or k per class of the train "
        "patients, drawn per replicate by patient, stratified and nested; none: every train patient",
    )
    external: list[ExternalSpec] | None = Field(
        None,
        description="external test sets (classification only): each frozen cell's probe also scores them, reported "
        "as external.<label>.* beside the internal metric on the same classes and the drop; none: internal only",
    )
    search: SearchSpec = SearchSpec()
    features: FeaturesSpec = FeaturesSpec()
    metrics: MetricsSpec = MetricsSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    ray: RaySpec = RaySpec()

    @model_validator(mode="before")
    @classmethod
    def _encoders(cls, data: Any) -> Any:
        return expand_encoders(data)

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, v: list[int]) -> list[int]:
        bad = [r for r in v if r < 16]
        if bad:
            raise ValueError(f"resolutions must be at least 16 px, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate resolutions in {v}")
        return v

    @model_validator(mode="after")
    def _resolutions_fit_patches(self) -> SweepSpec:
        """Each backbone's patch size, measured from the model itself (on the meta device: no weights, no memory)."""
        from dinoscale.models import backbone_facts

        for b in self.backbones:
            patch = backbone_facts(b.name).patch_size
            bad = [r for r in self.resolutions if patch and r % patch]
            if bad:
                raise ValueError(f"resolutions must be multiples of {b.name}'s patch size {patch}, got {bad}")
        return self

    @field_validator("probes")
    @classmethod
    def _probes_fit_the_dataset(cls, v: list, info) -> list:
        """Probes that do not serve the dataset's task, refused by ``validate`` as by the pre-flight: the dataset
        registry states the task and, where it records the published size, the units (volumes, slides)."""
        # lazy: the data package (its registry) adds ~0.9 s to importing spec (0.4 s alone), measured
        from dinoscale.data import get_dataset

        ds = info.data.get("dataset")
        if ds is None:  # the dataset failed its own validation (reported there)
            return v
        d = get_dataset(ds.name)
        if d.task == "auto":  # only the data tells (manifest, MedMNIST+): checked by the pre-flight
            return v
        size = d.published_size(ds.subset)
        unfit = unfit_message(
            [p.kind for p in v], ds.name, d.task, size.volumetric if size else None, size.bagged if size else None
        )
        if unfit:
            raise ValueError(unfit)
        return v

    @model_validator(mode="after")
    def _unique_axes(self) -> SweepSpec:
        names = [b.name + "@" + b.weights for b in self.backbones]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate backbones: {names}")
        kinds = [p.kind for p in self.probes]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each probe kind may appear once, got {kinds}")
        return self

    @model_validator(mode="after")
    def _external_sets(self) -> SweepSpec:
        """External sets: unique labels, a classification task (where the registry states the tasks)."""
        # lazy: the data package (its registry) adds ~0.9 s to importing spec (0.4 s alone), measured
        from dinoscale.data import get_dataset
        from dinoscale.tasks import get_task

        labels = [e.label for e in self.external or []]
        if len(set(labels)) != len(labels):
            raise ValueError(f"external: duplicate labels in {labels}")
        for e in self.external or []:
            for name in (self.dataset.name, e.dataset.name):
                task = get_dataset(name).task
                if task != "auto" and get_task(task).dense:
                    raise ValueError(
                        f"external '{e.label}': dataset '{name}' is a {task} task; external test sets score "
                        "classification cells only (drop 'external' or use a classification dataset)"
                    )
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"dinoscale-{self.name}"

    def digest(self) -> str:
        """Hash of the resolved spec (every default filled in; an optional section the spec leaves out, such as
        train_size or external, is left out too, so the digests of specs from before the axis existed stand)."""
        # the spec's key is the axis' name in the record
        optional = {"external": self.external, record.TRAIN_SIZE_AXIS: self.train_size}
        dumped = self.model_dump(mode="json", exclude={k for k, v in optional.items() if v is None} or None)
        blob = json.dumps(dumped, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading and error messages


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """The spec of a file: its ``extends`` chain merged, ``overrides`` (``key.path=value``, as ``--set``)
    applied, validated (``dinoscale.specfile``)."""
    raw = load_raw(path, overrides)
    return parse_spec(raw, source=spec_source(path, overrides))


def spec_source(path: str | Path, overrides: Sequence[str] = ()) -> str:
    """How messages name a spec: its file, and the overrides that changed it."""
    return str(path) + "".join(f" --set {o}" for o in overrides)


def parse_spec(raw: dict, source: str = "<spec>") -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        lines = [_describe_error(err, raw) for err in e.errors()]
        raise SpecError(
            f"{source}: {len(lines)} problem(s) in the spec:\n" + "\n".join(f"  - {x}" for x in lines)
        ) from None


def _describe_error(err: dict, raw: dict) -> str:
    loc = list(err["loc"])
    path = ".".join(str(p) for p in loc) or "<top>"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        bad = str(loc[-1])
        hint = difflib.get_close_matches(bad, allowed, n=1)
        msg = f"{path}: unknown key '{bad}'"
        if hint:
            msg += f" (did you mean '{hint[0]}'?)"
        return msg + f"; allowed here: {', '.join(sorted(allowed))}"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg} (got {err.get('input')!r})" if err["type"] != "value_error" else f"{path}: {msg}"


def _allowed_keys(loc: list, raw: dict) -> list[str]:
    """Field names of the model found by walking ``loc`` from SweepSpec (lists and unions included)."""

    annotation: Any = SweepSpec
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else {}
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            list_args = [typing.get_args(a) for a in args] if typing.get_origin(annotation) is not list else [args]
            annotation = next((a[0] for a in list_args if a), None)
            continue
        model = _model_of(annotation, node)
        field = model.model_fields.get(part) if model is not None else None
        if field is None and model is FinetuningSpec and strategy_spec_class(part) is not None:
            annotation = strategy_spec_class(part)  # finetuning.<kind>: its strategy's spec class
        elif field is None:
            return []
        else:
            annotation = field.annotation
        node = node.get(part, {}) if isinstance(node, dict) else {}
    model = _model_of(annotation, node)
    return list(model.model_fields) if model is not None else []


def _model_of(annotation: Any, node: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation is ProbeSpecBase:  # a probe entry: the class registered for its kind
            return probe_spec_class(node) or ProbeSpecBase
        return annotation
    args = typing.get_args(annotation)
    candidates = []
    for a in args:
        m = _model_of(a, node)
        if m is not None:
            candidates.append(m)
    if len(candidates) > 1 and isinstance(node, dict):
        for m in candidates:
            kind = m.model_fields.get("kind")
            if kind is not None and node.get("kind") in typing.get_args(kind.annotation):
                return m
    return candidates[0] if candidates else None


def _unknown_name(what: str, value: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(value, known, n=1)
    msg = f"unknown {what} '{value}'"
    if hint:
        msg += f" (did you mean '{hint[0]}'?)"
    return msg + f"; known: {', '.join(known)}"


# The strategies' spec classes live in their modules (dinoscale.strategies.<kind>), which import torch (a
# second or more): importing the spec must stay quick (the CLI's first screen), so they are re-exported lazily.
_STRATEGY_SPECS = {
    "LoraStrategySpec": "dinoscale.strategies.lora",
    "LoraSearchSpace": "dinoscale.strategies.lora",
    "FullStrategySpec": "dinoscale.strategies.full",
    "FullSearchSpace": "dinoscale.strategies.full",
}


def __getattr__(name: str) -> Any:
    if name in _STRATEGY_SPECS:
        return getattr(importlib.import_module(_STRATEGY_SPECS[name]), name)
    raise AttributeError(f"module 'dinoscale.spec' has no attribute '{name}'")
