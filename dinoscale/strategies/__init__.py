"""Adaptation strategies. One registry (``registry.py``); each strategy module (``frozen``, ``lora``,
``full``) declares its spec class, its search space, its trainable, its memory model and its heads in
one ``StrategyDef``. A new strategy is one module here (or one named in ``DINOSCALE_PLUGINS``)."""

from __future__ import annotations

from dinoscale.strategies.registry import (  # noqa: F401
    TRAINING,
    FloatChoices,
    IntChoices,
    LinRange,
    LogRange,
    SearchSpaceBase,
    StrategyDef,
    StrategySpecBase,
    TrainingSpecBase,
    get_strategy,
    load_strategies,
    register_strategy,
    strategy_kinds,
    training_kinds,
)
