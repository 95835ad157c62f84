"""Encoder families: the encoders a medical team would compare DINOv3 with, declared as data.

A family is one line of a comparison table (DINOv3, RAD-DINO, UNI, ...): how its models are loaded (timm,
timm ``hf-hub:``, Hugging Face transformers, open_clip, or a package of its own), the sizes it comes in (each a
named backbone of ``dinoscale.models.backbones``), its own preprocessing (mean / std and native input side, which
go into the feature recipe through the backbone's facts), its token layout and pooling (what upstream
evaluates with and what the protocol uses), its licence and gating, and where its weights are found offline.

What is declared here about a model's shape (width, patch size, prefix tokens) is a *claim*: the sweep always
uses what is measured from the model itself (``backbones.backbone_facts``), and ``tests/test_families.py``
builds every buildable size with random weights and checks the claim against the measurement.

``source`` names where each family's loader / preprocessing / pooling facts come from (model cards and the
loaders' own configs, as read when the entry was written); they are not fetched at run time.

A leaf: imports nothing of dinoscale (``backbones.py`` turns the sizes into registry entries).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

# How a family's models are built and its weights read.
TIMM = "timm"  # timm architecture + a timm pretrained tag (weights from the timm/ repos of the Hub)
TIMM_HUB = "timm hf-hub"  # timm architecture with the family's kwargs; weights from the family's own Hub repo
TRANSFORMERS = "transformers"  # a Hugging Face transformers vision model (AutoModel class + config)
OPEN_CLIP = "open_clip"  # open_clip
PACKAGE = "package"  # the family's own package
MONAI = "monai"  # a MONAI network class (3D CT encoders)
LOADERS = (TIMM, TIMM_HUB, TRANSFORMERS, OPEN_CLIP, PACKAGE, MONAI)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The import name of each loader's package and how to install it.
PACKAGES = {
    TIMM: ("timm", "pip install timm"),
    TIMM_HUB: ("timm", "pip install timm"),
    TRANSFORMERS: ("transformers", "pip install transformers"),
    OPEN_CLIP: ("open_clip", "pip install open_clip_torch"),
    MONAI: ("monai", "pip install monai"),
}


@dataclass(frozen=True)
class Size:
    """One model of a family. ``width`` / ``patch`` / ``prefix`` are the declared layout (checked by a test
    against the measured one): token width, patch side (CNNs: output stride), CLS + register tokens."""

    key: str  # how a spec names it: encoders: [{family: dinov3, sizes: [s, b]}]
    backbone: str  # its name in the backbone registry (``dinoscale backbones``)
    arch: str  # timm architecture; transformers model class; open_clip / package model name
    width: int
    patch: int
    prefix: int
    tag: str | None = None  # timm pretrained tag (loader timm)
    hf_repo: str | None = None  # the Hub repo of its weights (loaders other than timm)
    hf_file: str | None = None  # the weights file in that repo, where known (the download command names it)
    overrides: tuple[tuple[str, object], ...] = ()  # architecture kwargs (timm) or config kwargs (transformers)
    demo: bool = False  # a reduced model for CPU demos: random weights only, never a result


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    domain: str  # general | radiology | pathology | ct | demo
    loader: str  # LOADERS
    sizes: tuple[Size, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_resolution: int  # the side it was trained / evaluated at
    tokens: str  # its token layout, in words
    pooling_upstream: str  # what its authors evaluate with
    pooling_protocol: str  # the token set this protocol uses for it (features.tokens)
    licence: str
    gated: bool  # the Hub asks for an accepted licence (and HF_TOKEN) before a download
    source: str  # where the facts above come from
    package: tuple[str, str] | None = None  # (import name, install command) for loader PACKAGE
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())
    spatial_dims: int = 2  # 3: a volume encoder, which dinoscale's 2D / slice extraction cannot feed yet

    @property
    def requires(self) -> tuple[str, str]:
        """(import name, install command) of the package its loader needs."""
        return self.package or PACKAGES[self.loader]

    @property
    def size_keys(self) -> list[str]:
        return [s.key for s in self.sizes]

    def size(self, key: str) -> Size:
        for s in self.sizes:
            if s.key == key:
                return s
        raise KeyError(f"family '{self.name}' has no size '{key}'; its sizes: {', '.join(self.size_keys)}")


def _dinov3_vit(key, arch, width) -> Size:
    name = f"dinov3-vit{key[0]}16" + ("plus" if key.endswith("+") else "")  # s+ -> dinov3-vits16plus
    return Size(key, name, arch, width, 16, 5, tag="lvd1689m")


def _demo(key, family, arch, width, patch, prefix, depth, heads) -> Size:
    overrides = (("embed_dim", width), ("depth", depth), ("num_heads", heads))
    return Size(key, f"{family}-{key}", arch, width, patch, prefix, overrides=overrides, demo=True)


_DINOV3_LAYOUT = "CLS + 4 registers + patches (row-major), final norm applied"
_CLS_MEAN = "cls_mean_patch"

FAMILIES: tuple[Family, ...] = (
    Family(
        "dinov3",
        "DINOv3 ViT",
        "general",
        TIMM,
        (
            _dinov3_vit("s", "vit_small_patch16_dinov3", 384),
            _dinov3_vit("s+", "vit_small_plus_patch16_dinov3", 384),
            _dinov3_vit("b", "vit_base_patch16_dinov3", 768),
            _dinov3_vit("l", "vit_large_patch16_dinov3", 1024),
            _dinov3_vit("h+", "vit_huge_plus_patch16_dinov3", 1280),
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        _DINOV3_LAYOUT,
        "CLS (linear probes on the CLS token, optionally with the mean patch token); timm's classifier head "
        "averages patch tokens instead (timm #2681) - dinoscale reads forward_features, never timm's head",
        _CLS_MEAN,
        "DINOv3 License (custom, commercial use allowed with conditions)",
        True,  # the facebook/dinov3-* repos ask for the licence; the timm/ copies are read here
        "timm 1.0.31 pretrained_cfg (vit_*_dinov3.lvd1689m: mean/std ImageNet); facebookresearch/dinov3 README "
        "(linear evaluation on CLS); sat493m weights use their own mean/std (not declared here)",
        aliases=("dinov3-vit",),
    ),
    Family(
        "dinov3-convnext",
        "DINOv3 ConvNeXt (distilled)",
        "general",
        TIMM,
        tuple(
            Size(k, f"dinov3-convnext-{k}", f"convnext_{n}", w, 32, 0, tag="dinov3_lvd1689m")
            for k, n, w in (("t", "tiny", 768), ("s", "small", 768), ("b", "base", 1024), ("l", "large", 1536))
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "feature map [D, H/32, W/32]; no CLS, no registers",
        "global average pool of the last stage",
        "mean_patch",
        "DINOv3 License",
        True,
        "timm 1.0.31 pretrained_cfg convnext_*.dinov3_lvd1689m",
    ),
    Family(
        "dinov2",
        "DINOv2 ViT (no registers)",
        "general",
        TIMM,
        tuple(
            Size(k, f"dinov2-vit{k}14", f"vit_{n}_patch14_dinov2", w, 14, 1, tag="lvd142m")
            for k, n, w in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536))
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        518,
        "CLS + patches (patch 14), final norm applied",
        "CLS for the hub model's output; linear evaluation on CLS (of the last 1 or 4 blocks) + mean patch token",
        _CLS_MEAN,
        "Apache-2.0",
        False,
        "timm 1.0.31 pretrained_cfg vit_*_patch14_dinov2.lvd142m (518 px, ImageNet mean/std); "
        "facebookresearch/dinov2 linear eval (n_last_blocks, avgpool)",
    ),
    Family(
        "dinov2-reg",
        "DINOv2 ViT with 4 registers",
        "general",
        TIMM,
        tuple(
            Size(k, f"dinov2-vit{k}14-reg", f"vit_{n}_patch14_reg4_dinov2", w, 14, 5, tag="lvd142m")
            for k, n, w in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024), ("g", "giant", 1536))
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        518,
        "CLS + 4 registers + patches (patch 14)",
        "CLS (as DINOv2)",
        _CLS_MEAN,
        "Apache-2.0",
        False,
        "timm 1.0.31 pretrained_cfg vit_*_patch14_reg4_dinov2.lvd142m; 'Vision Transformers Need Registers'",
    ),
    Family(
        "rad-dino",
        "RAD-DINO (chest X-ray DINOv2)",
        "radiology",
        TRANSFORMERS,
        (
            Size(
                "b",
                "rad-dino",
                "Dinov2Model",
                768,
                14,
                1,
                hf_repo="microsoft/rad-dino",
                overrides=(("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12)),
                # patch_size / image_size: see _TRANSFORMERS_COMMON below
            ),
        ),
        (0.5307, 0.5307, 0.5307),
        (0.2583, 0.2583, 0.2583),
        518,
        "CLS + patches (Dinov2Model last_hidden_state, layernorm applied)",
        "CLS (pooler_output) for classification; patch tokens for dense tasks",
        _CLS_MEAN,
        "MSRLA (Microsoft Research Licence Agreement, research use)",
        False,
        "huggingface.co/microsoft/rad-dino model card and preprocessor_config.json (mean 0.5307, std 0.2583, "
        "518 px crop)",
    ),
    Family(
        "biomedclip",
        "BiomedCLIP (PMC-15M CLIP, ViT-B/16)",
        "radiology",
        OPEN_CLIP,
        (
            Size(
                "b",
                "biomedclip",
                "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                768,
                16,
                1,
                hf_repo="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                hf_file="open_clip_pytorch_model.bin",
                # its open_clip_config.json: embed_dim + vision_cfg (the text tower is never built)
                overrides=(
                    ("embed_dim", 512),
                    ("timm_model_name", "vit_base_patch16_224"),
                    ("timm_pool", ""),
                    ("timm_proj", "linear"),
                    ("image_size", 224),
                ),
            ),
        ),
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        224,
        "timm ViT-B/16 trunk: CLS + patches",
        "CLS projected to 512-d (encode_image)",
        "cls",
        "MIT",
        False,
        "huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 open_clip_config.json",
    ),
    Family(
        "medsiglip",
        "MedSigLIP (SigLIP-400M vision, 448 px)",
        "radiology",
        TRANSFORMERS,
        (
            Size(
                "so400m",
                "medsiglip-448",
                "SiglipVisionModel",
                1152,
                14,
                0,
                hf_repo="google/medsiglip-448",
                overrides=(
                    ("hidden_size", 1152),
                    ("intermediate_size", 4304),
                    ("num_hidden_layers", 27),
                    ("num_attention_heads", 16),
                    ("patch_size", 14),
                    ("image_size", 448),
                ),
            ),
        ),
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        448,
        "patches only (no CLS); a MAP attention-pooling head makes the embedding",
        "MAP-head pooled embedding (pooler_output)",
        "mean_patch",
        "Health AI Developer Foundations terms of use",
        True,
        "huggingface.co/google/medsiglip-448 model card and config (SigLIP so400m, 448 px, mean/std 0.5)",
        notes="the MAP head is not used: the protocol reads the patch tokens",
    ),
    Family(
        "uni",
        "UNI / UNI2-h (pathology)",
        "pathology",
        TIMM_HUB,
        (
            Size(
                "l",
                "uni",
                "vit_large_patch16_224",
                1024,
                16,
                1,
                hf_repo="MahmoodLab/UNI",
                overrides=(("img_size", 224), ("init_values", 1e-5)),
            ),
            Size(
                "h",
                "uni2-h",
                "vit_giant_patch14_224",
                1536,
                14,
                9,
                hf_repo="MahmoodLab/UNI2-h",
                overrides=(
                    ("img_size", 224),
                    ("patch_size", 14),
                    ("depth", 24),
                    ("num_heads", 24),
                    ("init_values", 1e-5),
                    ("embed_dim", 1536),
                    ("mlp_ratio", 2.66667 * 2),
                    ("no_embed_class", True),
                    ("mlp_layer", "swiglu_packed"),
                    ("act_layer", "silu"),
                    ("reg_tokens", 8),
                ),
            ),
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "UNI: CLS + patches (patch 16); UNI2-h: CLS + 8 registers + patches (patch 14)",
        "CLS (timm num_classes=0 output)",
        "cls",
        "CC-BY-NC-ND-4.0",
        True,
        "huggingface.co/MahmoodLab/UNI and MahmoodLab/UNI2-h model cards (timm_kwargs quoted there)",
        aliases=("uni2", "uni2-h"),
    ),
    Family(
        "conch",
        "CONCH (pathology vision-language, ViT-B/16)",
        "pathology",
        PACKAGE,
        (
            Size(
                "b",
                "conch",
                "conch_ViT-B-16",
                768,
                16,
                1,
                hf_repo="MahmoodLab/CONCH",
                hf_file="pytorch_model.bin",  # the file conch's create_model downloads
                # conch/open_clip_custom/model_configs/conch_ViT-B-16.json: embed dims + vision_cfg
                overrides=(
                    ("embed_dim", 512),
                    ("embed_dim_caption", 768),
                    ("image_size", 448),
                    ("patch_size", 16),
                    ("attentional_pool_caption", True),
                    ("attentional_pool_contrast", True),
                    ("attn_pooler_heads", 8),
                    ("n_queries_contrast", 1),
                    ("n_queries_caption", 256),
                    ("output_tokens", True),
                ),
            ),
        ),
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        448,
        "open_clip-style ViT-B/16 with an attentional pooler",
        "encode_image(proj_contrast=False, normalize=False): attention-pooled 512-d",
        "cls",
        "CC-BY-NC-ND-4.0",
        True,
        "huggingface.co/MahmoodLab/CONCH model card; github.com/mahmoodlab/CONCH (conch_ViT-B-16.json; PyPI's "
        "conch-fork 0.1.0 ships that repository's conch package file for file)",
        package=("conch", "pip install conch-fork"),
    ),
    Family(
        "virchow2",
        "Virchow2 (pathology, ViT-H/14)",
        "pathology",
        TIMM_HUB,
        (
            Size(
                "h",
                "virchow2",
                "vit_huge_patch14_224",
                1280,
                14,
                5,
                hf_repo="paige-ai/Virchow2",
                overrides=(
                    ("img_size", 224),
                    ("init_values", 1e-5),
                    ("mlp_ratio", 5.3375),
                    ("reg_tokens", 4),
                    ("mlp_layer", "swiglu_packed"),
                    ("act_layer", "silu"),
                ),
            ),
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "CLS + 4 registers + patches (patch 14)",
        "CLS concatenated with the mean of the patch tokens (2560-d)",
        _CLS_MEAN,
        "CC-BY-NC-ND-4.0",
        True,
        "huggingface.co/paige-ai/Virchow2 model card (config.json model_args; embedding = CLS + mean patch)",
    ),
    Family(
        "h-optimus",
        "H-optimus-0 (pathology, ViT-g/14)",
        "pathology",
        TIMM_HUB,
        (
            Size(
                "g",
                "h-optimus-0",
                "vit_giant_patch14_reg4_dinov2",
                1536,
                14,
                5,
                hf_repo="bioptimus/H-optimus-0",
                overrides=(("img_size", 224), ("init_values", 1e-5)),
            ),
        ),
        (0.707223, 0.578729, 0.703617),
        (0.211883, 0.230117, 0.177517),
        224,
        "CLS + 4 registers + patches (patch 14)",
        "CLS (timm num_classes=0 output)",
        "cls",
        "Apache-2.0",
        True,
        "huggingface.co/bioptimus/H-optimus-0 model card (mean/std and timm kwargs quoted there)",
    ),
    Family(
        "phikon",
        "Phikon-v2 (pathology DINOv2 ViT-L/16)",
        "pathology",
        TRANSFORMERS,
        (
            Size(
                "l",
                "phikon-v2",
                "Dinov2Model",
                1024,
                16,
                1,
                hf_repo="owkin/phikon-v2",
                overrides=(
                    ("hidden_size", 1024),
                    ("num_hidden_layers", 24),
                    ("num_attention_heads", 16),
                    ("patch_size", 16),
                    ("image_size", 224),
                ),
            ),
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "CLS + patches (Dinov2Model, patch 16)",
        "CLS (last_hidden_state[:, 0])",
        "cls",
        "Owkin non-commercial licence",
        False,
        "huggingface.co/owkin/phikon-v2 model card (AutoModel, CLS embedding, ImageNet mean/std)",
        aliases=("phikon-v2",),
    ),
    Family(
        "ct-fm",
        "CT-FM (3D SegResNet encoder, CT)",
        "ct",
        MONAI,
        (
            Size(
                "b",
                "ct-fm",
                "SegResEncoder",
                512,
                16,
                0,
                hf_repo="project-lighter/ct_fm_feature_extractor",
                # MONAI's defaults otherwise (batch norm, ReLU): a checkpoint of another norm fails the load, named
                overrides=(
                    ("spatial_dims", 3),
                    ("in_channels", 1),
                    ("init_filters", 32),
                    ("blocks_down", (1, 2, 2, 4, 4)),
                ),
            ),
        ),
        (0.0,),
        (1.0,),
        0,
        "3D feature maps per stage; the last stage averaged (512-d)",
        "global average pool of the last encoder stage of a [-1024, 2048] HU volume",
        "mean_patch",
        "see the model card (project-lighter)",
        False,
        "huggingface.co/project-lighter/ct_fm_feature_extractor model card (lighter_zoo.SegResEncoder, which is "
        "MONAI's segresnet_ds.SegResEncoder with the Hub mixin); blocks_down (1, 2, 2, 4, 4) as published CT-FM feature "
        "extractors build it (MONAI defaults otherwise); encoder-only safetensors with the encoder's own key names",
        notes="3D: built, measured and its weights checked, but dinoscale's extraction reads 2D images and slices: "
        "a sweep naming it is refused at pre-flight. Built with MONAI's class, not lighter-zoo (whose install "
        "brings jupyter and ITK)",
        spatial_dims=3,
    ),
    Family(
        "resnet50",
        "ResNet-50 ImageNet-1k (torchvision weights)",
        "general",
        TIMM,
        (Size("50", "resnet50-in1k", "resnet50", 2048, 32, 0, tag="tv_in1k"),),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "feature map [2048, H/32, W/32]",
        "global average pool",
        "mean_patch",
        "BSD-3-Clause (torchvision)",
        False,
        "timm 1.0.31 pretrained_cfg resnet50.tv_in1k",
    ),
    # demo ladders: the families' architectures reduced for CPU demos (random weights only)
    Family(
        "dinov3-demo",
        "demo ladder, DINOv3 architecture (random weights only)",
        "demo",
        TIMM,
        tuple(
            _demo(k, "dinov3-demo", "vit_small_patch16_dinov3", w, 16, 5, d, h)
            for k, w, d, h in (("xs", 96, 3, 2), ("s", 144, 4, 3), ("m", 192, 6, 3), ("l", 256, 8, 4))
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        _DINOV3_LAYOUT,
        "as DINOv3",
        _CLS_MEAN,
        "n/a (no weights)",
        False,
        "reduced width / depth of timm's vit_small_patch16_dinov3",
    ),
    Family(
        "dinov2-demo",
        "demo ladder, DINOv2 architecture, a stand-in for RAD-DINO (random weights only)",
        "demo",
        TIMM,
        tuple(
            _demo(k, "dinov2-demo", "vit_small_patch14_dinov2", w, 14, 1, d, h)
            # five rungs: a rehearsal maps up to five domain encoders of a comparison spec onto them
            for k, w, d, h in (
                ("xs", 96, 3, 2),
                ("s", 144, 4, 3),
                ("m", 192, 6, 3),
                ("l", 256, 8, 4),
                ("xl", 320, 8, 5),
            )
        ),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        "CLS + patches (patch 14)",
        "as DINOv2",
        _CLS_MEAN,
        "n/a (no weights)",
        False,
        "reduced width / depth of timm's vit_small_patch14_dinov2",
    ),
)

# transformers configs: the model class's config class, and kwargs every size of that class shares
TRANSFORMERS_CONFIGS = {"Dinov2Model": "Dinov2Config", "SiglipVisionModel": "SiglipVisionConfig"}
_TRANSFORMERS_COMMON = {"rad-dino": (("patch_size", 14), ("image_size", 518))}

_BY_NAME = {f.name: f for f in FAMILIES}
_ALIASES = {a: f.name for f in FAMILIES for a in f.aliases}
_BY_BACKBONE = {s.backbone: (f, s) for f in FAMILIES for s in f.sizes}
_BY_ARCH = {}
for _f in FAMILIES:
    for _s in _f.sizes:
        if _f.loader == TIMM and not _s.demo:
            _BY_ARCH.setdefault(_s.arch, _f.name)


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def get_family(name: str) -> Family:
    key = _ALIASES.get(name.lower(), name.lower())
    if key in _BY_NAME:
        return _BY_NAME[key]
    hint = difflib.get_close_matches(name.lower(), [*_BY_NAME, *_ALIASES], n=3)
    raise KeyError(
        f"unknown encoder family '{name}'"
        + (f" (did you mean {', '.join(hint)}?)" if hint else "")
        + f"; known: {', '.join(_BY_NAME)} (see `dinoscale backbones`)"
    )


def find_family(name: str) -> Family | None:
    """The family of that exact name, or None (a ``timm:<name>`` outside every family is its own)."""
    return _BY_NAME.get(name)


def size_of(backbone: str) -> tuple[Family, Size] | None:
    """The family and size of a registry backbone name; None for a name no family declares."""
    return _BY_BACKBONE.get(backbone)


def config_overrides(size: Size) -> dict:
    """The full architecture / config kwargs of a size (a family's shared kwargs, then the size's own)."""
    return dict(_TRANSFORMERS_COMMON.get(size.backbone, ()) + size.overrides)


def family_of(backbone: str) -> str:
    """The family a backbone belongs to: its declared family, the family of its timm architecture
    (``timm:vit_base_patch14_dinov2.lvd142m`` -> dinov2), else '' (not stated: a ``timm:`` model outside
    every family, or a name in a published results table; such cells share one size curve, as before
    families existed)."""
    found = size_of(backbone)
    if found is not None:
        return found[0].name
    if backbone.startswith("timm:"):
        arch = backbone[len("timm:") :].partition(".")[0]
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    return ""
