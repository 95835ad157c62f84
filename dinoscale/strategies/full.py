"""``full``: every weight of the backbone trained, with layer-wise learning-rate decay (AdamW, warm-up +
cosine), plus a trained head. Its settings, its search space, its trainable and its memory model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dinoscale.strategies.registry import (
    BUDGET,
    GRAD_CHECKPOINTING,
    LinRange,
    LogRange,
    SearchSpaceBase,
    StrategyDef,
    StrategySpecBase,
    register_strategy,
)
from dinoscale.train.llrd import llrd_param_groups


class FullSearchSpace(SearchSpaceBase):
    """What the per-cell search samples for ``full`` (Latin hypercube, seeded; dinoscale.search)."""

    lr: LogRange = Field((1e-5, 5e-4), description="learning rate of the head and last block, log-uniform")
    weight_decay: LogRange = Field((1e-3, 0.3), description="AdamW weight decay, log-uniform")
    layer_decay: LinRange = Field((0.5, 0.95), description="layer-wise learning-rate decay, uniform")
    warmup_epochs: LinRange = Field((0.0, 1.0), description="linear warm-up before the cosine decay, uniform")

    @field_validator("warmup_epochs", "layer_decay")
    @classmethod
    def _non_negative(cls, v):
        if v[0] < 0:
            raise ValueError(f"must be >= 0, got {list(v)}")
        return v


class FullStrategySpec(StrategySpecBase):
    """End-to-end fine-tuning with layer-wise learning-rate decay, AdamW, warm-up + cosine. The values
    here are the stated defaults (configuration 0 of a search); ``space`` is what the search samples."""

    kind: Literal["full"] = "full"
    lr: float = Field(1e-4, gt=0, description="learning rate of the head and last block; earlier layers decay")
    layer_decay: float = Field(0.75, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    epochs: int = Field(10, ge=1, description="epochs per configuration (the search's max; early stopping may cut)")
    warmup_epochs: float = Field(1.0, ge=0)
    batch_size: int = Field(32, ge=1, description="effective batch (the plan may split it into micro-batches)")
    patience: int | None = Field(3, ge=1)
    grad_checkpointing: bool = Field(False, description=GRAD_CHECKPOINTING)
    budget: int | None = Field(None, ge=1, description=BUDGET)
    space: FullSearchSpace = Field(default_factory=FullSearchSpace)


def prepare(backbone, cfg):
    """Every weight trainable."""
    for p in backbone.parameters():
        p.requires_grad = True
    return backbone


def param_groups(model, cfg) -> list:
    return llrd_param_groups(model, cfg.lr, cfg.layer_decay, cfg.weight_decay)


def trained_params(spec: FullStrategySpec, facts) -> int:
    return facts.n_params


register_strategy(
    StrategyDef(
        "full",
        FullStrategySpec,
        prepare=prepare,
        grads=lambda spec: None,
        trained_params=trained_params,
        param_groups=param_groups,
        description="every weight trained, layer-wise learning-rate decay",
    )
)
