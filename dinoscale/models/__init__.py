"""Backbones: one registry of named encoders, built from the encoder families (``families.py``: loader, sizes,
preprocessing, tokens and pooling, licence, offline weights, as data) and any timm model by name."""

from dinoscale.models.backbones import (  # noqa: F401
    BACKBONES,
    TIMM_PREFIX,
    BackboneDef,
    BackboneFacts,
    LoadedBackbone,
    WeightsError,
    WeightsNeed,
    backbone_facts,
    backbone_names,
    check_weights,
    get_backbone,
    gflops_per_image,
    hub_weights_file,
    is_backbone,
    load_backbone,
    missing_weights_error,
    require_loader,
    weights_identity,
    weights_need,
)
