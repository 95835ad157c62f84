"""Backbone registry: DINOv3 ViTs from timm, plus a ladder of small DINOv3-architecture models.

The demo ladder keeps timm's DINOv3 architecture (RoPE, 4 register tokens, layer scale) and only
reduces width and depth, so the whole pipeline is exercised exactly as with ViT-S/B/L, on a CPU, in
minutes. Parameter counts are always measured from the instantiated model.

Weights never come from unpickling: local files are .safetensors or .pth read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class WeightsError(RuntimeError):
    pass


@dataclass(frozen=True)
class BackboneDef:
    name: str
    timm_name: str
    arch_overrides: dict = field(default_factory=dict)
    hub_tag: str | None = None  # timm pretrained tag; None: no published weights
    description: str = ""

    @property
    def arch_id(self) -> str:
        """Everything that defines the architecture (part of the feature-store key)."""
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.arch_overrides.items()))
        return self.timm_name + (f"[{extra}]" if extra else "")


def _dinov3(name, timm_name, desc, **overrides) -> BackboneDef:
    return BackboneDef(name, timm_name, dict(overrides), None if overrides else "lvd1689m", desc)


BACKBONES: dict[str, BackboneDef] = {
    b.name: b
    for b in [
        _dinov3("dinov3-vits16", "vit_small_patch16_dinov3", "DINOv3 ViT-S/16 (~21.6M)"),
        _dinov3("dinov3-vits16plus", "vit_small_plus_patch16_dinov3", "DINOv3 ViT-S+/16 (~28.7M)"),
        _dinov3("dinov3-vitb16", "vit_base_patch16_dinov3", "DINOv3 ViT-B/16 (~85.6M)"),
        _dinov3("dinov3-vitl16", "vit_large_patch16_dinov3", "DINOv3 ViT-L/16 (~303M)"),
        _dinov3("dinov3-vith16plus", "vit_huge_plus_patch16_dinov3", "DINOv3 ViT-H+/16 (~840M)"),
        # demo ladder: DINOv3 architecture, reduced width/depth, random weights only
        _dinov3("dinov3-demo-xs", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=96, depth=3, num_heads=2),
        _dinov3("dinov3-demo-s", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=144, depth=4, num_heads=3),
        _dinov3("dinov3-demo-m", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=192, depth=6, num_heads=3),
        _dinov3("dinov3-demo-l", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=256, depth=8, num_heads=4),
    ]
}


def backbone_names() -> list[str]:
    return list(BACKBONES)


def get_backbone(name: str) -> BackboneDef:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone '{name}'; known: {', '.join(BACKBONES)}") from None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(defn: BackboneDef, weights: str, seed: int) -> dict[str, str]:
    """What identifies the weights *before* loading them (for plans and feature keys)."""
    import timm

    if weights == "random":
        # A seeded init is reproducible for a given torch/timm; both are part of its identity.
        return {"kind": "random", "digest": f"random-seed{seed}-torch{torch.__version__}-timm{timm.__version__}"}
    if weights == "hub":
        if defn.hub_tag is None:
            raise WeightsError(f"backbone '{defn.name}' has no published weights; use weights: random or a file")
        return {"kind": "hub", "digest": f"hub:{defn.timm_name}.{defn.hub_tag}"}
    path = Path(os.path.expandvars(weights)).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' not found (backbone '{defn.name}')")
    return {"kind": "file", "digest": "sha256:" + _sha256_file(path), "path": str(path)}


@dataclass
class LoadedBackbone:
    defn: BackboneDef
    model: torch.nn.Module
    weights: dict[str, str]  # kind, digest (+ path)
    n_params: int
    patch_size: int
    num_prefix_tokens: int  # CLS + registers
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path}: refused to load (only plain tensors are read, never pickled objects): {e}") from e
        for key in ("model", "state_dict", "teacher"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
        return sd
    raise WeightsError(f"{path}: unsupported weights format '{path.suffix}' (use .safetensors or .pth)")


def _check_qkv_bias(sd: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
    """The plain vit_*_dinov3 models have no q/v bias: official checkpoints with one would lose it."""
    has_param = any(k.endswith("q_bias") or k.endswith("qkv.bias") for k, _ in model.named_parameters())
    if has_param:
        return
    for k, v in sd.items():
        if k.endswith(("qkv.bias", "q_bias", "v_bias")) and v.abs().max() > 0:
            raise WeightsError(
                f"{path}: checkpoint has a non-zero attention bias ('{k}') but the architecture has none; "
                "loading it would drop the bias silently. Use the '_qkvb' variant of this backbone."
            )


def load_backbone(name: str, weights: str = "random", seed: int = 0) -> LoadedBackbone:
    import timm

    defn = get_backbone(name)
    ident = weights_identity(defn, weights, seed)
    kwargs = dict(defn.arch_overrides, num_classes=0)
    if ident["kind"] == "random":
        torch.manual_seed(seed)
        model = timm.create_model(defn.timm_name, pretrained=False, **kwargs)
    elif ident["kind"] == "hub":
        model = timm.create_model(f"{defn.timm_name}.{defn.hub_tag}", pretrained=True, **kwargs)
    else:
        path = Path(ident["path"])
        model = timm.create_model(defn.timm_name, pretrained=False, **kwargs)
        sd = _read_state_dict(path)
        filter_fn = getattr(timm.models.eva, "checkpoint_filter_fn", None)
        if filter_fn is not None and any(k.startswith("storage_tokens") or k.startswith("blocks.0.attn.qkv") for k in sd):
            sd = filter_fn(sd, model)
        _check_qkv_bias(sd, model, path)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise WeightsError(f"{path}: does not match {defn.arch_id}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    model.eval()
    cfg = model.pretrained_cfg
    patch = model.patch_embed.patch_size
    return LoadedBackbone(
        defn=defn,
        model=model,
        weights=ident,
        n_params=sum(p.numel() for p in model.parameters()),
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        num_prefix_tokens=int(model.num_prefix_tokens),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )
