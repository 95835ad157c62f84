"""A resolved cell: everything one trial needs, decided by the plan, nothing to work out again.

The plan (``dinoscale.sweep.plan``) builds cells; trials (``dinoscale.sweep.trial``) only read them.
A cell's position in the grid is its ``axes`` (the names of ``dinoscale.record.AXES``), logged as
params (and as metrics where numeric); the rest is how to run it: the feature view and token set it
reads, its feature recipe (how a unit becomes features), the dumped probe or strategy config, the feature keys per split, the search
budget and the protocol constants it logs. A lora / full cell also carries the configurations its
search trains (each one Ray Tune trial, a "unit" of the trial stage) and the head they train under.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dinoscale.features.recipe import FeatureRecipe


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
    embed_dim: int = 0  # channels of the last block (the width of a token)

    def tokens_per_image(self, resolution: int) -> int:
        return self.num_prefix_tokens + (resolution // self.patch_size) ** 2

    def gflops_per_image(self, resolution: int) -> float:
        """Measured with torch's FlopCounterMode on the meta device (dinoscale.models.gflops_per_image)."""
        from dinoscale.models import gflops_per_image

        return gflops_per_image(self.name, resolution)


@dataclass(frozen=True)
class Cell:
    axes: dict[str, Any]  # backbone, n_params, resolution, probe, strategy, seed (dinoscale.record.AXES)
    backbone: BackboneInfo
    trial_key: str  # deterministic identity of the cell's result (same spec content + cell -> same key)
    task: str  # the dataset's task (dinoscale.tasks)
    gflops_per_image: float  # measured forward cost at the cell's resolution
    view: str = "images"  # the feature-set view it reads (dinoscale.probes.registry.VIEWS); '' for lora / full
    tokens: str = ""
    feature_keys: tuple[tuple[str, str], ...] = ()  # (split, feature-store digest)
    external_keys: tuple[tuple[str, str], ...] = ()  # (external test set label, feature-store digest)
    probe_config: dict | None = None  # the probe's dumped spec (frozen cells)
    strategy_config: dict | None = None  # the strategy's dumped spec (lora / full cells)
    # lora / full: the configurations the cell's search trains (dinoscale.train.FinetuneConfig keyword
    # arguments, seed aside; configuration 0 = the spec's stated values) and the head they train under:
    # {'probe': 'linear', 'volume_pool': ...} or the segmentation probe's {'probe': 'segmentation', 'head', ...}
    configurations: tuple[dict, ...] = ()
    finetune_head: dict | None = None
    # how a unit becomes the encoder's input and its features (dinoscale.features.recipe): the feature sets'
    # recipe (frozen cells; online grids are computed by it), the input transform of lora / full cells
    recipe: FeatureRecipe | None = None
    search: dict = field(default_factory=dict)  # n_trials, seed
    bootstrap: dict = field(default_factory=dict)  # resamples, level, seed, macro_min_patients, min_interval_units
    params: dict = field(default_factory=dict)  # protocol constants logged with the run
    online: bool = False  # grid probes: the frozen backbone runs inside the head's training loop (no cache)
    feature_dtype: str = "float16"  # the store's dtype (online features are rounded to it too)
    feature_batch: int = 32  # backbone batch of online features
    memory: dict = field(default_factory=dict)  # resident_bytes (the trial's budget), predicted_peak_bytes
    replicate: dict = field(default_factory=dict)  # how the seed's replicate draws train / val (data.splits)

    @property
    def resolution(self) -> int:
        return self.axes["resolution"]

    @property
    def probe(self) -> str:
        return self.axes["probe"]

    @property
    def strategy(self) -> str:
        return self.axes["strategy"]

    @property
    def seed(self) -> int:
        return self.axes["seed"]

    @property
    def trains_encoder(self) -> bool:
        return self.strategy_config is not None

    @property
    def unit_ids(self) -> list[str]:
        """The Ray Tune trials of this cell: itself (frozen), or one per configuration of its search."""
        if not self.trains_encoder:
            return [self.id]
        return [unit_id(self.id, k) for k in range(len(self.configurations))]

    @property
    def id(self) -> str:
        """Unique within a sweep: the core axes in a fixed short form, then any other axis as ``_<name><value>``."""
        core = f"{self.backbone.name}_r{self.resolution}_{self.probe}_{self.strategy}_s{self.seed}"
        return core + "".join(f"_{k}{v}" for k, v in self.axes.items() if k not in _CORE_AXES)


_CORE_AXES = ("backbone", "n_params", "resolution", "probe", "strategy", "seed")

UNIT_SEP = "@c"  # '<cell id>@c<k>': configuration k of a lora / full cell


def unit_id(cell_id: str, configuration: int) -> str:
    return f"{cell_id}{UNIT_SEP}{configuration}"


def parse_unit(unit: str) -> tuple[str, int | None]:
    """(cell id, configuration index), or (cell id, None) for a frozen cell's trial."""
    cell_id, sep, k = unit.rpartition(UNIT_SEP)
    return (cell_id, int(k)) if sep and k.isdigit() else (unit, None)
