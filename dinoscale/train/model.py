"""Backbone + classification head trained end to end; the head sees the same features as the frozen
probes (CLS concatenated with the mean of the patch tokens, registers excluded)."""

from __future__ import annotations

import torch
from torch import nn


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, n_out: int, num_prefix_tokens: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_prefix_tokens = int(num_prefix_tokens if num_prefix_tokens is not None else backbone.num_prefix_tokens)
        self.head = nn.Linear(2 * backbone.num_features, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)  # (B, prefix + patches, D), already normed
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
