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
import difflib
import functools
import importlib.metadata
import importlib.util
import io
import os
import pickle
import re
import socket
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from safetensors.torch import load_file

from dinoscale.digest import sha256_file
from dinoscale.errors import UserError
from dinoscale.models import families

TIMM_PREFIX = "timm:"


class WeightsError(UserError, RuntimeError):
    """Weights that cannot be used: the message names the backbone or file and what did not match."""

    kind = "weights"


@dataclass(frozen=True)
class BackboneDef:
    name: str
    timm_name: str  # timm architecture; for other loaders, the model class / name (families.Size.arch)
    arch_overrides: dict = field(default_factory=dict)
    hub_tag: str | None = None  # timm pretrained tag; None: no published weights through timm's own repos
    description: str = ""
    family: str = ""  # dinoscale.models.families (empty: a timm:<name> outside every family)
    loader: str = families.TIMM
    hf_repo: str | None = None  # the family's own Hub repo (loaders other than timm)
    hf_file: str | None = None  # its weights file there, when the family states it (looked for first)
    mean: tuple[float, ...] | None = None  # declared by the family; None: timm's pretrained_cfg
    std: tuple[float, ...] | None = None
    gated: bool = False

    @property
    def arch_id(self) -> str:
        """Everything that defines the architecture (part of the feature-store key)."""
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.arch_overrides.items()))
        return self.timm_name + (f"[{extra}]" if extra else "")

    @property
    def has_weights(self) -> bool:
        return self.hub_tag is not None or self.hf_repo is not None


def _from_family(f: families.Family, s: families.Size) -> BackboneDef:
    declared = f.loader != families.TIMM  # timm's own pretrained_cfg states mean / std for timm-tag families
    return BackboneDef(
        name=s.backbone,
        timm_name=s.arch,
        arch_overrides=families.config_overrides(s),
        hub_tag=None if s.demo or f.loader != families.TIMM else s.tag,
        description=f"{f.title}, size {s.key}",
        family=f.name,
        loader=f.loader,
        hf_repo=None if s.demo else s.hf_repo,
        hf_file=s.hf_file,
        mean=tuple(f.mean) if declared else None,
        std=tuple(f.std) if declared else None,
        gated=f.gated and s.hf_repo is not None and not s.demo,  # the family's own repo is the gated one
    )


# Every size of every family (families.py), by its registry name.
BACKBONES: dict[str, BackboneDef] = {s.backbone: _from_family(f, s) for f in families.FAMILIES for s in f.sizes}


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
        hint = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise KeyError(f"unknown timm architecture '{arch}'" + (f" (did you mean {', '.join(hint)}?)" if hint else ""))
    tags = [t.partition(".")[2] for t in timm.list_pretrained(arch + ".*")] or []
    if tag and tag not in tags:
        raise KeyError(f"timm architecture '{arch}' has no pretrained tag '{tag}'; known: {', '.join(tags) or 'none'}")
    return BackboneDef(
        TIMM_PREFIX + spec,
        arch,
        {},
        tag or (tags[0] if tags else None),
        f"timm {spec}",
        family=families.family_of(TIMM_PREFIX + spec),
    )


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
    # timm ViT blocks (``blocks.<i>.attn.qkv`` and ``.mlp``, also inside a family's wrapper): what LoRA's targets
    # and the full strategy's layer-wise decay are written for
    vit_blocks: bool = False

    @property
    def normalisation(self) -> str:
        return f"mean={list(self.mean)},std={list(self.std)}"


