"""BCNB: Early Breast Cancer Core-Needle Biopsy WSI dataset (Xu et al. 2021, Front. Oncol. 11:759007), one
H&E whole-slide image per patient, 1,058 patients, with each patient's clinical table row.

Published layout (the release's folders as the authors' preprocessing scripts and public loaders read them;
github.com/bupt-ai-cz/BALNMP README and code_preprocessing/, https://bupt-ai-cz.github.io/BCNB/)::

    WSIs/<Patient ID>.jpg          the slide, one plain JPEG per patient (scanned with an Iscan Coreo, 200x)
    WSIs/<Patient ID>.json         polygons of some tumour regions ({"positive": [{"name", "vertices"}], ...})
    patient-clinical-data.xlsx     one row per patient: Patient ID, Age(years), Tumour Size(cm), Tumour Type,
                                   ER, PR, HER2, HER2 Expression, Histological grading, Surgical, Ki67,
                                   Molecular subtype, Number of lymph node metastases, ALN status

Labels, one binary label per slide each (a multi-label bag: ``mil`` with several classes, per-label AUROC and
their macro mean): ER, PR and HER2 status (``Positive`` -> 1, ``Negative`` -> 0) and axillary lymph-node
metastasis (ALN status ``N0`` -> 0, ``N+(1-2)`` and ``N+(>2)`` -> 1: N0 vs N+, the BALNMP paper's main task).
The column names and these spellings are those public loaders of the workbook use (checked in several); any
other value is refused, naming the column, the row and the value. ``dataset.classes`` picks a subset (e.g.
``[ER]``: one task per spec, one MIL model per label, as the reference trains them).
Not verified: the reference benchmark (arXiv 2509.06467) reports five binary BCNB tasks; which fifth task it
adds to these four could not be confirmed from public text, so none is guessed (LABELS is where it goes).

Slides: the JPEGs are not pyramids, so OpenSlide is not needed: each is read whole with Pillow (a slide is a
gigapixel image by design; Pillow's decompression-bomb limit is lifted for it) and cut into the grid of
``dinoscale tile-slides`` (224 px tiles at the file's resolution, tiles under 50 % tissue left out), written once
under the sweep's storage (``bcnb-tiles/<patient>-<key>/tile_<x>_<y>.png`` with tiles.csv and tiling.json, keyed
by the file's path, size and time and the settings). Reading a slide whole holds it in memory (~3 bytes a pixel).
The authors' own patches (256 px, annotated tumour regions only) are another choice; the whole tissue is tiled
here, as for Camelyon.

Split: 5-fold cross-validation by patient (the reference benchmark's protocol), a share of the patients held out
for test (``dataset.split.test_fraction``); replicate k validates on fold k, as for MSD. The authors' 6:2:2
cohorts are not read (their file names are not confirmed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import atomic_dir, data_root, fold_splits, require
from dinoscale.data.readers import BAD_FILE_HINT
from dinoscale.data.slides import TILER_VERSION, tissue_fraction
from dinoscale.data.xlsx import read_xlsx
from dinoscale.provenance import REAL, data_tags

LAYOUT = """    WSIs/<Patient ID>.jpg          one core-needle biopsy slide per patient (JPEG)
    WSIs/<Patient ID>.json         tumour-region polygons (not read: the whole tissue is tiled)
    patient-clinical-data.xlsx     Patient ID, ..., ER, PR, HER2, ..., ALN status (one row per patient)"""
SOURCE = "https://bupt-ai-cz.github.io/BCNB/ (Xu et al. 2021; github.com/bupt-ai-cz/BALNMP)"
TITLE = "BCNB"
TABLE = "patient-clinical-data.xlsx"
ID_COLUMN = "Patient ID"
STATUS = {"Positive": 1, "Negative": 0}
ALN = {"N0": 0, "N+(1-2)": 1, "N+(>2)": 1}
# label -> (clinical table column, value -> 0 / 1); a value outside the mapping is refused, never guessed
LABELS: dict[str, tuple[str, dict[str, int]]] = {
    "ER": ("ER", STATUS),
    "PR": ("PR", STATUS),
    "HER2": ("HER2", STATUS),
    "ALN": ("ALN status", ALN),
}
TILE = 224  # px, as dinoscale tile-slides and the Camelyon profile
MIN_TISSUE = 0.5
FOLDS = 5  # the reference benchmark's cross-validation


def clinical_table(path: Path) -> pd.DataFrame:
    """The workbook's first sheet as text columns (header row first); IDs as the table shows them."""
    rows = read_xlsx(path)
    if not rows or ID_COLUMN not in rows[0]:
        found = rows[0] if rows else []
        raise DataError(f"{path}: no '{ID_COLUMN}' column in the first row (found {found}). Expected layout:\n{LAYOUT}")
    table = pd.DataFrame(rows[1:], columns=rows[0], dtype=str)
    table = table[(table != "").any(axis=1)]  # trailing blank rows Excel keeps
    dup = table[ID_COLUMN][table[ID_COLUMN].duplicated()]
    if len(dup):
        raise DataError(f"{path}: '{ID_COLUMN}' {dup.iloc[0]} appears twice (one row per patient)")
    return table.reset_index(drop=True)


