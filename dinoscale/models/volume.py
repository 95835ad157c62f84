"""3D CNN encoders of CT volumes (CT-FM: MONAI's SegResEncoder) behind the interface the backbone facts are
measured from.

``forward_features(x)`` takes volumes ``[B, C, D, H, W]`` and returns the last stage's feature map
``[B, D_out, d, h, w]``; ``feature_info`` states its stride, as a timm CNN's does. The encoder is built from
the config its family declares (``families.py``) with MONAI's own class: CT-FM's package (lighter-zoo) is
that class plus the Hub mixin, and its install brings jupyter and ITK. Weights come from a file read like
every other checkpoint (``checkpoint_filter_fn`` below maps the file's key names).

dinoscale's extraction reads 2D images and slices of volumes; a 3D encoder is built, measured and its
weights checked, and a sweep naming it is refused at pre-flight (``preflight.check_dimensions``).
"""

from __future__ import annotations

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder  # ~10 s: imported only when a 3D family is built

from dinoscale.errors import UserError


class VolumeEncoder(torch.nn.Module):
    def __init__(self, name: str, config: dict, mean, std):
        super().__init__()
        self.name = name
        self.encoder = SegResEncoder(**config)
        stages = len(config.get("blocks_down", (1, 2, 2, 4)))
        self.num_features = int(config.get("init_filters", 32)) * 2 ** (stages - 1)
        self.feature_info = [{"num_chs": self.num_features, "reduction": 2 ** (stages - 1), "module": "encoder"}]
        self.in_channels = int(config.get("in_channels", 1))
        self.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise UserError(
                f"backbone '{self.name}' encodes 3D volumes [B, {self.in_channels}, D, H, W]; it was given "
                f"{x.ndim - 2}D input {list(x.shape)} (dinoscale's extraction reads 2D images and slices)"
            )
        return self.encoder(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


_DECODER = ("up_layers.", "up_samples.", "out.", "conv_final.", "head.")


def checkpoint_filter_fn(state_dict: dict, model: VolumeEncoder) -> dict:
    """The encoder's own keys (``conv_init.weight``, ``layers.0.blocks.0...``: CT-FM's feature-extractor file)
    or a whole segmentation network's (``encoder.*``, the decoder left out) onto the wrapper."""
    whole = any(k.startswith("encoder.") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if whole and not k.startswith("encoder."):
            if not k.startswith(_DECODER):
                out[k] = v  # fits nowhere: kept, so that the load reports it
            continue
        out[k if whole else f"encoder.{k}"] = v
    return out
