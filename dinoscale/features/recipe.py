"""The feature recipe: everything that turns a unit of data (an image, a volume) into features.

One frozen value, resolved by the plan once per feature set (``dinoscale.sweep.plan.feature_recipe``),
is the extractor's only configuration argument (``dinoscale.features.extract``: backbone, recipe, rows,
device, sink) and, with the rows it is applied to, the store key (``FeatureKey``: the recipe's digest and
the manifest digest). ``dinoscale protocol`` prints it, the parent run keeps the recipes of its feature
sets (``record.FEATURE_RECIPES``) and every child run is tagged with its recipe's digest
(``record.RECIPE_DIGEST``). Nothing else decides how pixels become features: the transforms of
``dinoscale.data.preprocess`` read these fields and nothing more.

A leaf: imports nothing of dinoscale (the volume's channel map and grid, ``dinoscale.data.volumes.VolumeInput``,
is carried as a value and hashed through its ``signature``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields, replace
from typing import Any

EXTRACTOR_VERSION = "3"  # 3: the recipe (colour kept); 2: torch anti-aliased resize instead of MONAI's
COLORS = ("grey", "rgb")  # a dataset's colour model: grey (replicated to R, G, B) | rgb (kept; alpha dropped)
# How intensities become [0, 1] (clipped): each image's / volume's own min-max | the range the file's encoding
# declares (2D: 8-bit / 255, 16-bit / 65535, a DICOM's VOI window or its stored bits) | percentiles of the
# nonzero values | a CT window in HU. ``resolve_intensity`` states the default per modality and its source.
INTENSITIES = ("minmax", "range", "percentiles", "window")
INTENSITY_WORDS = {
    "minmax": "each image's own min-max to [0, 1]",
    "range": "the range the file's encoding declares to [0, 1]: 8-bit / 255, 16-bit / 65535; DICOM: its VOI "
    "window (0028,1050/1051) if it states one, else its stored bits (0028,0101) after rescale slope / intercept",
    "percentiles": "the {lo:g}th-{hi:g}th percentiles of the nonzero values to [0, 1], clipped",
    "window": "CT window {window} HU mapped to [0, 1], clipped",
}
# The default of each kind of data ('auto'), with its reason and source (``dinoscale protocol`` prints it).
DEFAULT_PERCENTILES = (0.5, 99.5)
INTENSITY_DEFAULTS = {
    "ct window": ("window", "a stated CT window: HU are absolute units (the reference benchmark windows CT)"),
    "2D images": (
        "range",
        "as DINO-style pipelines feed images (torchvision's ToTensor divides 8-bit by 255); unlike min-max it "
        "does not move with burnt-in markers or one bright pixel",
    ),
    "mri": (
        "percentiles",
        "MRI has no absolute scale: robust percentiles of the nonzero (body) voxels, 0.5-99.5 as in MONAI's "
        "ScaleIntensityRangePercentiles recipes and nnU-Net's clipping",
    ),
    "other volumes": ("minmax", "no scale stated for this modality (PET channels: SUV, see the channel map)"),
}
VIEWS = ("images", "volumes", "slices")
# How a 2D image or a slice is resized: torch's separable anti-aliasing filter (2D images) or MONAI's
# Gaussian pre-smoothing (slices of volumes), both before the interpolation of ``interpolation``.
ANTIALIAS = ("separable", "gaussian")
SLICE_AXIS = -1  # volumes are read RAS; the axial slice k is vol[..., k]


@dataclass(frozen=True)
class FeatureRecipe:
    # the encoder
    backbone: str  # timm architecture id (with overrides)
    weights_digest: str
    resolution: int  # square input side in pixels
    mean: tuple[float, ...]  # the encoder's own normalisation: its family's (models/families.py), else timm's cfg
    std: tuple[float, ...]
    # the pixels
    color: str = "grey"  # the dataset's colour model (COLORS); 2D images
    # INTENSITIES; 'window' needs ``window``. The default is today's mapping (each 2D image's / volume's own
    # min-max) and is decided here only: the plan states 'window' when the spec has a CT window, else nothing.
    intensity: str = "minmax"
    window: tuple[float, float] | None = None  # CT window in HU (intensity 'window')
    percentiles: tuple[float, float] | None = None  # lower, upper percentile of nonzero values ('percentiles')
    interpolation: str = "bicubic"  # bicubic | bilinear | area
    antialias: str = "separable"  # ANTIALIAS
    volume: Any = None  # volumes: channel map + common grid (dinoscale.data.volumes.VolumeInput); None: grey, own grid
    fusion: str = ""  # volumes without a map: extra co-registered inputs fused into the channels ('pet')
    # the features
    view: str = "images"  # VIEWS: a row per image, per volume (slices pooled), or per slice
    tokens: str = "cls_mean_patch"  # the token set (dinoscale.features.extract.parse_token_set)
    pool: str = ""  # volumes view: how slice features are pooled per volume (mean | max | mean_max)
    dtype: str = "float32"  # storage dtype of the rows
    extractor_version: str = EXTRACTOR_VERSION

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour model '{self.color}' ({', '.join(COLORS)})")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"unknown intensity mapping '{self.intensity}' ({', '.join(INTENSITIES)})")
        if (self.intensity == "window") != (self.window is not None):
            raise ValueError("intensity 'window' and a window (HU min, max) go together")
        if (self.intensity == "percentiles") != (self.percentiles is not None):
            raise ValueError("intensity 'percentiles' and percentiles (lower, upper) go together")
        if self.intensity == "range" and self.view != "images":
            raise ValueError("intensity 'range' is for 2D files (a volume is read as float: its range is not kept)")
        if self.view not in VIEWS:
            raise ValueError(f"unknown view '{self.view}' ({', '.join(VIEWS)})")
        if self.antialias not in ANTIALIAS:
            raise ValueError(f"unknown anti-aliasing '{self.antialias}' ({', '.join(ANTIALIAS)})")
        if self.view == "volumes" and self.pool not in ("mean", "max", "mean_max"):
            raise ValueError(f"unknown volume pooling '{self.pool}' (mean, max, mean_max)")

    def with_(self, **changes) -> FeatureRecipe:
        return replace(self, **changes)

    def as_dict(self) -> dict:
        """Every field as JSON-ready data (the volume's map and grid as their signature and description)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "volume":
                v = {"signature": v.signature(), **v.describe()} if v is not None else None
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def describe(self) -> dict[str, str]:
        """The recipe in words, one line per step (``dinoscale protocol``)."""
        words = INTENSITY_WORDS[self.intensity]
        lo, hi = self.percentiles or (0, 0)
        scale = words.format(window=list(self.window or ()), lo=lo, hi=hi)
        if self.intensity != "window":
            scale = (
                scale
                + (" (volumes: once per volume, every slice on one scale)" if self.view != "images" else "")
                + ("; colour images over all their channels at once (hue kept)" if self.color == "rgb" else "")
            )
        colour = {
            "grey": "grey: one channel replicated to R, G, B (colour files averaged to grey)",
            "rgb": "RGB kept as R, G, B (alpha dropped; grey files replicated)",
        }[self.color]
        out = {
            "encoder": self.backbone,  # the weights digest: in as_dict (it names the library versions)
            "colour": colour
            if self.view == "images"
            else "volumes: the channel map below"
            if self.volume is not None
            else "grey slices replicated to R, G, B"
            + (f" ({self.fusion} fused into the channels)" if self.fusion else ""),
            "intensity": scale,
            "resize": f"{self.resolution} px square, {self.interpolation}, anti-aliased ({self.antialias})",
            "normalisation": f"mean {list(self.mean)}, std {list(self.std)} (the encoder's pretrained config)",
        }
        if self.volume is not None:
            out.update({f"volume {k}": v for k, v in self.volume.describe().items()})
        out["tokens"] = self.tokens + (f", pooled per volume by {self.pool}" if self.view == "volumes" else "")
        out["view"] = self.view
        out["storage"] = f"{self.dtype}; extractor version {self.extractor_version}"
        out["digest"] = self.digest
        return out


def resolve_intensity(
    asked: str, view: str, modality: str, window: tuple[float, float] | None, percentiles=DEFAULT_PERCENTILES
) -> tuple[dict, str]:
    """The recipe's intensity fields for the spec's ``dataset.intensity`` (``asked``; 'auto': the default of
    this kind of data, ``INTENSITY_DEFAULTS``) and the reason, for the protocol table."""
    if asked == "auto":
        kind = (
            "ct window"
            if window is not None
            else "2D images"
            if view == "images"
            else "mri"
            if modality == "mri"
            else "other volumes"
        )
        asked, why = INTENSITY_DEFAULTS[kind]
        why = f"default for {kind}: {why}"
    else:
        why = "the spec's dataset.intensity"
    fields_ = {"intensity": asked}
    if asked == "window":
        fields_["window"] = tuple(window)
    elif asked == "percentiles":
        fields_["percentiles"] = tuple(float(p) for p in percentiles)
    return fields_, why
