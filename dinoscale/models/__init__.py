"""Backbones: one registry of named encoders, their timm architecture and weight sources as data."""

from dinoscale.models.backbones import (  # noqa: F401
    BACKBONES,
    BackboneDef,
    LoadedBackbone,
    WeightsError,
    backbone_names,
    get_backbone,
    load_backbone,
    weights_identity,
)
