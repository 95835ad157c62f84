"""Backbone registry: DINOv3 ViTs from timm, a ladder of small DINOv3-architecture models, and any
timm model by name (``timm:<architecture>[.<pretrained tag>]``, e.g. ``timm:vit_small_patch14_dinov2.lvd142m``
or ``timm:convnext_tiny``).

The demo ladder keeps timm's DINOv3 architecture (RoPE, 4 register tokens, layer scale) and only
reduces width and depth, so the whole pipeline is exercised exactly as with ViT-S/B/L, on a CPU, in
minutes. Parameter counts, token layout and GFLOPs are always measured from the model (on the meta
device: no memory, no weights), never typed in.

Weights never come from unpickling: local files are .safetensors or .pth read with
``torch.load(weights_only=True)``. Hub weights are resolved offline-first: the local Hugging Face
cache is looked at before the network, and an offline machine fails at once with what to do.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from dinoscale.digest import sha256_file

TIMM_PREFIX = "timm:"


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
        # demo ladder: DINOv3 arch, reduced width/depth, random weights only
        _dinov3(
            "dinov3-demo-xs", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=96, depth=3, num_heads=2
        ),
        _dinov3(
            "dinov3-demo-s", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=144, depth=4, num_heads=3
        ),
        _dinov3(
            "dinov3-demo-m", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=192, depth=6, num_heads=3
        ),
        _dinov3(
            "dinov3-demo-l", "vit_small_patch16_dinov3", "demo ladder, DINOv3 arch", embed_dim=256, depth=8, num_heads=4
        ),
        # other families, for comparison (patch 14; resolutions multiple of 16*14=224 keep both grids exact)
        BackboneDef("dinov2-vits14", "vit_small_patch14_dinov2", {}, "lvd142m", "DINOv2 ViT-S/14 (CLS, no registers)"),
        BackboneDef("dinov2-vitb14", "vit_base_patch14_dinov2", {}, "lvd142m", "DINOv2 ViT-B/14 (CLS, no registers)"),
        BackboneDef(
            "dinov2-vits14-reg", "vit_small_patch14_reg4_dinov2", {}, "lvd142m", "DINOv2 ViT-S/14 + 4 registers"
        ),
    ]
}


def backbone_names() -> list[str]:
    """The named registry entries (any ``timm:<architecture>`` is accepted as well, see ``is_backbone``)."""
    return list(BACKBONES)


def is_backbone(name: str) -> bool:
    try:
        get_backbone(name)
        return True
    except KeyError:
        return False


@functools.cache
def _timm_def(spec: str) -> BackboneDef:
    import timm

    arch, _, tag = spec.partition(".")
    if not timm.is_model(arch):
        import difflib

        hint = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise KeyError(f"unknown timm architecture '{arch}'" + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
    tags = [t.partition(".")[2] for t in timm.list_pretrained(arch + ".*")] or []
    if tag and tag not in tags:
        raise KeyError(f"timm architecture '{arch}' has no pretrained tag '{tag}'; known: {', '.join(tags) or 'none'}")
    return BackboneDef(TIMM_PREFIX + spec, arch, {}, tag or (tags[0] if tags else None), f"timm {spec}")


def get_backbone(name: str) -> BackboneDef:
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return _timm_def(name[len(TIMM_PREFIX) :])
    raise KeyError(f"unknown backbone '{name}'; known: {', '.join(BACKBONES)}, or timm:<architecture>[.<tag>]")


# ---------------------------------------------------------------- architecture facts (measured)


@dataclass(frozen=True)
class BackboneFacts:
    """What the plan and the trials log about a backbone, measured from the instantiated model."""

    name: str
    arch_id: str
    n_params: int
    patch_size: int  # ViTs: patch size; CNNs: output stride of the last stage
    embed_dim: int  # channels of the last block / stage
    has_cls: bool
    num_prefix_tokens: int  # CLS + registers (0 for CNNs / no-CLS ViTs)
    num_registers: int
    output: str  # 'tokens' ([B, prefix + patches, D]) or 'spatial' ([B, D, h, w])
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def normalisation(self) -> str:
        return f"mean={list(self.mean)},std={list(self.std)}"


def _create(defn: BackboneDef, tag: str | None = None, **kwargs) -> torch.nn.Module:
    import timm

    name = defn.timm_name + (f".{tag}" if tag else "")
    kw = dict(
        defn.arch_overrides, num_classes=0, **_extra_kwargs(defn.timm_name, tuple(sorted(defn.arch_overrides.items())))
    )
    kw.update(kwargs)
    return timm.create_model(name, **kw)


@functools.cache
def _extra_kwargs(timm_name: str, overrides: tuple) -> dict:
    """ViTs with a fixed input size (DINOv2: 518) are built with ``dynamic_img_size`` so that one
    model serves every sweep resolution (timm interpolates the position embedding)."""
    import timm

    with torch.device("meta"):
        m = timm.create_model(timm_name, pretrained=False, num_classes=0, **dict(overrides))
    return {"dynamic_img_size": True} if getattr(m, "dynamic_img_size", None) is False else {}


def _facts_of(model: torch.nn.Module, defn: BackboneDef) -> BackboneFacts:
    cfg = model.pretrained_cfg
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "patch_size"):
        p = pe.patch_size
        patch, output = int(p[0] if isinstance(p, (tuple, list)) else p), "tokens"
    else:
        patch, output = int(model.feature_info[-1]["reduction"]), "spatial"
    has_cls = getattr(model, "cls_token", None) is not None
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if output == "tokens" else 0
    return BackboneFacts(
        name=defn.name,
        arch_id=defn.arch_id,
        n_params=sum(p.numel() for p in model.parameters()),
        patch_size=patch,
        embed_dim=int(model.num_features),
        has_cls=has_cls,
        num_prefix_tokens=prefix,
        num_registers=prefix - int(has_cls),
        output=output,
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
    )


@functools.cache
def backbone_facts(name: str, hub: bool = False) -> BackboneFacts:
    """Parameter count, patch size, token layout and normalisation, measured on the meta device.

    ``hub=True``: the normalisation of the registry's pretrained tag (e.g. DINOv3 ``sat493m`` has its own).
    """
    defn = get_backbone(name)
    with torch.device("meta"):
        model = _create(defn, defn.hub_tag if hub else None, pretrained=False)
    return _facts_of(model, defn)


@functools.cache
def gflops_per_image(name: str, resolution: int) -> float:
    """Forward-pass GFLOPs of one ``resolution``x``resolution`` image through ``forward_features``,
    counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (1 multiply-add = 2 FLOPs;
    matmuls, convolutions and scaled-dot-product attention included, element-wise ops not)."""
    from torch.utils.flop_counter import FlopCounterMode

    defn = get_backbone(name)
    with torch.device("meta"):
        model = _create(defn, pretrained=False).eval()
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(x)
    return counter.get_total_flops() / 1e9


# ---------------------------------------------------------------- weights


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
    return {"kind": "file", "digest": "sha256:" + sha256_file(path), "path": str(path)}


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_weights_file(defn: BackboneDef) -> Path:
    """The local file of a backbone's hub weights: the HF cache first, the network only when allowed
    and reachable. Offline or unreachable fails at once (not after timm's ~47 s of retries).
    The token comes from ``HF_TOKEN`` and is never logged or put in an error message."""
    import timm

    if defn.hub_tag is None:
        raise WeightsError(f"backbone '{defn.name}' has no published weights; use weights: random or a file")
    cfg = timm.models.get_pretrained_cfg(f"{defn.timm_name}.{defn.hub_tag}")
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise WeightsError(
            f"{defn.name}: timm tag '{defn.hub_tag}' is not on the Hugging Face hub; download it and give the file"
        )
    names = [n for n in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin") if n]
    cache = hf_cache_dir()
    from huggingface_hub import try_to_load_from_cache

    for n in names:
        hit = try_to_load_from_cache(repo, n, cache_dir=str(cache))
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    what = f"weights for '{defn.name}' (hub repo {repo}) are not in the local Hugging Face cache {cache}"
    todo = (
        f"download them on a connected machine (`hf download {repo} model.safetensors`) into that cache, "
        "or give the file as weights: /path/model.safetensors"
    )
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        raise WeightsError(f"{what} and HF_HUB_OFFLINE is set; {todo}")
    if not _hub_reachable():
        raise WeightsError(
            f"{what} and the hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) cannot be reached; {todo}"
        )
    from huggingface_hub import hf_hub_download

    token = os.environ.get("HF_TOKEN") or None
    last: Exception | None = None
    for n in names:
        try:
            return Path(hf_hub_download(repo, n, cache_dir=str(cache), token=token, etag_timeout=5))
        except Exception as e:  # noqa: BLE001 - try the next file name, report the last error
            last = e
    raise WeightsError(f"{what} and downloading failed ({type(last).__name__}); {todo}")


@dataclass
class LoadedBackbone:
    defn: BackboneDef
    model: torch.nn.Module
    weights: dict[str, str]  # kind, digest (+ path, sha256 of the file read)
    n_params: int
    patch_size: int
    num_prefix_tokens: int  # CLS + registers
    mean: tuple[float, ...]
    std: tuple[float, ...]
    facts: BackboneFacts | None = None

    @property
    def has_cls(self) -> bool:
        return self.facts.has_cls if self.facts else True


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(
                f"{path}: refused to load (only plain tensors are read, never pickled objects): {e}"
            ) from e
        for key in ("model", "state_dict", "teacher"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WeightsError(f"{path}: not a state dict of tensors")
        return sd
    raise WeightsError(f"{path}: unsupported weights format '{path.suffix}' (use .safetensors or .pth)")


def _check_qkv_bias(sd: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
    """The plain vit_*_dinov3 models have no q/v bias: official checkpoints with one would lose it.
    Checked on the raw state dict, before timm's converter (which skips such a bias silently)."""
    has_param = any(k.endswith(("q_bias", "qkv.bias")) for k, _ in model.named_parameters())
    if has_param:
        return
    for k, v in sd.items():
        if k.endswith(("qkv.bias", "q_bias", "v_bias")) and v.abs().max() > 0:
            raise WeightsError(
                f"{path}: checkpoint has a non-zero attention bias ('{k}') but the architecture has none; "
                "loading it would drop the bias silently. Use the '_qkvb' variant of this backbone."
            )


def _load_file_into(model: torch.nn.Module, defn: BackboneDef, path: Path) -> None:
    """timm-format or official (e.g. DINOv3 ``storage_tokens``/``ls1.gamma``) state dicts; the model's own
    timm converter renames official keys. Any missing or unexpected key is an error."""
    sd = _read_state_dict(path)
    _check_qkv_bias(sd, model, path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # timm prints when it skips an all-zero bias
            sd = filter_fn(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: does not match {defn.arch_id}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )


def load_backbone(name: str, weights: str = "random", seed: int = 0) -> LoadedBackbone:
    defn = get_backbone(name)
    ident = weights_identity(defn, weights, seed)
    if ident["kind"] == "random":
        torch.manual_seed(seed)
        model = _create(defn, pretrained=False)
    elif ident["kind"] == "hub":
        path = hub_weights_file(defn)
        model = _create(defn, defn.hub_tag, pretrained=False)
        _load_file_into(model, defn, path)
        ident = dict(ident, path=str(path), sha256=sha256_file(path))
    else:
        path = Path(ident["path"])
        model = _create(defn, pretrained=False)
        _load_file_into(model, defn, path)
    model.eval()
    facts = _facts_of(model, defn)
    return LoadedBackbone(
        defn=defn,
        model=model,
        weights=ident,
        n_params=facts.n_params,
        patch_size=facts.patch_size,
        num_prefix_tokens=facts.num_prefix_tokens,
        mean=facts.mean,
        std=facts.std,
        facts=facts,
    )