def _create(defn: BackboneDef, tag: str | None = None, **kwargs) -> torch.nn.Module:
    """The model of a backbone, built by its family's loader from the architecture alone (weights are read
    into it afterwards, from a file: ``_load_file_into``). A loader whose package is missing is a user error
    naming the package and its install command."""
    require_loader(defn)
    if defn.loader == families.TRANSFORMERS:
        return _create_transformers(defn, **kwargs)
    if defn.loader == families.MONAI:
        from dinoscale.models.volume import VolumeEncoder  # imports MONAI (~10 s): only for 3D families

        return VolumeEncoder(defn.name, defn.arch_overrides, defn.mean, defn.std)
    if defn.loader == families.OPEN_CLIP or defn.family in _PACKAGE_BUILDERS:
        from dinoscale.models import clip  # imports timm only; each builder imports its own package

        builder = (
            clip.build_open_clip if defn.loader == families.OPEN_CLIP else getattr(clip, _PACKAGE_BUILDERS[defn.family])
        )
        return builder(defn.arch_overrides, defn.mean, defn.std)
    if defn.loader not in (families.TIMM, families.TIMM_HUB):
        raise WeightsError(
            f"backbone '{defn.name}' (family {defn.family}) loads through {defn.loader}; dinoscale declares it "
            "(`dinoscale backbones`, `dinoscale weights`) but does not build it yet"
        )
    import timm

    name = defn.timm_name + (f".{tag}" if tag else "")
    overrides = _timm_kwargs(defn.arch_overrides)
    kw = dict(overrides, num_classes=0, **_extra_kwargs(defn.timm_name, tuple(sorted(defn.arch_overrides.items()))))
    kw.update(kwargs)
    return timm.create_model(name, **kw)


# loader 'package' families dinoscale builds: family -> builder in dinoscale.models.clip
_PACKAGE_BUILDERS = {"conch": "build_conch"}


def _timm_kwargs(overrides: dict) -> dict:
    """Architecture kwargs as data (families.py) to what timm takes: named layers to their classes."""
    from timm.layers import SwiGLUPacked

    layers = {"swiglu_packed": SwiGLUPacked}
    return {k: layers.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}


def _create_transformers(defn: BackboneDef, **kwargs) -> torch.nn.Module:
    from dinoscale.models.hf import TransformersEncoder  # imports transformers: only for these families

    kwargs.pop("pretrained", None)
    config_class = families.TRANSFORMERS_CONFIGS[defn.timm_name]
    return TransformersEncoder(defn.timm_name, config_class, defn.arch_overrides, defn.mean, defn.std)


def require_loader(defn: BackboneDef) -> None:
    """The package a backbone's loader needs is importable, else a ``WeightsError`` naming it and how to
    install it (found without importing it)."""

    fam = families.find_family(defn.family)
    needs = fam.requires if fam is not None else families.PACKAGES[defn.loader]
    module, install = needs
    if importlib.util.find_spec(module) is None:
        raise WeightsError(
            f"backbone '{defn.name}' (family {defn.family}) needs the Python package '{module}', which is not "
            f"installed; install it with `{install}`"
        )


@functools.cache
def _extra_kwargs(timm_name: str, overrides: tuple) -> dict:
    """ViTs with a fixed input size (DINOv2: 518) are built with ``dynamic_img_size`` so that one
    model serves every sweep resolution (timm interpolates the position embedding)."""
    import timm

    if not timm.is_model(timm_name):  # other loaders: their wrappers take any size already
        return {}
    with torch.device("meta"):
        m = timm.create_model(timm_name, pretrained=False, num_classes=0, **_timm_kwargs(dict(overrides)))
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
        mean=defn.mean or tuple(float(v) for v in cfg.get("mean", families.IMAGENET_MEAN)),
        std=defn.std or tuple(float(v) for v in cfg.get("std", families.IMAGENET_STD)),
        vit_blocks=_has_vit_blocks(model),
    )


