"""Whole-slide tile bags (``wsi-tiles``) as a Camelyon cohort tiled by ``dinoscale tile-slides``.

Written under ``root``::

    slides.csv                     slide_id,label,patient_id[,split]   (label: normal | tumor)
    <slide_id>/tile_<x>_<y>.png    the slide's tissue tiles (RGB, H&E-like)

``spec.subset``: ``camelyon16`` (default; slides normal_NNN / tumor_NNN for training and test_NNN for
test, the official 270/129 split in the ``split`` column, one slide per patient) or ``camelyon17``
(slides patient_NNN_node_K, five lymph-node slides per patient, no official split: patient-level), with the
release's own ``stage_labels.csv`` (patient,stage; a row per patient and per slide) beside the tiler's table:
the adapter takes each slide's centre from it (20 consecutive training patients per centre) and leaves the ITC
slides out.
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


C17_PATIENTS = [c * 20 + i for c in range(5) for i in range(4)]  # 4 of the 20 training patients of each centre


def _slides(subset: str, rng) -> list[dict]:
    if subset == "camelyon17":
        out = []
        for p in C17_PATIENTS:
            for k in range(5):
                # per slide: about half the patients have no tumour slide; a few slides hold only ITCs
                stage = rng.choice(["negative", "itc", "micro", "macro"], p=[0.8, 0.06, 0.06, 0.08])
                out.append(
                    {"slide_id": f"patient_{p:03d}_node_{k}", "patient_id": f"patient_{p:03d}", "stage": str(stage)}
                )
                out[-1]["tumor"] = stage != "negative"  # a tiler's table calls an ITC slide tumour: left out anyway
        if not any(s["stage"] == "itc" for s in out):
            out[1]["stage"], out[1]["tumor"] = "itc", True
        return out
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
    if subset == "camelyon17":
        _stage_labels(slides).to_csv(root / "stage_labels.csv", index=False)
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
            else "Camelyon17 slide names patient_NNN_node_K, five slides per patient, training patients numbered "
            "by centre (20 per centre), and the release's stage_labels.csv (patient,stage: patient_NNN.zip pN-stage, "
            "patient_NNN_node_K.tif negative|itc|micro|macro)",
        ],
        leaves_out=[
            f"{len(slides)} slides of {TILES[0]}-{TILES[1] - 1} tiles at {TILE} px (real: 399 / 1,000 slides of "
            "thousands of 224 px tiles)",
            "the whole-slide images themselves (.tif pyramids) and the tiler's tissue detection",
            "real tissue (H&E-like texture; tumour slides hold a few tiles of dense nuclei)",
        ],
        broken=broken,
    )


def _pn_stage(stages: list[str]) -> str:
    """A patient's pN-stage from its five slides (the CAMELYON17 rules, without the count of nodes > 3)."""
    macro, micro = stages.count("macro"), stages.count("micro")
    if macro:
        return "pN1" if macro + micro <= 3 else "pN2"
    if micro:
        return "pN1mi"
    return "pN0(i+)" if "itc" in stages else "pN0"


def _stage_labels(slides: list[dict]) -> pd.DataFrame:
    rows = []
    for pid in dict.fromkeys(s["patient_id"] for s in slides):
        mine = [s for s in slides if s["patient_id"] == pid]
        rows.append({"patient": f"{pid}.zip", "stage": _pn_stage([s["stage"] for s in mine])})
        rows += [{"patient": f"{s['slide_id']}.tif", "stage": s["stage"]} for s in mine]
    return pd.DataFrame(rows)
