"""Vision towers of CLIP-style encoders (open_clip: BiomedCLIP; the CONCH package) behind the interface the
extractor reads from a timm model.

Both towers wrap a timm ViT trunk (``visual.trunk``) with their own pooling / projection head (open_clip's
linear projection; CONCH's attentional poolers). ``forward_features(x)`` returns the trunk's tokens
``[B, prefix + patches, D]`` (final norm applied): the protocol pools tokens itself, the heads are kept only so
that a checkpoint's vision keys load one to one. The tower is built from the config its family declares
(``families.py``), never from the network (open_clip's ``hf-hub:`` names and CONCH's ``hf_hub:`` checkpoints
download); weights come from a file read like every other checkpoint, with ``checkpoint_filter_fn`` below
keeping the vision keys. The text towers are never built.

Each builder imports its own package inside it: a family needs only its own loader installed.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import timm
import torch


class VisionTowerEncoder(torch.nn.Module):
    def __init__(self, visual: torch.nn.Module, image_size: int, mean, std):
        super().__init__()
        self.visual = visual
        trunk = visual.trunk
        p = trunk.patch_embed.patch_size
        self.patch_embed = SimpleNamespace(patch_size=int(p[0] if isinstance(p, (tuple, list)) else p))
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        self.num_features = int(trunk.num_features)
        self.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std), "input_size": (3, image_size, image_size)}

    @property
    def cls_token(self):
        return self.visual.trunk.cls_token

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The trunk's transformer blocks (``visual.trunk.blocks.<i>``): what LoRA's targets, layer-wise decay and
        the memory model find, as on a timm ViT."""
        return self.visual.trunk.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def build_open_clip(config: dict, mean, std) -> VisionTowerEncoder:
    """open_clip's vision tower from an open_clip model config's ``embed_dim`` + ``vision_cfg`` keys (a timm
    trunk, ``timm_model_pretrained`` false: nothing is downloaded). open_clip builds the timm trunk at its fixed
    input size; dinoscale's trunk is the same timm model with ``dynamic_img_size`` (same parameters, same names)
    so that one model serves every sweep resolution. open_clip's tower is laid out on the meta device and only
    its head materialised (one random init of the trunk, not two: seconds for a ViT-B on a CPU)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = dict(config)
    embed_dim = cfg.pop("embed_dim")
    vision = CLIPVisionCfg(**cfg, timm_model_pretrained=False)
    if not vision.timm_model_name:
        raise ValueError("dinoscale builds open_clip vision towers with a timm trunk only (vision_cfg.timm_model_name)")
    with torch.device("meta"):
        visual = _build_vision_tower(embed_dim, vision)
    layout = [(k, p.shape) for k, p in visual.trunk.named_parameters()]
    pool = {"global_pool": vision.timm_pool} if vision.timm_pool else {}
    visual.trunk = timm.create_model(vision.timm_model_name, num_classes=0, dynamic_img_size=True, **pool)
    assert [(k, p.shape) for k, p in visual.trunk.named_parameters()] == layout, "trunk differs from open_clip's"
    device = next(visual.trunk.parameters()).device  # meta when the caller builds on meta (facts, FLOPs)
    visual.head.to_empty(device=device)
    for m in visual.head.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()  # open_clip's head init: the layers' own
    return VisionTowerEncoder(visual, vision.image_size, mean, std)


def build_conch(config: dict, mean, std) -> VisionTowerEncoder:
    """CONCH's vision tower (``conch.open_clip_custom``: a timm ViT-B/16 trunk, dynamic image size, with the
    contrastive and captioning attentional poolers) from its model config's ``embed_dim``,
    ``embed_dim_caption`` and ``vision_cfg`` keys. CONCH's own loader (``create_model_from_pretrained``) is not
    used: it unpickles the checkpoint without ``weights_only`` and downloads from the hub."""
    with warnings.catch_warnings():  # conch imports timm.models.layers (deprecated path, FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from conch.open_clip_custom.coca_model import _build_vision_tower

    cfg = dict(config)
    embed_dim, caption = cfg.pop("embed_dim"), cfg.pop("embed_dim_caption")
    visual = _build_vision_tower(embed_dim, cfg, embed_dim_caption=caption)
    return VisionTowerEncoder(visual, int(cfg.get("image_size", 224)), mean, std)


def checkpoint_filter_fn(state_dict: dict, model: VisionTowerEncoder) -> dict:
    """A whole CLIP / CoCa checkpoint onto the vision tower: ``visual.*`` keys kept (a DataParallel ``module.``
    prefix removed), the text tower, decoder and logit scale left out. A key that fits nowhere is kept, so that
    the load reports it."""
    skip = ("text.", "text_decoder.", "transformer.", "token_embedding", "positional_embedding", "ln_final.")
    skip += ("text_projection", "logit_scale", "logit_bias", "attn_mask")
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if not k.startswith(skip):
            out[k] = v
    return out