def _has_vit_blocks(model: torch.nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    first = blocks[0] if isinstance(blocks, (torch.nn.Sequential, torch.nn.ModuleList)) and len(blocks) else None
    return first is not None and hasattr(getattr(first, "attn", None), "qkv") and hasattr(first, "mlp")


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


LOCAL_DIR = "local-dir:"  # weights: local-dir:/folder (as timm names it): the folder's weights file
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def weights_identity(defn: BackboneDef, weights: str, seed: int) -> dict[str, str]:
    """What identifies the weights *before* loading them (for plans and feature keys)."""
    import timm

    if weights == "random":
        # A seeded init is reproducible for a given torch/timm (/transformers); they are part of its identity.
        libs = f"torch{torch.__version__}-timm{timm.__version__}"
        if defn.loader in (families.TRANSFORMERS, families.OPEN_CLIP, families.PACKAGE, families.MONAI):
            libs += f"-{_loader_version(defn)}"
        return {"kind": "random", "digest": f"random-seed{seed}-{libs}"}
    if weights == "hub":
        if not defn.has_weights:
            raise WeightsError(f"backbone '{defn.name}' has no published weights; use weights: random or a file")
        if defn.hf_repo:
            return {"kind": "hub", "digest": f"hub:{defn.hf_repo}"}
        return {"kind": "hub", "digest": f"hub:{defn.timm_name}.{defn.hub_tag}"}
    path = local_weights_file(weights)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' not found (backbone '{defn.name}')")
    return {"kind": "file", "digest": "sha256:" + sha256_file(path), "path": str(path)}


def _loader_version(defn: BackboneDef) -> str:
    """The loader package and its installed version (part of a seeded init's identity)."""
    fam = families.find_family(defn.family)
    module = (fam.requires if fam is not None else families.PACKAGES[defn.loader])[0]
    try:
        return f"{module}{version(module)}"
    except importlib.metadata.PackageNotFoundError:  # import name != distribution name (open_clip_torch)
        return f"{module}{version(_distributions().get(module, [module])[0])}"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: ~1 s, once


def local_weights_file(weights: str) -> Path:
    """A weights file given in a spec: a path, or ``local-dir:<folder>`` (its model.safetensors,
    pytorch_model.bin or open_clip_pytorch_model.bin, the first found)."""
    if weights.startswith(LOCAL_DIR):
        folder = Path(os.path.expandvars(weights[len(LOCAL_DIR) :])).expanduser()
        found = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
        return found[0] if found else folder / WEIGHT_FILES[0]
    return Path(os.path.expandvars(weights)).expanduser()


def hub_source(defn: BackboneDef) -> tuple[str, list[str]]:
    """The Hub repo of a backbone's published weights and the file names looked for in it."""
    import timm

    if not defn.has_weights:
        raise WeightsError(f"backbone '{defn.name}' has no published weights; use weights: random or a file")
    if defn.hf_repo:
        first = [defn.hf_file] if defn.hf_file else []
        return defn.hf_repo, first + [n for n in WEIGHT_FILES if n not in first]
    cfg = timm.models.get_pretrained_cfg(f"{defn.timm_name}.{defn.hub_tag}")
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise WeightsError(
            f"{defn.name}: timm tag '{defn.hub_tag}' is not on the Hugging Face hub; download it and give the file"
        )
    return repo, [n for n in (getattr(cfg, "hf_hub_filename", None), *WEIGHT_FILES[:2]) if n]


def cached_hub_file(defn: BackboneDef) -> Path | None:
    """The backbone's hub weights in the local Hugging Face cache (the cache's own layout:
    models--org--name/snapshots/<rev>/<file>, found through refs/main), or None. Never the network."""

    repo, names = hub_source(defn)
    for n in names:
        hit = try_to_load_from_cache(repo, n, cache_dir=str(hf_cache_dir()))
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def download_command(defn: BackboneDef) -> str:
    """How to put a backbone's hub weights into the cache, on a connected machine."""
    repo, names = hub_source(defn)
    gate = f" (gated: accept the licence at https://huggingface.co/{repo} first and set HF_TOKEN)" if defn.gated else ""
    return f"hf download {repo} {names[0]}{gate}"


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: the hub is not asked, only its cache."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


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


def hub_weights_file(defn: BackboneDef, download: bool = True) -> Path | None:
    """The local file of a backbone's hub weights: the HF cache first, the network only when allowed
    and reachable. Offline or unreachable fails at once (not after timm's ~47 s of retries).
    The token comes from ``HF_TOKEN`` and is never logged or put in an error message.
    ``download=False`` (pre-flight): None when the file is not cached but the hub is reachable."""
    repo, names = hub_source(defn)
    hit = cached_hub_file(defn)
    if hit is not None:
        return hit
    cache = hf_cache_dir()
    what = f"weights for '{defn.name}' (hub repo {repo}) are not in the local Hugging Face cache {cache}"
    todo = (
        f"download them on a connected machine (`{download_command(defn)}`) into that cache, "
        "or give the file as weights: /path/model.safetensors"
    )
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        raise WeightsError(f"{what} and HF_HUB_OFFLINE is set; {todo}")
    if not _hub_reachable():
        raise WeightsError(
            f"{what} and the hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) cannot be reached; {todo}"
        )
    if not download:
        return None

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


def _read_state_dict(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A file's tensors by name, never unpickling objects. ``mmap``: tensors stay on disk until touched
    (pre-flight checks names and shapes without reading a multi-GB file into memory)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
            raise WeightsError(f"{path}: not a readable .safetensors file ({_first_line(e)})") from e
    if path.suffix in (".pth", ".pt", ".bin"):
        sd = _torch_load_tensors(path, mmap)
        for key in ("model", "state_dict", "teacher"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise WeightsError(
                f"{path}: not a state dict of tensors (found {type(sd).__name__}); save model.state_dict(), "
                "ideally as .safetensors"
            )
        return sd
    raise WeightsError(f"{path}: unsupported weights format '{path.suffix}' (use .safetensors or .pth)")


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _torch_load_tensors(path: Path, mmap: bool):
    """``torch.load(weights_only=True)``: plain tensors and containers only, nothing in the file is run.
    A checkpoint that pickles Python objects (a class, numpy arrays, argparse options) is refused, with
    the object named and how to convert the file."""

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # an old (non-zip) checkpoint cannot be memory-mapped: read it
            return _torch_load_tensors(path, mmap=False)
        raise WeightsError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from e
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:  # torch's first lines are generic advice; the unpickler's complaint follows them
            tail = str(e).split("WeightsUnpickler error:", 1)[-1]
            detail = next((x.strip() for x in tail.splitlines() if x.strip()), type(e).__name__)
            raise WeightsError(f"{path}: not a PyTorch checkpoint of tensors (torch.load: {detail[:300]})") from e
        raise WeightsError(
            f"{path}: refused: the file pickles a Python object ({found.group(1)}), and dinoscale reads only "
            "tensors (torch.load with weights_only=True; nothing in the file was run). If you trust its source, "
            "convert it once: load it with torch.load(..., weights_only=False), take the model's state dict and "
            "save it with safetensors.torch.save_file(state_dict, 'model.safetensors'); give that file as weights"
        ) from e
    except Exception as e:  # noqa: BLE001 - zip / EOF / OS errors of a damaged file
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from e


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


def _load_file_into(model: torch.nn.Module, defn: BackboneDef, path: Path, mmap: bool = False) -> None:
    """timm-format or official (e.g. DINOv3 ``storage_tokens``/``ls1.gamma``) state dicts; the model's own
    timm converter renames official keys. Any missing or unexpected key, or a shape that differs, is an
    error naming the file and what did not match. ``mmap`` with a model on the meta device (pre-flight):
    the file's tensors are assigned, not copied, so nothing large is read."""
    sd = _read_state_dict(path, mmap=mmap)
    _check_qkv_bias(sd, model, path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # timm prints when it skips an all-zero bias
                sd = filter_fn(sd, model)
        except Exception as e:  # noqa: BLE001 - timm's converter fails on a checkpoint of another family
            raise WeightsError(
                f"{path}: timm's converter for {defn.arch_id} cannot read it ({_first_line(e)}); "
                f"is it a checkpoint of backbone '{defn.name}'?"
            ) from e
    problem = _mismatch(model.state_dict(), sd)
    if problem:
        raise WeightsError(
            f"{path}: does not fit backbone '{defn.name}' ({defn.arch_id}): {problem}. Check that the file is a "
            f"checkpoint of this architecture and size (see `dinoscale backbones`)"
        )
    model.load_state_dict(sd, strict=False, assign=mmap)


def _mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], show: int = 3) -> str:
    """What differs between a model's state dict and a file's: shapes, missing and unexpected keys."""
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in sd and not k.startswith("head")]
    unexpected = [k for k in sd if k not in own]
    parts = []
    if shapes:
        eg = "; ".join(f"{k} {list(sd[k].shape)} in the file, {list(own[k].shape)} in the model" for k in shapes[:show])
        parts.append(f"{len(shapes)} tensor(s) of another shape (e.g. {eg})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:show])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:show])})")
    return ", ".join(parts)


def check_weights(name: str, weights: str) -> str:
    """Pre-flight: the weights resolve and fit the architecture, without building the model in memory
    (it is built on the meta device and the file memory-mapped). Returns what was checked; raises
    ``WeightsError`` naming the file and what did not match. Random weights need no check."""
    defn = get_backbone(name)
    ident = weights_identity(defn, weights, 0)
    if ident["kind"] == "random":
        return "random init"
    if ident["kind"] == "hub":
        path = hub_weights_file(defn, download=False)
        if path is None:
            return "hub weights not cached; the extraction downloads them"
        tag = defn.hub_tag
    else:
        path, tag = Path(ident["path"]), None
    with torch.device("meta"):
        model = _create(defn, tag, pretrained=False)
    _load_file_into(model, defn, path, mmap=True)
    return f"{path.name} fits {defn.arch_id}"


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


# ---------------------------------------------------------------- what a spec needs (dinoscale weights)


@dataclass(frozen=True)
class WeightsNeed:
    """One backbone's weights as a spec asks for them: where they are looked for, whether they are there
    (looked up without the network), and what to do when they are not."""

    backbone: str
    weights: str
    family: str
    where: str
    found: bool
    todo: str = ""


def weights_need(name: str, weights: str) -> WeightsNeed:
    defn = get_backbone(name)
    try:
        require_loader(defn)
    except WeightsError as e:
        return WeightsNeed(name, weights, defn.family, f"loader {defn.loader}", False, str(e).split("; ", 1)[-1])
    if weights == "random":
        return WeightsNeed(name, weights, defn.family, "seeded random init (no file)", True)
    if weights == "hub":
        repo, names = hub_source(defn)
        cache = hf_cache_dir()
        where = f"{cache}/models--{repo.replace('/', '--')} ({' | '.join(names)})"
        if _truthy(os.environ.get("HF_HUB_OFFLINE")):
            where += "; HF_HUB_OFFLINE: the cache only"
        hit = cached_hub_file(defn)
        return WeightsNeed(
            name, weights, defn.family, str(hit) if hit else where, hit is not None, download_command(defn)
        )
    path = local_weights_file(weights)
    todo = "copy the file there" + (f" (from the hub: `{download_command(defn)}`)" if defn.has_weights else "")
    return WeightsNeed(name, weights, defn.family, str(path), path.is_file(), todo)


def missing_weights_error(needs: list[WeightsNeed]) -> WeightsError | None:
    """One error naming every missing item and what fetches it (None when nothing is missing)."""
    missing = [n for n in needs if not n.found]
    if not missing:
        return None
    lines = [f"{len(missing)} of {len(needs)} backbone weight set(s) are missing on this machine:"]
    lines += [f"  - {n.backbone} (weights: {n.weights}) looked for at {n.where}: {n.todo}" for n in missing]
    lines.append("fetch them on a connected machine into the same places (or set HF_HOME / HF_HUB_CACHE), then rerun")
    return WeightsError("\n".join(lines))
