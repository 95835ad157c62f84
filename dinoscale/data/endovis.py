"""Adapter ``endovis2018``: EndoVis 2018 Robotic Scene Segmentation with ISINet's instrument types, 2D RGB frames.

The layout is the one ISINet's organiser (``organize2018.py``) writes from the challenge's release folders and
its instrument-type annotations: every frame of a sequence as ``seq<N>_frame<XXX>.png`` beside a uint8 map of
instrument-type ids (0 background, 1-7 below) and a binary instrument map. ISINet's ``val`` folder holds
sequences 2, 5, 9 and 15; it is the benchmark's test split (the paper and ISINet report on it), and dinoscale's
val split is carved from the training sequences by sequence, so no sequence is in two splits. A sequence is
the unit a patient is elsewhere (its frames are resampled together by the bootstrap).

Metrics (``dinoscale.tasks`` segmentation): Dice per type and the EndoVis challenge IoU per frame (mean over the
types the frame's ground truth or prediction holds), the binary (instrument vs tissue) IoU from the same
type maps, each with an interval over sequences.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import data_root, patient_splits, require
from dinoscale.provenance import REAL, data_tags

ENDOVIS_LAYOUT = """    train/images/seq<N>_frame<XXX>.png               RGB frames (1280x1024, 2 Hz), ISINet's organised EndoVis 2018
    train/annotations/seq<N>_frame<XXX>.png          uint8 instrument-type maps: 0 background, 1-7 (ISINet types)
    train/binary_annotations/seq<N>_frame<XXX>.png   instrument vs background
    val/{images,annotations,binary_annotations}/...   sequences 2, 5, 9, 15 (ISINet's val: the test split here)"""
ENDOVIS_SOURCE = (
    "https://endovissub2018-roboticscenesegmentation.grand-challenge.org (frames) + ISINet's instrument-type "
    "annotations and organize2018.py (https://github.com/BCV-Uniandes/ISINet)"
)
# ISINet's instrument types (its 2018 annotations): mask value -> name
INSTRUMENT_TYPES = {
    1: "bipolar_forceps",
    2: "prograsp_forceps",
    3: "large_needle_driver",
    4: "monopolar_curved_scissors",
    5: "ultrasound_probe",
    6: "suction_instrument",
    7: "clip_applier",
}
TEST_SEQUENCES = (2, 5, 9, 15)  # ISINet's val = test (the paper's split)
FRAME = re.compile(r"^seq_?(\d+)_frame(\d+)\.png$")
FOLDERS = {"train": "train", "val": "test"}  # ISINet's folder -> dinoscale split (val carved from train)


@register_dataset(
    "endovis2018",
    task="segmentation",
    replicates="resplit",
    color="rgb",
    published=PublishedSize(
        2235,
        pixels=(1024, 1280),
        source="EndoVis 2018 RSS, ISINet split: 15 sequences x 149 frames at 2 Hz (11 train, 4 val/test), 1280x1024",
    ),
)
def prepare_endovis2018(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "EndoVis 2018", ENDOVIS_LAYOUT, ENDOVIS_SOURCE)
    rows, skipped = [], []
    for folder, split in FOLDERS.items():
        images = require(root / folder / "images", "EndoVis 2018", ENDOVIS_LAYOUT)
        for img in sorted(images.iterdir()):
            m = FRAME.match(img.name)
            if m is None:
                continue  # not a frame (a README, a thumbnail)
            mask = root / folder / "annotations" / img.name
            if not mask.is_file():
                if spec.on_bad_file == "skip":
                    skipped.append({"path": str(mask), "reason": "missing instrument-type map"})
                    continue
                raise DataError(f"EndoVis 2018: {img} has no type map {mask}. Expected layout:\n{ENDOVIS_LAYOUT}")
            seq = f"seq{int(m.group(1))}"
            rows.append(
                {
                    "sample_id": f"{seq}_frame{m.group(2)}",
                    "patient_id": seq,
                    "path": str(img),
                    "mask_path": str(mask),
                    "official": split,
                }
            )
    if not rows:
        raise DataError(
            f"EndoVis 2018: no seq<N>_frame<XXX>.png frames under {root}. Expected layout:\n{ENDOVIS_LAYOUT}"
        )
    df = pd.DataFrame(rows)
    both = set(df.loc[df.official == "train", "patient_id"]) & set(df.loc[df.official == "test", "patient_id"])
    if both:
        raise DataError(f"EndoVis 2018: sequence(s) {sorted(both)} have frames in both train/ and val/ under {root}")
    official = df.pop("official")
    df["split"], how = patient_splits(df, spec, official)
    tags = data_tags(REAL, "EndoVis 2018 (ISINet types)", root=root, split=f"ISINet {how} (by sequence)")
    ds = PreparedDataset(spec.name, "segmentation", [], df, tags, root, mask_labels=dict(INSTRUMENT_TYPES))
    ds.skipped.extend(skipped)
    return ds
