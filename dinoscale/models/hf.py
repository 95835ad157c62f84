"""Hugging Face transformers vision models behind the interface the extractor reads from a timm model.

``forward_features(x)`` returns ``[B, prefix + patches, D]`` (the model's ``last_hidden_state``, final norm
applied), and the attributes the backbone facts are measured from are there: ``patch_embed.patch_size``,
``num_prefix_tokens``, ``num_features``, ``cls_token`` (None without one), ``pretrained_cfg`` (mean / std).
The model is built from its config (declared in ``families.py``), never from the network: weights come from
a file (the Hugging Face cache or a local one) read like every other checkpoint, with
``checkpoint_filter_fn`` below mapping the file's key names onto this wrapper.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import transformers  # noqa: F401 - this module is imported only when a transformers family is built


class TransformersEncoder(torch.nn.Module):
    def __init__(self, model_class: str, config_class: str, config: dict, mean, std):
        super().__init__()
        cfg = getattr(transformers, config_class)(**config)
        self.model_class = model_class
        self.hf = getattr(transformers, model_class)(cfg)
        self.patch_embed = SimpleNamespace(patch_size=int(cfg.patch_size))
        self._has_cls = model_class != "SiglipVisionModel"  # SigLIP: patch tokens only (a MAP head pools them)
        self.num_prefix_tokens = int(self._has_cls)
        self.num_features = int(cfg.hidden_size)
        self.pretrained_cfg = {
            "mean": tuple(mean),
            "std": tuple(std),
            "input_size": (3, cfg.image_size, cfg.image_size),
        }

    @property
    def cls_token(self):
        return self.hf.embeddings.cls_token if self._has_cls else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Dinov2 interpolates its position embedding to any size by itself; SigLIP is asked to
        extra = {} if self._has_cls else {"interpolate_pos_encoding": True}
        return self.hf(pixel_values=x, **extra).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def checkpoint_filter_fn(state_dict: dict, model: TransformersEncoder) -> dict:
    """A transformers checkpoint's keys onto the wrapper, whichever way it was saved: the vision model alone
    (with or without its ``vision_model.`` / ``dinov2.`` / ``model.`` prefix, which differs across transformers
    versions) or a whole model: a SigLIP's text tower and logit scale, a task head, are left out. A key that fits
    nowhere is kept as it is, so that the load reports it."""
    own = set(model.state_dict())
    prefixes = ("", "vision_model.", "dinov2.", "model.")
    skip = ("text_model.", "logit_scale", "logit_bias", "classifier.")
    out = {}
    for k, v in state_dict.items():
        if k.startswith(skip):
            continue
        fits = [f"hf.{k[len(p) :]}" for p in prefixes if k.startswith(p) and f"hf.{k[len(p) :]}" in own]
        out[fits[0] if fits else f"hf.{k}"] = v
    return out
