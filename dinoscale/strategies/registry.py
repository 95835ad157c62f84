"""The strategy registry: each adaptation strategy declares everything about itself in one ``StrategyDef``.

The probe registry's habit (``dinoscale.probes.registry``) applied to how a backbone is adapted. A
strategy module defines its spec class (a ``StrategySpecBase`` with a ``kind`` literal: the stated
values of configuration 0 and, under ``space``, the search space: each field's type says how it is
sampled, ``LogRange``, ``LinRange`` or ``Choices``), how it makes a backbone trainable, its memory model
(which backbone weights get gradients, how many parameters the optimiser updates), its optimiser groups
and the heads it can train, and registers one descriptor. The spec (the strategy list and
``finetuning.<kind>``), the search (``dinoscale.search``), the plan (heads, GPU memory), the training
loop and the trial ask the descriptor; nothing else lists strategies.

``frozen`` is a strategy too, one that trains nothing: its cells fit the probes on cached features.

Modules in ``dinoscale/strategies/`` are found by name (``load_strategies``), so adding a strategy is
one file. Strategies outside the package: list their importable modules in ``DINOSCALE_PLUGINS``
(comma-separated, as for probes; Ray workers inherit it).

A leaf module: it imports nothing from dinoscale, so the spec can import it without a circle.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, SerializeAsAny
from pydantic_core import PydanticCustomError

# ---------------------------------------------------------------- the search space, declared by its types


@dataclass(frozen=True)
class Scale:
    """How the search samples a field of a strategy's ``space`` (``dinoscale.search``)."""

    name: str  # 'log' | 'linear' (a [low, high] range) | 'choice' (a list)


def _range(v: tuple[float, float], log: bool) -> tuple[float, float]:
    low, high = v
    if not low <= high:
        raise ValueError(f"a search range is [low, high] with low <= high, got {[low, high]}")
    if log and low <= 0:
        raise ValueError(f"a log-uniform range needs low > 0, got {[low, high]}")
    return (low, high)


def _positive(v: list) -> list:
    if any(x <= 0 for x in v):
        raise ValueError(f"choices must be positive, got {v}")
    return v


# [low, high] sampled log-uniformly; low == high fixes the value
LogRange = Annotated[tuple[float, float], AfterValidator(lambda v: _range(v, True)), Scale("log")]
# [low, high] sampled uniformly
LinRange = Annotated[tuple[float, float], AfterValidator(lambda v: _range(v, False)), Scale("linear")]
# a list of positive values, one drawn per configuration; a single value fixes it
IntChoices = Annotated[list[int], Field(min_length=1), AfterValidator(_positive), Scale("choice")]
FloatChoices = Annotated[list[float], Field(min_length=1), AfterValidator(_positive), Scale("choice")]


class SearchSpaceBase(BaseModel):
    """Base of a strategy's ``space``: every field is a ``LogRange``, ``LinRange`` or ``*Choices``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def scales(space: type[SearchSpaceBase]) -> dict[str, str]:
    """{field: 'log' | 'linear' | 'choice'} of a search space class, in declaration order."""
    out = {}
    for name, f in space.model_fields.items():
        found = [m.name for m in f.metadata if isinstance(m, Scale)]
        if not found:
            raise TypeError(f"{space.__name__}.{name}: declare it as LogRange, LinRange, IntChoices or FloatChoices")
        out[name] = found[0]
    return out


# ---------------------------------------------------------------- descriptors


class StrategySpecBase(BaseModel):
    """Base of every training strategy's settings (``finetuning.<kind>``): unknown keys are errors, values
    frozen. Every field except ``kind``, ``budget`` and ``space`` is a stated value of configuration 0; the
    fields of ``space`` (a ``SearchSpaceBase``) are what the search samples, each named as the stated value
    it replaces."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str


NOT_CONFIGURATION = ("kind", "budget", "space")  # spec fields that are not settings of a configuration
# What the plan, the training loop and the selection read of every training strategy's settings
LOOP_FIELDS = ("epochs", "batch_size", "grad_checkpointing", "budget")
BUDGET = (
    "configurations searched per cell (the same for every cell of this strategy); none: the sweep's "
    "search.n_trials, i.e. the frozen cells' budget. Configuration 0 is the stated values above, the "
    "others are sampled from 'space'. 1: the stated values only"
)
GRAD_CHECKPOINTING = "true: always on; false: the plan turns it on where a trial would not fit in GPU memory"


