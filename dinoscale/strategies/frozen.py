"""``frozen``: the backbone is not trained; its cells fit the spec's probes on cached features
(``dinoscale.probes``, one cell per probe). It has no settings of its own: the probes carry them."""

from __future__ import annotations

from dinoscale.strategies.registry import StrategyDef, register_strategy

register_strategy(StrategyDef("frozen", None, heads=(), description="probes on cached features"))
