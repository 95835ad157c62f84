"""Whole-slide tile bags (``wsi-tiles``) as a Camelyon cohort tiled by ``dinoscale tile-slides``.

Written under ``root``::

    slides.csv                     slide_id,label,patient_id[,split]   (label: normal | tumor)
    <slide_id>/tile_<x>_<y>.png    the slide's tissue tiles (RGB, H&E-like)

``spec.subset``: ``camelyon16`` (default; slides normal_NNN / tumor_NNN for training and test_NNN for
test, the official 270/129 split in the ``split`` column, one slide per patient) or ``camelyon17``
(slides patient_NNN_node_K, five lymph-node slides per patient, no official split: patient-level).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dinoscale.data.phantoms3d import _render_tile
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import truncate

TILE = 32  # px (the real tiles: 224 at 20x)
TILES = (6, 10)  # per slide (the real slides: thousands)


def _slides(subset: str, rng) -> list[dict]:
    if subset == "camelyon17":
        return [
            {
                "slide_id": f"patient_{p:03d}_node_{k}",
                "patient_id": f"patient_{p:03d}",
                "tumor": rng.random() < 0.15,  # per slide: about half the patients have no tumour slide
                "center": str(p % 5),  # the release's five centres, as a tiler's table states them
            }
            for p in range(20)
            for k in range(5)
        ]
    out = [{"slide_id": f"normal_{i:03d}", "tumor": False, "split": "train"} for i in range(1, 13)]
    out += [{"slide_id": f"tumor_{i:03d}", "tumor": True, "split": "train"} for i in range(1, 9)]
    out += [{"slide_id": f"test_{i:03d}", "tumor": rng.random() < 0.4, "split": "test"} for i in range(1, 13)]
    for s in out:
        s["patient_id"] = s["slide_id"]  # Camelyon16: one slide per patient
    return out


@register_replica("wsi-tiles", variants=("corrupt_file", "bad_label"))
def write_slides(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    subset = (spec.subset or "camelyon16").lower()
    slides = _slides(subset, rng)
    first_tile = None
    for s in slides:
        folder = root / s["slide_id"]
        folder.mkdir(parents=True, exist_ok=True)
        n = int(rng.integers(*TILES))
        pos = set(rng.choice(n, max(1, n // 5), replace=False).tolist()) if s["tumor"] else set()
        for t in range(n):
            path = folder / f"tile_{t * TILE}_{(t % 3) * TILE}.png"
            Image.fromarray(_render_tile(TILE, t in pos, rng), mode="RGB").save(path)
            first_tile = first_tile or path
    table = pd.DataFrame(
        [
            {
                "slide_id": s["slide_id"],
                "label": "tumor" if s["tumor"] else "normal",
                "patient_id": s["patient_id"],
                **({"split": s["split"]} if "split" in s else {}),
                **({"center": s["center"]} if "center" in s else {}),
            }
            for s in slides
        ]
    )
    broken = None
    if variant == "bad_label":
        table.loc[1, "label"] = "macro-metastasis"
        broken = "slides.csv line 3: label 'macro-metastasis'"
    table.to_csv(root / "slides.csv", index=False)
    if variant == "corrupt_file":
        broken = truncate(first_tile)
    return Replica(
        root=root,
        dataset="wsi-tiles",
        subset=subset,
        reproduces=[
            "slides.csv (slide_id, label normal|tumor, patient_id[, split]) and one tile folder per slide, as "
            "`dinoscale tile-slides` writes them (tile_<x>_<y>.png)",
            "Camelyon16 slide names and its official train/test split"
            if subset != "camelyon17"
            else "Camelyon17 slide names patient_NNN_node_K, five slides per patient, and a center column (0-4)",
        ],
        leaves_out=[
            f"{len(slides)} slides of {TILES[0]}-{TILES[1] - 1} tiles at {TILE} px (real: 399 / 1,000 slides of "
            "thousands of 224 px tiles)",
            "the whole-slide images themselves (.tif pyramids) and the tiler's tissue detection",
            "real tissue (H&E-like texture; tumour slides hold a few tiles of dense nuclei)",
        ],
        broken=broken,
    )
