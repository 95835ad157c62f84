"""Generic adapter ``manifest``: any dataset described by one CSV file.

Expected at ``root`` (the CSV itself, or a folder holding ``manifest.csv``)::

    path,patient_id[,sample_id][,split][,labels | <one 0/1 column per class>][,mask_path]
    images/a.dcm,P001,,train,Nodule|Effusion,
    volumes/b.nii.gz,P002,,test,,masks/b.nii.gz

Relative paths are resolved against the CSV's folder. ``labels`` holds '|'-separated class names
(empty: no finding); the spec's ``classes`` lists the allowed classes. ``split`` (train/val/test),
when present, is used as an official split; otherwise patients are split at random.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dinoscale.data.dataset import SPLITS, DataError, PreparedDataset, register_dataset
from dinoscale.data.layout import check_labels, data_root, patient_splits
from dinoscale.provenance import REAL, data_tags

LAYOUT = __doc__.split("Expected at ``root``")[1].split("Relative paths")[0].strip(" :\n").rstrip()
SOURCE = "your own CSV (see the layout above)"


@register_dataset("manifest", task="auto")
def prepare_manifest(spec, storage: Path) -> PreparedDataset:
    root = (
        data_root(spec, "manifest", LAYOUT, SOURCE, want_file=False)
        if not str(spec.root).endswith(".csv")
        else data_root(spec, "manifest", LAYOUT, SOURCE, want_file=True)
    )
    csv = root if root.is_file() else root / "manifest.csv"
    if not csv.is_file():
        raise DataError(f"manifest: no manifest.csv in {root}. Expected layout:\n{LAYOUT}")
    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = {"path", "patient_id"} - set(raw.columns)
    if missing:
        raise DataError(f"{csv}: missing column(s) {sorted(missing)}. Expected layout:\n{LAYOUT}")
    base = csv.parent
    classes = list(spec.classes or [])

    def resolve(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    df = pd.DataFrame(
        {
            "sample_id": raw["sample_id"]
            if "sample_id" in raw and (raw["sample_id"] != "").all()
            else [f"{Path(p).name.split('.')[0]}_{i}" for i, p in enumerate(raw["path"])],
            "patient_id": raw["patient_id"].astype(str),
            "path": [resolve(p) for p in raw["path"]],
        }
    )
    if (raw["patient_id"] == "").any():
        row = int((raw["patient_id"] == "").idxmax()) + 2
        raise DataError(f"{csv}, line {row}: empty patient_id (splits are patient-level; every row needs one)")
    if "mask_path" in raw:
        df["mask_path"] = [resolve(p) if p else "" for p in raw["mask_path"]]
    if "labels" in raw:
        if not classes:
            raise DataError(f"{csv}: has a 'labels' column; list the allowed classes in the spec's dataset.classes")
        lists = [[x for x in s.split("|") if x] for s in raw["labels"]]
        line = {lab: i + 2 for i, ls in reversed(list(enumerate(lists))) for lab in ls}
        check_labels((x for ls in lists for x in ls), classes, lambda lab: f"{csv}, line {line[lab]}")
        for c in classes:
            df[c] = [int(c in ls) for ls in lists]
    elif classes:
        absent = [c for c in classes if c not in raw.columns]
        if absent:
            raise DataError(f"{csv}: class column(s) {absent} missing (or give a '|'-separated 'labels' column)")
        for c in classes:
            bad = ~raw[c].isin(["0", "1"])
            if bad.any():
                i = int(bad.idxmax())
                raise DataError(f"{csv}, line {i + 2}, column '{c}': label value '{raw[c][i]}' is not 0 or 1")
            df[c] = raw[c].astype(int)
    missing_files = [p for p in df["path"] if not Path(p).exists()]
    if missing_files and spec.on_bad_file == "error":
        raise DataError(f"{csv}: {len(missing_files)} listed file(s) not found (first: {missing_files[0]})")
    official = None
    if "split" in raw and (raw["split"] != "").all():
        bad = sorted(set(raw["split"]) - set(SPLITS))
        if bad:
            raise DataError(f"{csv}: unknown split name(s) {bad}; expected {list(SPLITS)}")
        official = raw["split"]
    df["split"], how = patient_splits(df, spec, official)
    task = "segmentation" if "mask_path" in df and not classes else "multilabel"
    return PreparedDataset(
        name=spec.name,
        task=task,
        classes=classes,
        manifest=df,
        root=base,
        provenance=data_tags(REAL, f"manifest {csv.name}", root=base, split=how),
    )
