"""The encoder trained end to end under a task head.

Every model reads the same features as the frozen probes of its task, so a frozen cell and a lora /
full cell of one backbone x resolution differ by the adaptation only:

- ``ImageClassifier``: a 2D image -> CLS concatenated with the mean of the patch tokens (registers
  excluded) -> linear head.
- ``VolumeClassifier``: a volume of S slices -> the same slice features, pooled over the slices
  (``mean``, ``max`` or ``mean_max``, as the frozen volumes view) -> linear head. The slice encoder
  is the one being adapted.
- ``Segmenter``: the patch-token grid of each image (or of each slice, stacked back into its
  volume) -> a segmentation head of ``dinoscale.probes.segmentation`` (linear, conv, conv3d) ->
  logits at the label maps' size.
"""

from __future__ import annotations

import torch
from torch import nn

POOLS = ("mean", "max", "mean_max")


def _prefix(backbone: nn.Module, num_prefix_tokens: int | None) -> int:
    return int(num_prefix_tokens if num_prefix_tokens is not None else backbone.num_prefix_tokens)


def cls_mean_patch(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B, prefix + patches, D), already normed -> (B, 2D): CLS ⊕ mean patch token."""
    return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(1)], dim=1)


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, n_out: int, num_prefix_tokens: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.num_prefix_tokens = _prefix(backbone, num_prefix_tokens)
        self.head = nn.Linear(2 * backbone.num_features, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return cls_mean_patch(self.backbone.forward_features(x), self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class VolumeClassifier(nn.Module):
    """x: (B, S, 3, r, r), or a list of B volumes (S_i, 3, r, r) of different depths -> logits (B, n_out);
    every slice goes through the adapted encoder."""

    def __init__(self, backbone: nn.Module, n_out: int, pool: str = "mean", num_prefix_tokens: int | None = None):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown volume pooling '{pool}' ({', '.join(POOLS)})")
        self.backbone, self.pool = backbone, pool
        self.num_prefix_tokens = _prefix(backbone, num_prefix_tokens)
        self.head = nn.Linear(2 * backbone.num_features * (2 if pool == "mean_max" else 1), n_out)

    def features(self, x) -> torch.Tensor:
        depths = [len(v) for v in x]
        slices = torch.cat(list(x)) if isinstance(x, (list, tuple)) else x.flatten(0, 1)
        f = cls_mean_patch(self.backbone.forward_features(slices), self.num_prefix_tokens)
        return torch.stack([self._pool(v) for v in f.split(depths)])

    def _pool(self, f: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            return f.mean(0)
        if self.pool == "max":
            return f.amax(0)
        return torch.cat([f.mean(0), f.amax(0)])

    def forward(self, x) -> torch.Tensor:
        return self.head(self.features(x))


class Segmenter(nn.Module):
    """x: (B, 3, r, r) -> logits (B, n_out, H, W); volumes x: (B, S, 3, r, r) -> (B, n_out, S, H, W).

    ``head``: from ``dinoscale.probes.segmentation.build_head`` (built with ``volumetric`` for volumes);
    ``out_size``: the label maps' (H, W), or (S, H, W) for volumes."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        out_size: tuple[int, ...],
        patch_size: int,
        num_prefix_tokens: int | None = None,
    ):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.out_size, self.patch_size = tuple(int(s) for s in out_size), int(patch_size)
        self.num_prefix_tokens = _prefix(backbone, num_prefix_tokens)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, r, r) -> the patch-token grid (N, D, r/p, r/p), as the frozen ``patch_grid`` features."""
        tokens = self.backbone.forward_features(x)[:, self.num_prefix_tokens :]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            b, s = x.shape[:2]
            g = self.grid(x.flatten(0, 1))
            return self.head(g.unflatten(0, (b, s)), self.out_size)
        return self.head(self.grid(x), self.out_size)
