"""Backbone forward passes: images on disk -> classification features (CLS ⊕ mean patch tokens)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dinoscale.models import LoadedBackbone


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, token_set: str) -> torch.Tensor:
    """``tokens``: [B, 1 + registers + patches, D] from ``forward_features`` (already normed).

    Registers (indices 1..num_prefix_tokens-1) are always excluded.
    """
    cls = tokens[:, 0]
    patches = tokens[:, num_prefix_tokens:]
    if token_set == "cls":
        return cls
    if token_set == "mean_patch":
        return patches.mean(1)
    if token_set == "cls_mean_patch":
        return torch.cat([cls, patches.mean(1)], dim=-1)
    raise ValueError(f"unknown token set '{token_set}'")


@dataclass
class ExtractionStats:
    images: int
    forward_passes: int  # batches through the backbone
    seconds: float


def pick_device() -> torch.device:
    # Choose from torch, not from Ray: a simulated GPU node sets CUDA_VISIBLE_DEVICES without a GPU.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.inference_mode()
def extract_features(
    backbone: LoadedBackbone,
    paths: list[str],
    resolution: int,
    token_set: str = "cls_mean_patch",
    interpolation: str = "bicubic",
    batch_size: int = 32,
    device: torch.device | None = None,
) -> tuple[np.ndarray, ExtractionStats]:
    from dinoscale.data.preprocess import ImageFiles, build_transform

    device = device or pick_device()
    model = backbone.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    transform = build_transform(resolution, backbone.mean, backbone.std, interpolation)
    workers = 0 if device.type == "cpu" else min(8, max(1, (torch.get_num_threads() or 2) // 2))
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    out, batches, t0 = [], 0, time.perf_counter()
    for x in loader:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = model.forward_features(x)
        out.append(pool_tokens(tokens.float(), backbone.num_prefix_tokens, token_set).cpu())
        batches += 1
    feats = torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
    return feats, ExtractionStats(len(paths), batches, time.perf_counter() - t0)
