"""Layer-wise learning-rate decay for ViTs (BEiT / DINOv2 fine-tuning recipe).

Layer 0 is the stem (patch embedding, CLS / register tokens, position embeddings), layer i+1 is
``blocks.i``, layer L+1 is everything after the blocks (final norm, our head). A parameter of layer
``l`` gets ``lr * layer_decay ** (L + 1 - l)``. Biases, norms and tokens (1-D parameters) get no
weight decay.
"""

from __future__ import annotations

import re

from torch import nn

_STEM = ("cls_token", "reg_token", "pos_embed", "patch_embed", "rope", "mask_token")


# the timm ViT trunk inside a family's wrapper (models/clip.py: open_clip's and CONCH's vision towers); what
# else the wrapper holds (their pooling / projection heads) comes after the blocks
_TRUNK = "visual.trunk."


def layer_id(name: str, n_blocks: int) -> int:
    name = name.removeprefix("backbone.").removeprefix(_TRUNK)
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith(_STEM):
        return 0
    return n_blocks + 1


def llrd_param_groups(
    model: nn.Module, lr: float, layer_decay: float, weight_decay: float, n_blocks: int | None = None
) -> list[dict]:
    """AdamW parameter groups; each carries ``layer`` and ``lr_scale`` for inspection and logging."""
    if n_blocks is None:
        backbone = getattr(model, "backbone", model)
        n_blocks = len(backbone.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_id(name, n_blocks)
        decay = p.ndim > 1 and not name.removeprefix("backbone.").removeprefix(_TRUNK).startswith(_STEM[:3])
        scale = layer_decay ** (n_blocks + 1 - layer)
        g = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "layer": layer,
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]
