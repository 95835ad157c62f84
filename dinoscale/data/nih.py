"""NIH ChestX-ray14 in its published layout (Wang et al. 2017): 112,120 PNGs, 30,805 patients.

Expected under ``root``::

    Data_Entry_2017.csv            (or Data_Entry_2017_v2020.csv)
    train_val_list.txt             official patient-wise train+val list
    test_list.txt                  official patient-wise test list
    images/*.png                   or the Kaggle layout images_001/images/*.png ... images_012/...

Val is carved from the official train_val list by patient (the official lists have no val split).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.splits import assign_patient_splits, carve_val_from_train
from dinoscale.provenance import REAL, data_tags

CLASSES = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
LAYOUT = __doc__.split("Expected under ``root``::")[1].split("Val is carved")[0].strip("\n").rstrip()
SOURCE = "https://nihcc.app.box.com/v/ChestXray-NIHCC (or Kaggle: nih-chest-xrays/data)"


def _entry_csv(root: Path) -> Path:
    for name in ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"NIH ChestX-ray14: no Data_Entry_2017.csv under {root}. Expected layout:\n{LAYOUT}\nSource: {SOURCE}"
    )


def _index_images(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in [root / "images", *sorted(root.glob("images_*/images"))]:
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name.endswith(".png"):
                    found[entry.name] = Path(entry.path)
    return found


@register_dataset(
    "nih-chestxray14",
    published=PublishedSize(
        112_120,
        pixels=(1024, 1024),
        source="Wang et al. 2017 (ChestX-ray8/14): 112,120 frontal radiographs of 30,805 patients, 1024x1024 PNG",
    ),
)
def prepare_nih(spec, storage: Path) -> PreparedDataset:
    root = Path(os.path.expandvars(spec.root)).expanduser()
    if not root.is_dir():
        unset = [v for v in re.findall(r"\$\{?(\w+)", str(root))]
        hint = f" (environment variable(s) {', '.join(unset)} not set)" if unset else ""
        raise DataError(
            f"NIH ChestX-ray14: data root '{root}'{hint} does not exist. Expected layout:\n{LAYOUT}\nSource: {SOURCE}"
        )
    entries = pd.read_csv(_entry_csv(root))
    missing_cols = {"Image Index", "Finding Labels", "Patient ID"} - set(entries.columns)
    if missing_cols:
        raise DataError(f"{_entry_csv(root)}: missing column(s) {sorted(missing_cols)}")
    images = _index_images(root)
    absent = [n for n in entries["Image Index"] if n not in images]
    if absent:
        raise DataError(
            f"NIH ChestX-ray14: {len(absent)} image(s) listed in {_entry_csv(root).name} are not under {root} "
            f"(first: {absent[0]}). Expected layout:\n{LAYOUT}"
        )
    labels = entries["Finding Labels"].fillna("No Finding").str.split("|")
    unknown = sorted({x for ls in labels for x in ls} - set(CLASSES) - {"No Finding"})
    if unknown:
        raise DataError(f"{_entry_csv(root)}: unknown finding label(s) {unknown}; expected {CLASSES} or 'No Finding'")
    df = pd.DataFrame(
        {
            "sample_id": entries["Image Index"].str.removesuffix(".png"),
            "patient_id": entries["Patient ID"].astype(str),
            "path": [str(images[n]) for n in entries["Image Index"]],
        }
    )
    for c in CLASSES:
        df[c] = [int(c in ls) for ls in labels]
    official = (root / "train_val_list.txt").is_file() and (root / "test_list.txt").is_file()
    if spec.split.official and official:
        test_names = set((root / "test_list.txt").read_text().split())
        df["split"] = ["test" if n in test_names else "train" for n in entries["Image Index"]]
        df["split"] = carve_val_from_train(df, spec.split.val_fraction, spec.split.seed)
        split_source = "official lists + patient-level val"
    else:
        df["split"] = assign_patient_splits(
            df["patient_id"], spec.split.val_fraction, spec.split.test_fraction, spec.split.seed
        )
        split_source = "patient-level random"
    return PreparedDataset(
        name=spec.name,
        task="multilabel",
        classes=list(CLASSES),
        manifest=df,
        root=root,
        provenance=data_tags(REAL, "NIH ChestX-ray14", root=root, split=split_source),
    )
