"""The probe registry: each probe module declares everything about its probe in one ``ProbeDef``.

timm's habit: the facts about a thing live beside its code. A probe module defines its pydantic spec
class (a ``ProbeSpecBase`` with a ``kind`` literal), its fit function, its Optuna search space, and
registers one descriptor saying which tasks it serves and what input it reads. The spec's probe list,
the plan (feature view, tokens), the runnability checks, the trial's input assembly and the search all
ask the descriptor; nothing else lists probes.

Modules in ``dinoscale/probes/`` are found by name (``load_probes``), so adding a probe is one file
(and its test). Probes outside the package: list their importable modules in the environment
variable ``DINOSCALE_PLUGINS`` (comma-separated; Ray workers inherit it).

A leaf module: it imports nothing from dinoscale, so the spec can import it without a circle.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, PlainValidator, SerializeAsAny
from pydantic_core import PydanticCustomError

# ---------------------------------------------------------------- what probes read and return


@dataclass
class Split:
    """One feature vector per unit (image, volume or slide)."""

    x: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n, C) 0/1
    exclusive: bool = False  # one label per unit (multiclass, one-hot y): softmax cross-entropy, not BCE
    select: str = "macro_auroc"  # the task's headline: what the probe selects its configuration on, on val


@dataclass
class BagSplit:
    """Bags of instance features: slices of a volume (3D pooling) or tiles of a slide (ABMIL)."""

    x: list[np.ndarray]  # one (n_i, d) array per bag
    y: np.ndarray  # (n_bags, C) 0/1
    exclusive: bool = False  # one label per bag (multiclass): softmax cross-entropy
    select: str = "macro_auroc"  # the task's headline: what the probe selects its configuration on, on val


@dataclass
class SegSplit:
    """Patch-token grids and label maps for segmentation heads.

    2D: ``x`` (n, D, h, w), ``y`` (n, H, W) int class labels (or instance ids for affinity heads; or
    bit-packed overlapping structures where ``multilabel``).
    3D: ``x`` (n, S, D, h, w) — S slices of a volume stacked — and ``y`` (n, S, H, W).
    """

    x: np.ndarray
    y: np.ndarray
    volume_ids: np.ndarray | None = None  # patient / volume of each item, for intervals
    spacing: list[tuple[float, ...]] | None = None  # per item, in the label maps' axis order (metrics in mm / nm)
    # the label maps bit-pack structures that may overlap (dinoscale.metrics.pack_labels; the task says so):
    # segmentation heads train a sigmoid per structure instead of a softmax over classes
    multilabel: bool = False
    # the items' images on the label maps' grid ((H, W) or (S, H, W) float32 each, read when indexed), for probes
    # whose descriptor asks for them (``ProbeDef.images``: registration's foreground mask and MIND-SSC)
    images: Any = None


def grid_edges(grid: dict[str, list], selected: dict) -> dict[str, str]:
    """The hyper-parameters whose value chosen on val sits on an edge of a grid of at least 2 values:
    {name: 'top' | 'bottom'}. A choice on the edge says the grid may not contain the optimum. A bottom of 0
    (no weight decay) is the end of its range, not an edge: nothing below it was left out."""
    out = {}
    for name, values in grid.items():
        values = sorted(set(values))
        if len(values) >= 2 and name in selected:
            if selected[name] == values[-1]:
                out[name] = "top"
            elif selected[name] == values[0] and values[0] != 0:
                out[name] = "bottom"
    return out


@dataclass
class ProbeResult:
    test_scores: np.ndarray  # (n_test, C); segmentation: predicted label maps (n_test, *spatial)
    val_metric: float  # selection metric of the chosen configuration on val (probes maximise it)
    selected: dict  # chosen hyper-parameters
    candidates: int  # configurations compared on val
    extra: dict = field(default_factory=dict)
    edges: dict = field(default_factory=dict)  # selected values on a grid edge (``grid_edges``): tagged and warned
    # the chosen configuration's val outputs (as test_scores): the val metric's patient-level interval, so that
    # two cells whose val intervals overlap are not called different (None: the probe does not give them)
    val_scores: np.ndarray | None = None


# ---------------------------------------------------------------- descriptors

# The input a probe reads: one vector per unit, a bag of vectors per unit, or a patch-token grid.
INPUTS = ("vector", "bag", "grid")
# The rows of a feature set:
#   images  - one per manifest row (2D images; WSI tiles, grouped per slide by the trial)
#   volumes - one per volume, slice features pooled as they stream past (3D classification)
#   slices  - one per slice of each volume, in volume order (segmentation heads; attention pooling)
VIEWS = ("images", "volumes", "slices")
GRID_TOKENS = "patch_grid"  # the token set of grid probes (dinoscale.features.extract)


class ProbeSpecBase(BaseModel):
    """Base of every probe's spec: unknown keys are errors, values are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str

    @property
    def label(self) -> str:
        """The probe's name in the grid (a cell's ``probe`` axis value)."""
        return self.kind


SpaceFn = Callable[[Any, Any], dict]  # (optuna.Trial, the probe's spec) -> field overrides
FitFn = Callable[..., ProbeResult]  # (spec, train, val, test, seed=) -> ProbeResult
RulesFn = Callable[[Any, str], dict]  # (the probe's spec, the task) -> {rule: words} for the protocol table