def binary_labels(table: pd.DataFrame, classes: list[str], where: str) -> pd.DataFrame:
    """0 / 1 columns named ``classes`` from the clinical table's columns; ``where`` names the table in errors
    (row numbers as the spreadsheet shows them: the header is row 1)."""
    out = {}
    for label in classes:
        column, mapping = LABELS[label]
        if column not in table.columns:
            raise DataError(f"{where}: no '{column}' column (the {label} label); columns: {list(table.columns)}")
        values = table[column].astype(str).str.strip()
        bad = ~values.isin(mapping)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            shown = values.iloc[i] or "(empty)"
            raise DataError(
                f"{where}, row {table.index[i] + 2} (Patient ID {table[ID_COLUMN].iloc[i]}): {column} value "
                f"'{shown}' is not one of {list(mapping)}; {label} is binary ({_rule(mapping)}): correct the value "
                "or remove the patient's row"
            )
        out[label] = values.map(mapping).astype(int).to_numpy()
    return pd.DataFrame(out, index=table.index)


def _rule(mapping: dict[str, int]) -> str:
    return ", ".join(f"{k} -> {v}" for k, v in mapping.items())


def _classes(spec) -> list[str]:
    chosen = list(spec.classes) if getattr(spec, "classes", None) else list(LABELS)
    unknown = [c for c in chosen if c not in LABELS]
    if unknown:
        raise DataError(f"dataset.classes: {unknown} are not BCNB labels; the labels are {list(LABELS)}")
    return chosen


def _read_rgb(path: Path) -> np.ndarray:
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # a whole-slide JPEG is a gigapixel image by design, not a decompression bomb
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError and truncation are OSErrors
        raise DataError(f"{path}: cannot read this JPEG slide ({type(e).__name__}: {e}); {BAD_FILE_HINT}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def tile_jpeg(path: Path, out_root: Path, tile: int = TILE, min_tissue: float = MIN_TISSUE) -> Path:
    """Cut a plain-image slide into ``out_root/<stem>-<key>/tile_<x>_<y>.png`` on the grid ``dinoscale
    tile-slides`` uses (level 0 of a one-level image), with its tiles.csv and tiling.json; once per file."""
    st = path.stat()
    settings = {"tiler": TILER_VERSION, "tile_size": tile, "level": 0, "downsample": 1.0, "min_tissue": min_tissue}
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{json.dumps(settings)}".encode())
    dest = out_root / f"{path.stem}-{key.hexdigest()[:12]}"

    def write(tmp: Path) -> None:
        rgb = _read_rgb(path)
        rows = []
        for y0 in range(0, rgb.shape[0] - tile + 1, tile):
            for x0 in range(0, rgb.shape[1] - tile + 1, tile):
                patch = rgb[y0 : y0 + tile, x0 : x0 + tile]
                frac = tissue_fraction(patch)
                if frac >= min_tissue:
                    name = f"tile_{x0}_{y0}.png"
                    Image.fromarray(patch).save(tmp / name, compress_level=1)  # a cache: speed over size
                    rows.append(f"{name},{x0},{y0},{frac:.4f}\n")
        (tmp / "tiles.csv").write_text("tile,x0,y0,tissue_fraction\n" + "".join(rows))
        (tmp / "tiling.json").write_text(json.dumps({**settings, "slide": str(path), "tiles": len(rows)}, indent=1))

    atomic_dir(dest, write, marker="tiles.csv")
    return dest


def _slide_tiles(jpg: Path, storage: Path, spec, skipped: list) -> list[Path] | None:
    """The slide's tissue tiles; None when it is missing or unreadable and on_bad_file is 'skip'."""
    try:
        if not jpg.is_file():
            raise DataError(f"{TITLE}: {jpg} not found ({TABLE} lists the patient). Expected layout:\n{LAYOUT}")
        tiles = sorted((tile_jpeg(jpg, storage / "bcnb-tiles")).glob("tile_*.png"))
    except DataError as e:
        if spec.on_bad_file == "error":
            raise
        skipped.append({"path": str(jpg), "reason": str(e).splitlines()[0]})
        return None
    if not tiles:
        raise DataError(
            f"{jpg}: no {TILE} px tile holds {MIN_TISSUE:.0%} tissue (is the slide blank, or smaller than a tile?)"
        )
    return tiles


@register_dataset(
    "bcnb",
    task="mil",
    color="rgb",  # H&E: stain colour carries diagnostic information
    published=PublishedSize(
        1_058,
        "slide",
        per_unit=3_000,
        pixels=(TILE, TILE),
        mpp=0.5,
        tile=TILE,
        source="BCNB (Xu et al. 2021): 1,058 patients, one core-needle biopsy WSI (JPEG) each; ~3,000 tissue tiles "
        "of 224 px per slide is an estimate (a few cores of ~1 x 15 mm at an assumed 0.5 um/px: '200x' is the "
        "viewer's magnification, the files' pixel size is not published)",
    ),
)
def prepare_bcnb(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, TITLE, LAYOUT, SOURCE)
    table_path = require(root / TABLE, TITLE, LAYOUT)
    table = clinical_table(table_path)
    classes = _classes(spec)
    labels = binary_labels(table, classes, str(table_path))
    rows, skipped = [], []
    for i, pid in enumerate(table[ID_COLUMN]):
        tiles = _slide_tiles(root / "WSIs" / f"{pid}.jpg", Path(storage), spec, skipped)
        for t in tiles or []:
            rows.append(
                {
                    "sample_id": f"{pid}/{t.stem}",
                    "patient_id": pid,
                    "bag_id": pid,
                    "path": str(t),
                    **{c: int(labels[c].iloc[i]) for c in classes},
                }
            )
    if not rows:
        raise DataError(f"{TITLE}: no readable slide under {root / 'WSIs'}. Expected layout:\n{LAYOUT}")
    df = pd.DataFrame(rows)
    how = fold_splits(df, spec, FOLDS)
    tags = data_tags(REAL, TITLE, root=root, split=how, patient_ids="Patient ID (one slide per patient)")
    ds = PreparedDataset(spec.name, "mil", classes, df, tags, root)
    ds.skipped.extend(skipped)
    return ds
