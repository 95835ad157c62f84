"""What the data package reads of a spec's ``dataset`` section, in a leaf that imports nothing of dinoscale.

``spec.py`` validates datasets against the registry in ``data/`` and ``data/`` reads the validated section;
the types both need live here, so neither imports the other back (not even for type checking:
``tests/test_architecture.py`` counts ``TYPE_CHECKING`` imports as edges).
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DatasetSettings(Protocol):
    """The part of ``spec.DatasetSpec`` an adapter and ``data.prepare_dataset`` read (the spec's class fits it)."""

    @property
    def name(self) -> str: ...

    @property
    def root(self) -> str | None: ...

    @property
    def subset(self) -> str | None: ...

    @property
    def phantom(self) -> PhantomSpec | None: ...


class PhantomSpec(BaseModel):
    """Built-in deterministic phantom data (labelled 'phantom' wherever a result appears)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every spec section (spec.Strict)

    seed: int = Field(0, description="generator seed; the same seed gives the same images and labels")
    n_patients: int = Field(
        120, ge=12, description="number of synthetic patients (phantom-em: CREMI's three samples A, B, C instead)"
    )
    images_per_patient: tuple[int, int] = Field((2, 4), description="min, max images per patient")
    image_size: int = Field(256, ge=64, le=2048, description="side of the stored square images (pixels)")
    depth: int = Field(32, ge=8, le=512, description="3D phantoms (ct, mri, em, petct): slices per volume")
    tiles_per_slide: int = Field(16, ge=4, le=1024, description="phantom-wsi: tiles per slide (a slide's bag)")

    @field_validator("images_per_patient")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"expected 1 <= min <= max, got {list(v)}")
        return v