@dataclass(frozen=True)
class ProbeDef:
    kind: str
    spec: type[ProbeSpecBase]
    fit: FitFn
    tasks: tuple[str, ...]  # the dataset tasks it serves (dinoscale.tasks)
    input: Literal["vector", "bag", "grid"]
    space: SpaceFn | None = None  # Optuna search space for ``search.n_trials > 1`` (None: its own grid only)
    units: tuple[str, ...] = ("image", "volume")  # dataset units it can read (dinoscale.data: image | volume)
    bags_only: bool = False  # reads bags: slices of volumes, or a dataset whose images come in bags (slides)
    description: str = ""
    # True: its fit reads the splits' arrays through dinoscale.features.rows (``as_batches``, ``column_stats``:
    # views of the store read a mini-batch at a time above the trial's memory budget); False: it gets plain
    # float32 arrays, the whole split in memory (the plan counts it so).
    streams: bool = False
    rules: RulesFn | None = None  # loss, optimiser, init, selection in words (dinoscale.sweep.protocol)
    images: bool = False  # grid probes: its SegSplits carry the items' images on the label maps' grid

    def view(self, volumetric: bool) -> str:
        """The feature-set view the probe reads from a 2D (``volumetric=False``) or a 3D dataset."""
        if not volumetric:
            return "images"
        return "volumes" if self.input == "vector" else "slices"

    def tokens(self, spec_tokens: str) -> str:
        """Grid probes read the patch-token grid; the others the spec's token set."""
        return GRID_TOKENS if self.input == "grid" else spec_tokens

    def unfit_reason(self, task: str, volumetric: bool, bagged: bool) -> str | None:
        """Why this probe cannot run on a dataset (None when it can), said before anything starts."""
        if task not in self.tasks:
            return f"probe '{self.kind}' serves {', '.join(self.tasks)}, not a {task} task"
        if (volumetric and "volume" not in self.units) or (not volumetric and "image" not in self.units):
            return f"probe '{self.kind}' reads {' or '.join(self.units)} data"
        if self.bags_only and not (volumetric or bagged):
            return f"probe '{self.kind}' pools bags (slices of 3D volumes, tiles of a slide); this dataset holds single 2D images"
        return None


_PROBES: dict[str, ProbeDef] = {}
_LOADED = False


def register_probe(defn: ProbeDef) -> ProbeDef:
    """Add a probe (called at import of its module). The spec's ``kind`` literal must be its kind."""
    kind_field = defn.spec.model_fields.get("kind")
    if kind_field is None or kind_field.default != defn.kind:
        raise TypeError(
            f"probe '{defn.kind}': its spec class {defn.spec.__name__} needs kind: Literal['{defn.kind}'] = "
            f"'{defn.kind}'"
        )
    if defn.input not in INPUTS:
        raise TypeError(f"probe '{defn.kind}': input must be one of {INPUTS}, not {defn.input!r}")
    _PROBES[defn.kind] = defn
    return defn


def load_probes() -> None:
    """Import every module of ``dinoscale.probes`` and those named in ``DINOSCALE_PLUGINS`` (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("dinoscale.probes")
    for m in pkgutil.iter_modules(package.__path__):
        if m.name != "registry":
            importlib.import_module(f"dinoscale.probes.{m.name}")
    for name in filter(None, (s.strip() for s in os.environ.get("DINOSCALE_PLUGINS", "").split(","))):
        importlib.import_module(name)


def get_probe(kind: str) -> ProbeDef:
    load_probes()
    if kind not in _PROBES:
        raise KeyError(f"unknown probe '{kind}'; known: {', '.join(probe_kinds())}")
    return _PROBES[kind]


def probe_kinds() -> list[str]:
    load_probes()
    return sorted(_PROBES)


def unfit_message(
    kinds: list[str], dataset: str, task: str, volumetric: bool | None, bagged: bool | None
) -> str | None:
    """Why the probes ``kinds`` cannot run on a dataset, with the probes that can (None when all fit).
    ``volumetric`` / ``bagged`` None: not known yet (a spec checked without its data): only the task is
    checked, as a 2D dataset of single images would be for the units."""
    known = volumetric is not None and bagged is not None

    def reason(kind: str) -> str | None:
        d = get_probe(kind)
        if not known:
            return d.unfit_reason(task, False, True) if task not in d.tasks else None
        return d.unfit_reason(task, bool(volumetric), bool(bagged))

    unfit = {k: r for k in kinds if (r := reason(k))}
    if not unfit:
        return None
    fitting = [k for k in probe_kinds() if reason(k) is None]
    return (
        f"probe(s) {list(unfit)} do not fit dataset '{dataset}' ({task} task){' of 3D volumes' if volumetric else ''}: "
        + "; ".join(unfit.values())
        + f". Probes that fit: {', '.join(fitting)}"
    )


def _validate_probe(value: Any) -> ProbeSpecBase:
    """Dispatch a spec's probe entry to its probe's spec class by ``kind`` (errors keep their key path)."""
    if isinstance(value, ProbeSpecBase):
        return value
    if not isinstance(value, dict) or "kind" not in value:
        raise PydanticCustomError(
            "probe_kind_missing", "a probe needs a 'kind'; known: {known}", {"known": ", ".join(probe_kinds())}
        )
    kind = value["kind"]
    load_probes()
    if kind not in _PROBES:
        hint = difflib.get_close_matches(str(kind), probe_kinds(), n=1)
        raise PydanticCustomError(
            "probe_kind",
            "unknown probe '{kind}'{hint}; known: {known}",
            {"kind": kind, "hint": f" (did you mean '{hint[0]}'?)" if hint else "", "known": ", ".join(probe_kinds())},
        )
    return _PROBES[kind].spec.model_validate(value)


# The type of a spec's probe entry: validated by the registered class of its kind, dumped in full.
ProbeSpec = Annotated[SerializeAsAny[ProbeSpecBase], PlainValidator(_validate_probe)]


def probe_spec_class(node: Any) -> type[ProbeSpecBase] | None:
    """The spec class a raw probe entry would be validated with (for error messages)."""
    kind = node.get("kind") if isinstance(node, dict) else None
    load_probes()
    return _PROBES[kind].spec if kind in _PROBES else None
