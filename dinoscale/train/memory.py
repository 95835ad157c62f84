"""GPU memory of one training trial, estimated by the plan before anything runs.

peak = weights (fp32) + gradients and AdamW's two moments of the trainable parameters (12 bytes each)
     + activations kept for backward x the samples of a micro-batch
     + logits of a segmentation head at the label maps' size (forward, softmax, gradient)
     then x 1.15 (allocator fragmentation) + 1 GiB (CUDA context, cuBLAS workspace).

The activations are measured, not typed in: ``forward_features`` runs in train mode on the meta device
(no memory, no weights) under ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor
autograd keeps for the backward pass; the bytes of a batch of 2 minus those of a batch of 1 are one
image's (the weights it keeps cancel). Only the inputs of layers whose weights get gradients are kept
(frozen layers need no input for their weight gradient): each strategy says which (``StrategyDef.grads``:
``lora`` the adapted projections, ``full`` every weight) and they are measured with gradients on exactly
those weights; the parameters its optimiser updates are its ``trained_params``. On the meta device attention runs PyTorch's math path, which keeps the attention
probabilities ([..., T, T]); they are left out and replaced by what a fused attention kernel (flash /
memory-efficient, as GPUs run) keeps instead: three (tokens x dim) tensors per block, a figure taken
from the real saved tensors of the CPU's fused kernel (tests/test_train_memory.py checks the total
against a real forward on the CPU to within 5%). bf16 autocast is taken to halve the
activations (a planning factor, compared with the measured peak by ``benchmarks/gpu_train_check.py``).
Gradient checkpointing (timm's, per block) keeps each block's input (fp32 residual stream) plus one
block's activations while it is recomputed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from dinoscale.models.backbones import _create, get_backbone
from dinoscale.strategies.registry import get_strategy

GIB = 2**30
_OVERHEAD_FACTOR = 1.15
_CONTEXT_BYTES = 1 * GIB
_AMP_FACTOR = 0.5
_FUSED_ATTENTION_TENSORS = 3  # (tokens x dim) fp32 tensors per block a fused attention kernel keeps for backward


@dataclass(frozen=True)
class ActivationFacts:
    """Measured on the meta device for one backbone at one resolution (fp32, train mode)."""

    bytes_per_image: float  # kept for backward, attention probabilities excluded
    n_blocks: int
    tokens: int
    embed_dim: int
    n_params: int
    trainable_params: int


@functools.cache
def activation_facts(backbone: str, resolution: int, grads: str | None = None) -> ActivationFacts:
    """``grads``: a regex (full match) of the backbone's parameter names whose gradients the strategy
    computes (its ``StrategyDef.grads``); None: every parameter."""
    defn = get_backbone(backbone)
    with torch.device("meta"):
        model = _create(defn, pretrained=False)
    model.train()
    if grads is not None:
        pattern = re.compile(grads)
        for name, p in model.named_parameters():
            p.requires_grad = bool(pattern.fullmatch(name))
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def saved(batch: int) -> tuple[int, int]:
        total, tokens = [0], [0]

        def pack(t):
            if not (t.ndim >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] == tokens[0]):  # attention probs
                total[0] += t.numel() * t.element_size()
            return t

        x = torch.empty(batch, 3, resolution, resolution, device="meta")
        with torch.no_grad():
            tokens[0] = model.forward_features(x[:1]).shape[1]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.forward_features(x)
        return total[0], out.shape

    one, shape = saved(1)
    two, _ = saved(2)
    blocks = len(getattr(model, "blocks", [])) or 1
    tokens, dim = int(shape[1]), int(shape[-1])
    fused = _FUSED_ATTENTION_TENSORS * blocks * tokens * dim * 4 if hasattr(model, "blocks") else 0
    return ActivationFacts(float(two - one + fused), blocks, tokens, dim, n_params, trainable)


def strategy_facts(strategy_spec, backbone: str, resolution: int) -> tuple[ActivationFacts, int]:
    """A training strategy's memory model applied to one backbone at one resolution: the activation facts
    measured with gradients where it computes them, and the parameters its optimiser updates (head excluded)."""
    defn = get_strategy(strategy_spec.kind)
    facts = activation_facts(backbone, resolution, defn.grads(strategy_spec) if defn.grads else None)
    trained = defn.trained_params(strategy_spec, facts) if defn.trained_params else facts.trainable_params
    return facts, trained


@dataclass(frozen=True)
class MemoryEstimate:
    bytes: float
    grad_checkpointing: bool
    micro_batch_size: int
    fits: bool

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def estimate_bytes(
    facts: ActivationFacts,
    micro_batch: int,
    images_per_sample: int = 1,
    grad_checkpointing: bool = False,
    amp: bool = True,
    trainable: int = 0,
    head_values_per_sample: int = 0,
) -> float:
    """``images_per_sample``: slices of a volume (1 for 2D); ``trainable``: the parameters the optimiser
    updates (the strategy's, ``strategy_facts``, and the head's); ``head_values_per_sample``: logits a
    segmentation head produces per sample (classes x pixels)."""
    act = facts.bytes_per_image * (_AMP_FACTOR if amp else 1.0)
    if grad_checkpointing:
        per_block_input = facts.tokens * facts.embed_dim * 4
        act = facts.n_blocks * per_block_input + act / facts.n_blocks
    per_sample = act * images_per_sample + 3 * 4 * head_values_per_sample
    return (4 * facts.n_params + 12 * trainable + per_sample * micro_batch) * _OVERHEAD_FACTOR + _CONTEXT_BYTES


def fit_in_memory(estimate, batch_size: int, budget_bytes: float, grad_checkpointing: bool = False) -> MemoryEstimate:
    """The cheapest way to train a batch within ``budget_bytes``: as asked; else with gradient
    checkpointing; else with gradient checkpointing and the largest micro-batch that fits.
    ``estimate(micro_batch, grad_checkpointing) -> bytes``. ``fits`` is False when a micro-batch of
    one sample does not fit either."""
    for ckpt in dict.fromkeys((grad_checkpointing, True)):
        b = estimate(batch_size, ckpt)
        if b <= budget_bytes:
            return MemoryEstimate(b, ckpt, batch_size, True)
    micro = batch_size
    while micro > 1:
        micro = max(1, micro // 2)
        b = estimate(micro, True)
        if b <= budget_bytes:
            return MemoryEstimate(b, True, micro, True)
    return MemoryEstimate(estimate(1, True), True, 1, False)
