"""``lora``: peft LoRA adapters on the attention projections of the backbone (every other weight frozen),
plus a trained head. Its settings, its search space, its trainable and its memory model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dinoscale.strategies.registry import (
    BUDGET,
    GRAD_CHECKPOINTING,
    FloatChoices,
    IntChoices,
    LinRange,
    LogRange,
    SearchSpaceBase,
    StrategyDef,
    StrategySpecBase,
    register_strategy,
)
from dinoscale.train.lora import apply_lora, target_regex


class LoraSearchSpace(SearchSpaceBase):
    """What the per-cell search samples for ``lora`` (Latin hypercube, seeded; dinoscale.search). A range
    with low == high, or a single choice, fixes that hyper-parameter."""

    lr: LogRange = Field((1e-4, 3e-3), description="learning rate, log-uniform")
    weight_decay: LogRange = Field((1e-5, 1e-1), description="AdamW weight decay (adapters + head), log-uniform")
    warmup_epochs: LinRange = Field((0.0, 1.0), description="linear warm-up before the cosine decay, uniform")
    rank: IntChoices = Field(default_factory=lambda: [4, 8, 16], description="LoRA rank, a choice")
    alpha: FloatChoices = Field(
        default_factory=lambda: [8.0, 16.0, 32.0], description="LoRA alpha (scale alpha / rank), a choice"
    )
    dropout: LinRange = Field((0.0, 0.2), description="dropout on the LoRA path, uniform")


class LoraStrategySpec(StrategySpecBase):
    """LoRA through peft on the attention projections of the backbone, plus a trained head. The values
    here are the stated defaults (configuration 0 of a search); ``space`` is what the search samples."""

    kind: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[Literal["qkv", "proj", "fc1", "fc2"]] = Field(
        default_factory=lambda: ["qkv", "proj"], min_length=1, description="module names inside each block"
    )
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(10, ge=1, description="epochs per configuration (the search's max; early stopping may cut)")
    warmup_epochs: float = Field(1.0, ge=0)
    batch_size: int = Field(32, ge=1, description="effective batch (the plan may split it into micro-batches)")
    patience: int | None = Field(3, ge=1, description="early stopping on val (epochs without improvement)")
    grad_checkpointing: bool = Field(False, description=GRAD_CHECKPOINTING)
    budget: int | None = Field(None, ge=1, description=BUDGET)
    space: LoraSearchSpace = Field(default_factory=LoraSearchSpace)


def prepare(backbone, cfg):
    """Adapters injected, every other weight of the backbone frozen."""
    return apply_lora(backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)


def grads(spec: LoraStrategySpec) -> str:
    """The adapted projections' weights: a frozen layer keeps no input for a weight gradient, an adapted one does
    (measured with gradients on exactly those weights)."""
    return rf"{target_regex(list(spec.targets))}\.weight"


def adapter_params(facts, rank: int, targets) -> int:
    """Adapter parameters: rank x (in + out) per adapted projection per block."""
    d = facts.embed_dim
    sizes = {"qkv": d + 3 * d, "proj": 2 * d, "fc1": d + 4 * d, "fc2": 4 * d + d}
    return facts.n_blocks * rank * sum(sizes[t] for t in targets)


def trained_params(spec: LoraStrategySpec, facts) -> int:
    """The adapters at the largest rank the search may draw."""
    return adapter_params(facts, max([spec.rank, *spec.space.rank]), spec.targets)


register_strategy(
    StrategyDef(
        "lora",
        LoraStrategySpec,
        prepare=prepare,
        grads=grads,
        trained_params=trained_params,
        config_names={"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "lora_targets"},
        description="LoRA adapters on the attention projections, backbone frozen",
    )
)
