"""ACDC (cine cardiac MRI, 3D): ED -> ES registration pairs per patient.

The public release (Bernard et al. 2018; layout in ``dinoscale.data.replicas.acdc``): per patient an ``Info.cfg``
naming the ED and ES frames, those frames as 3D volumes ``patientXXX_frameNN.nii.gz`` with label maps
``_gt`` (1 RV, 2 myocardium, 3 LV), under ``database/training`` (patients 001-100) and ``database/testing``
(101-150). The reference benchmark registers ES (moving) onto ED (fixed): 80 / 20 / 50 patients (the training
patients split 80 / 20 by patient, the testing patients as test), resampled to 1.5 x 1.5 x 3.15 mm and cropped to
128 x 128 x 32 (the spec's ``dataset.spacing`` / ``dataset.grid``); warped labels scored in mm on each volume's
native grid. The manifest lists each pair as two rows, fixed (ED) then moving (ES), the order the registration
probe reads (``dinoscale.probes.registration``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from dinoscale.data.adapters import _header_shape, _real, _same_shape
from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import data_root, patient_splits, require

LAYOUT = """    database/training/patient001 ... patient100/   database/testing/patient101 ... patient150/
      Info.cfg                                        ED: <frame>, ES: <frame>, Group, Height, NbFrame, Weight
      patientXXX_frameNN.nii.gz, patientXXX_frameNN_gt.nii.gz   (NN: the ED and ES frames; labels 1 RV, 2 MYO, 3 LV)"""
SOURCE = "https://humanheart-project.creatis.insa-lyon.fr/database/#collection/637218c173e9f0047faa00fb (ACDC)"
STRUCTURES = {1: "RV", 2: "myocardium", 3: "LV"}


def _info(path: Path) -> dict[str, str]:
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            key, sep, value = line.partition(":")
            if not sep:
                raise DataError(f"{path}, line {i}: expected 'key: value', got {line.strip()!r}")
            out[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if not out.get(key, "").isdigit():
            raise DataError(f"{path}: no frame number for {key} (Info.cfg lines 'ED: <n>' and 'ES: <n>')")
    return out


def _rows(folder: Path, split: str, on_bad: str, skipped: list) -> list[dict]:
    info = _info(require(folder / "Info.cfg", "ACDC", LAYOUT))
    rows = []
    for phase in ("ED", "ES"):  # fixed (ED), then moving (ES): the pair order the probe reads
        img = folder / f"{folder.name}_frame{int(info[phase]):02d}.nii.gz"
        gt = img.with_name(img.name.replace(".nii.gz", "_gt.nii.gz"))
        for p in (img, gt):
            if not p.is_file() and on_bad == "error":
                raise DataError(f"{p} not found ({phase} frame of {folder / 'Info.cfg'}). Expected layout:\n{LAYOUT}")
        shapes = [_header_shape(p, on_bad, skipped) if p.is_file() else None for p in (img, gt)]
        if None in shapes:
            return []  # a pair without one of its frames is no pair
        _same_shape(img, shapes[0], gt, shapes[1])
        rows.append(
            {
                "sample_id": img.name.removesuffix(".nii.gz"),
                "patient_id": folder.name,
                "path": str(img),
                "mask_path": str(gt),
                "n_slices": shapes[0][2],
                "official": split,
            }
        )
    return rows


@register_dataset(
    "acdc",
    task="registration",
    published=PublishedSize(
        300,
        unit="volume",
        per_unit=10,
        pixels=(216, 256),
        source="ACDC: 150 patients x (ED, ES) volumes of ~10 slices, ~216 x 256 px (reference benchmark: "
        "80 / 20 / 50 patients, 1.5 x 1.5 x 3.15 mm, 128 x 128 x 32)",
    ),
)
def prepare_acdc(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "ACDC", LAYOUT, SOURCE)
    base = root / "database" if (root / "database").is_dir() else root
    rows, skipped = [], []
    for part, split in (("training", "train"), ("testing", "test")):
        for folder in sorted((base / part).glob("patient*")):
            if re.fullmatch(r"patient\d+", folder.name):
                rows.extend(_rows(folder, split, spec.on_bad_file, skipped))
    if not rows:
        raise DataError(f"ACDC: no database/training/patientXXX folders under {root}. Expected layout:\n{LAYOUT}")
    df = pd.DataFrame(rows)
    df["split"], how = patient_splits(df, spec, df.pop("official"))
    ds = PreparedDataset(spec.name, "registration", [], df, _real(spec, "ACDC", root, how), root)
    ds.mask_labels = dict(STRUCTURES)
    ds.skipped.extend(skipped)
    return ds
