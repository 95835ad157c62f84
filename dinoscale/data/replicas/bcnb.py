"""BCNB (core-needle biopsy slides + clinical workbook) in its published layout, small.

Written under ``root``::

    WSIs/<Patient ID>.jpg          a small H&E-like slide per patient: tissue cores on bright glass (JPEG)
    WSIs/<Patient ID>.json         tumour-region polygons in the release's format ({"positive": [...], "negative": []})
    patient-clinical-data.xlsx     the release's 14 columns, one row per patient, IDs 1..N

The label columns use the release's spellings (ER / PR / HER2 ``Positive`` | ``Negative``; ALN status ``N0`` |
``N+(1-2)`` | ``N+(>2)``) with consistent companions (HER2 Expression 3+ only when HER2 is positive, the
number of metastatic nodes matching ALN status).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dinoscale.data.bcnb import TABLE, TILE
from dinoscale.data.phantoms3d import _render_tile
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import truncate
from dinoscale.data.xlsx import write_xlsx

PATIENTS = 20  # 4 test patients and 5 folds of the other 16 (5-fold CV with a 0.2 test share)
GRID = (2, 3)  # tiles per slide (rows, columns) of TILE px; real slides: thousands
COLUMNS = [
    "Patient ID",
    "Age(years)",
    "Tumour Size(cm)",
    "Tumour Type",
    "ER",
    "PR",
    "HER2",
    "HER2 Expression",
    "Histological grading",
    "Surgical",
    "Ki67",
    "Molecular subtype",
    "Number of lymph node metastases",
    "ALN status",
]


def _patient(pid: int, rng) -> list[object]:
    er, pr, her2 = (bool(rng.random() < p) for p in (0.7, 0.6, 0.3))
    nodes = int(rng.choice([0, 0, 0, 1, 2, 3, 5, 8]))
    aln = "N0" if nodes == 0 else "N+(1-2)" if nodes <= 2 else "N+(>2)"
    ihc = str(rng.choice(["2+", "3+"])) if her2 else str(rng.choice(["0", "1+", "2+"]))
    ki67 = float(rng.choice([0.05, 0.1, 0.2, 0.3, 0.5]))
    if not (er or pr or her2):
        subtype = "Triple negative"
    elif her2 and not (er or pr):
        subtype = "HER2(+)"
    else:
        subtype = "Luminal A" if ki67 < 0.14 and not her2 else "Luminal B"
    return [
        pid,
        int(rng.integers(28, 80)),
        round(float(rng.uniform(0.8, 5.0)), 1),
        str(rng.choice(["Invasive ductal carcinoma", "Invasive lobular carcinoma", "Other type"])),
        "Positive" if er else "Negative",
        "Positive" if pr else "Negative",
        "Positive" if her2 else "Negative",
        0 if ihc == "0" else ihc,  # the workbook holds 0 as a number, 1+ / 2+ / 3+ as text
        int(rng.integers(1, 4)),
        str(rng.choice(["Breast-conserving surgery", "Modified radical mastectomy"])),
        ki67,
        subtype,
        nodes,
        aln,
    ]


def _slide(tumour: bool, rng) -> np.ndarray:
    """Glass (bright grey with noise) and a band of tissue tiles: a biopsy core across the slide."""
    rows, cols = GRID
    img = np.clip(rng.normal(238, 4, (rows * TILE, cols * TILE, 3)), 0, 255).astype(np.uint8)
    core = int(rng.integers(0, rows))
    for c in range(cols):
        if c == cols - 1 and rng.random() < 0.5:
            continue  # a core shorter than the slide: glass at its end
        for r in {core, int(rng.integers(0, rows))}:
            img[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = _render_tile(TILE, tumour, rng)
    return img


@register_replica("bcnb", variants=("corrupt_file", "bad_label"))
def write_bcnb(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    slides = root / "WSIs"
    slides.mkdir(parents=True, exist_ok=True)
    table = [_patient(pid, rng) for pid in range(1, PATIENTS + 1)]
    for row in table:
        pid, positive = row[0], row[-1] != "N0"
        Image.fromarray(_slide(positive, rng)).save(slides / f"{pid}.jpg", quality=90)
        box = [[40, 30], [400, 30], [400, 190], [40, 190]]
        (slides / f"{pid}.json").write_text(
            json.dumps({"positive": [{"name": "Annotation 0", "vertices": box}], "negative": []}, indent=4)
        )
    broken = None
    if variant == "bad_label":
        table[2][COLUMNS.index("HER2")] = "Equivocal"
        broken = f"{TABLE} row 4: HER2 'Equivocal'"
    write_xlsx(root / TABLE, [COLUMNS, *table])
    if variant == "corrupt_file":
        broken = truncate(slides / "1.jpg")
    return Replica(
        root=root,
        dataset="bcnb",
        reproduces=[
            "WSIs/<Patient ID>.jpg (one plain JPEG slide per patient, RGB) beside WSIs/<Patient ID>.json (the "
            "release's annotation format: positive / negative lists of named polygons)",
            f"{TABLE}: a real .xlsx with the release's 14 columns in order, Patient ID 1..N, ER / PR / HER2 "
            "Positive | Negative, ALN status N0 | N+(1-2) | N+(>2) with a matching 'Number of lymph node "
            "metastases', HER2 Expression 0 | 1+ | 2+ | 3+",
        ],
        leaves_out=[
            f"{PATIENTS} patients of {GRID[0]} x {GRID[1]} tiles of {TILE} px (real: 1,058 gigapixel slides)",
            "real tissue (H&E-like texture; ALN-positive patients' cores hold clusters of dense nuclei) and the "
            "real slides' size and JPEG encoding",
            "the value spellings of Tumour Type, Surgical, Ki67 and Molecular subtype (not read by the adapter; "
            "the replica's are plausible, unverified) and the tumour polygons' real coordinates",
            "the authors' 256 px tumour-region patches and their 6:2:2 cohort lists (not read by the adapter)",
            "the reference benchmark's fifth binary BCNB task (not identified from public text)",
        ],
        broken=broken,
    )