class TrainingSpecBase(StrategySpecBase):
    """A base for a new training strategy's settings: the training loop's (``dinoscale.train.FinetuneConfig``)
    with their defaults; a subclass adds its own fields (passed to its ``prepare`` as ``cfg.options``), its
    ``kind`` literal and its ``space``. (``lora`` and ``full`` state every field themselves.)"""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(10, ge=1, description="epochs per configuration (the search's max; early stopping may cut)")
    warmup_epochs: float = Field(1.0, ge=0)
    batch_size: int = Field(32, ge=1, description="effective batch (the plan may split it into micro-batches)")
    patience: int | None = Field(3, ge=1, description="early stopping on val (epochs without improvement)")
    grad_checkpointing: bool = Field(False, description=GRAD_CHECKPOINTING)
    budget: int | None = Field(None, ge=1, description=BUDGET)


PrepareFn = Callable[[Any, Any], Any]  # (backbone nn.Module, FinetuneConfig) -> the backbone, trainable as it says
GradsFn = Callable[[Any], "str | None"]  # (its spec) -> regex of backbone parameter names given gradients; None: all
TrainedFn = Callable[[Any, Any], int]  # (its spec, train.memory.ActivationFacts) -> parameters the optimiser updates
GroupsFn = Callable[[Any, Any], list]  # (model, FinetuneConfig) -> AdamW parameter groups


@dataclass(frozen=True, eq=False)
class StrategyDef:
    kind: str
    spec: type[StrategySpecBase] | None  # None: trains nothing (frozen: probes on cached features)
    prepare: PrepareFn | None = None  # sets requires_grad on what it trains (adapters injected, blocks unfrozen...)
    # memory model (dinoscale.train.memory): the backbone weights whose gradients are computed decide which
    # activations autograd keeps (a fullmatch regex over parameter names; None: every weight) ...
    grads: GradsFn | None = None
    # ... and the parameters the optimiser updates, head excluded (None: those ``grads`` names)
    trained_params: TrainedFn | None = None
    param_groups: GroupsFn | None = None  # None: AdamW, weight decay on matrices, none on biases and norms
    heads: tuple[str, ...] = ("linear", "segmentation")  # the task heads it trains under (dinoscale.train.heads)
    # spec field -> FinetuneConfig field where they differ (names kept in the record: 'lora_rank' ...)
    config_names: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def trains_encoder(self) -> bool:
        return self.spec is not None

    def space(self) -> dict[str, tuple[str, str]]:
        """What its search samples: {spec field: (configuration key, scale)}, in declaration order."""
        if self.spec is None:
            return {}
        space_cls = self.spec.model_fields["space"].annotation
        return {name: (self.config_names.get(name, name), s) for name, s in scales(space_cls).items()}

    def searched_names(self) -> list[str]:
        """The configuration keys its search varies (logged as ``selected.<name>``)."""
        return [target for target, _ in self.space().values()]


_STRATEGIES: dict[str, StrategyDef] = {}
_LOADED = False


def register_strategy(defn: StrategyDef) -> StrategyDef:
    """Add a strategy (called at import of its module). The spec's ``kind`` literal must be its kind; a
    training strategy's spec has a ``space`` and a ``prepare``."""
    if defn.spec is not None:
        kind_field = defn.spec.model_fields.get("kind")
        if kind_field is None or kind_field.default != defn.kind:
            raise TypeError(
                f"strategy '{defn.kind}': its spec class {defn.spec.__name__} needs kind: Literal['{defn.kind}'] = "
                f"'{defn.kind}'"
            )
        space = defn.spec.model_fields.get("space")
        if space is None or not (isinstance(space.annotation, type) and issubclass(space.annotation, SearchSpaceBase)):
            raise TypeError(f"strategy '{defn.kind}': its spec class needs space: <a SearchSpaceBase subclass>")
        scales(space.annotation)
        missing = [f for f in LOOP_FIELDS if f not in defn.spec.model_fields]
        if missing:
            raise TypeError(f"strategy '{defn.kind}': its spec class lacks {missing} (subclass TrainingSpecBase)")
        if defn.prepare is None:
            raise TypeError(f"strategy '{defn.kind}' trains the encoder: it needs prepare=(backbone, cfg) -> backbone")
    _STRATEGIES[defn.kind] = defn
    return defn


