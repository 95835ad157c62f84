"""Backbones: one registry of named encoders, their timm architecture and weight sources as data."""

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