def load_strategies() -> None:
    """Import every module of ``dinoscale.strategies`` and those named in ``DINOSCALE_PLUGINS`` (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("dinoscale.strategies")
    for m in pkgutil.iter_modules(package.__path__):
        if m.name != "registry":
            importlib.import_module(f"dinoscale.strategies.{m.name}")
    for name in filter(None, (s.strip() for s in os.environ.get("DINOSCALE_PLUGINS", "").split(","))):
        importlib.import_module(name)


def get_strategy(kind: str) -> StrategyDef:
    load_strategies()
    if kind not in _STRATEGIES:
        raise KeyError(f"unknown strategy '{kind}'; known: {', '.join(strategy_kinds())}")
    return _STRATEGIES[kind]


def strategy_kinds() -> list[str]:
    load_strategies()
    return sorted(_STRATEGIES)


def training_kinds() -> list[str]:
    """The strategies that train the encoder (every one but ``frozen``)."""
    return [k for k in strategy_kinds() if _STRATEGIES[k].trains_encoder]


class TrainingStrategies:
    """A live view of the training strategies' kinds (``kind in TRAINING``), registered plugins included."""

    def __contains__(self, kind: object) -> bool:
        return isinstance(kind, str) and kind in training_kinds()

    def __iter__(self) -> Iterator[str]:
        return iter(training_kinds())

    def __repr__(self) -> str:
        return repr(tuple(training_kinds()))


TRAINING = TrainingStrategies()


# ---------------------------------------------------------------- the spec: the strategy list and finetuning.<kind>


def _unknown(kind: str, known: list[str]) -> PydanticCustomError:
    hint = difflib.get_close_matches(str(kind), known, n=1)
    return PydanticCustomError(
        "strategy_kind",
        "unknown strategy '{kind}'{hint}; known: {known}",
        {"kind": kind, "hint": f" (did you mean '{hint[0]}'?)" if hint else "", "known": ", ".join(known)},
    )


def _validate_kind(value: Any) -> str:
    if not isinstance(value, str) or value not in strategy_kinds():
        raise _unknown(value, strategy_kinds())
    return value


# An entry of the spec's strategy list: a registered kind.
StrategyKind = Annotated[str, PlainValidator(_validate_kind)]


def _validate_settings(value: Any) -> StrategySpecBase:
    """Dispatch ``finetuning.<kind>`` to its strategy's spec class (``kind`` set from the key by the spec)."""
    if isinstance(value, StrategySpecBase):
        return value
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind not in training_kinds():
        raise _unknown(kind, training_kinds())
    return _STRATEGIES[kind].spec.model_validate(value)


# The type of a ``finetuning.<kind>`` entry: validated by the registered class of its kind, dumped in full.
StrategySettings = Annotated[SerializeAsAny[StrategySpecBase], PlainValidator(_validate_settings)]


def settings_with_kinds(data: Any, own_fields: set[str]) -> Any:
    """``finetuning``'s raw mapping with each strategy entry told its kind and every training strategy's
    defaults filled in (the spec model validates each entry through ``StrategySettings``)."""
    if not isinstance(data, dict):
        return data
    out = {k: ({"kind": k, **v} if k not in own_fields and isinstance(v, dict) else v) for k, v in data.items()}
    for kind in training_kinds():
        out.setdefault(kind, {"kind": kind})
    return out


def strategy_spec_class(kind: Any) -> type[StrategySpecBase] | None:
    """The spec class of ``finetuning.<kind>`` (for error messages)."""
    load_strategies()
    d = _STRATEGIES.get(kind) if isinstance(kind, str) else None
    return d.spec if d is not None else None
