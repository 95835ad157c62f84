"""HECKTOR 2022 (head-and-neck FDG-PET/CT): segmentation of the primary tumour (GTVp, label 1) and the
metastatic lymph nodes (GTVn, label 2), Task 1 of the challenge.

The training release as the challenge publishes it (https://hecktor.grand-challenge.org/Data/; Andrearczyk
et al. 2023, "Overview of the HECKTOR challenge at MICCAI 2022", LNCS 13626, PMC10171217)::

    hecktor2022_training/
        imagesTr/<Centre>-<nnn>__CT.nii.gz, <Centre>-<nnn>__PT.nii.gz     e.g. CHUM-001__CT.nii.gz
        labelsTr/<Centre>-<nnn>.nii.gz                                     0 background, 1 GTVp, 2 GTVn
        hecktor2022_clinical_info_training.csv    PatientID, Task 1, Task 2, CenterID, Gender, Age, Weight,
                                                  Tobacco, Alcohol, Performance status, HPV status (0=-, 1=+),
                                                  Surgery, Chemotherapy
        hecktor2022_endpoint_training.csv         PatientID, Relapse, RFS (Task 2 only; not read)

524 training cases from 7 centres (CHUM 56, CHUP 72, CHUS 72, CHUV 53, MDA 198, HGJ 55, HMR 18; the Data page's
table). The page's tree writes a label as ``CHUM_001.nii.gz`` while its images are ``CHUM-001__..``; both
spellings are accepted. The CT and the PET are not resampled by the organisers: each on its own grid (the PET
coarser, ~4 mm; the CT ~1 mm in-plane), and the label map on the CT's grid (the 2025 edition's page: predictions
"in the same resolution as the CT"; for 2022 taken to be the same convention, not stated on the 2022 page we
read). Not verified: that the released PET is in SUV (the adapter scales it as SUV, as AutoPET's); the numeric
CenterID codes (the centre is read from the PatientID prefix instead).

The encoder reads the PET beside the CT as AutoPET's (CT windowed, PET in SUV 0-10, their mean -> R, G, B), which
needs both on one grid: the adapter resamples each PET onto its CT's grid through the two affines (trilinear,
SUV 0 outside the PET's field of view) once, into the sweep's storage (keyed by the files' size and mtime), so
that the label maps and the scoring stay on the CT grid as published. The cost: one PET copy per case as large
as its CT.

Split: patient-level random (``dataset.split``; the challenge's 359 test cases from other centres are not
public with labels); the manifest's ``center`` column carries the centre for a per-centre look.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.data.adapters import _header_shape, _real, _same_shape
from dinoscale.data.dataset import CENTER_COLUMN, DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import data_root, patient_splits, require

LAYOUT = """    hecktor2022_training/imagesTr/<Centre>-<nnn>__CT.nii.gz, <Centre>-<nnn>__PT.nii.gz   (e.g. CHUM-001)
    hecktor2022_training/labelsTr/<Centre>-<nnn>.nii.gz      0 background, 1 GTVp, 2 GTVn (on the CT grid)
    hecktor2022_training/hecktor2022_clinical_info_training.csv   PatientID, CenterID, ..."""
SOURCE = "https://hecktor.grand-challenge.org/Data/ (HECKTOR 2022, MICCAI; registration and data agreement)"
STRUCTURES = {1: "GTVp", 2: "GTVn"}
CLINICAL_CSV = "hecktor2022_clinical_info_training.csv"
CENTRES = {"CHUM": 56, "CHUP": 72, "CHUS": 72, "CHUV": 53, "MDA": 198, "HGJ": 55, "HMR": 18}  # training cases
CASE = re.compile(r"([A-Z]+)-(\d+)__CT\.nii\.gz")


def _base(root: Path) -> Path:
    """The folder holding imagesTr: the root itself, or the release folder(s) under it."""
    for base in (
        root,
        root / "hecktor2022_training",
        root / "hecktor2022",
        root / "hecktor2022_training" / "hecktor2022",
    ):
        if (base / "imagesTr").is_dir():
            return base
    raise DataError(f"HECKTOR 2022: no imagesTr folder under {root}. Expected layout:\n{LAYOUT}\nSource: {SOURCE}")


def _clinical(base: Path) -> pd.DataFrame:
    csv = require(base / CLINICAL_CSV, "HECKTOR 2022", LAYOUT)
    table = pd.read_csv(csv, dtype={"PatientID": str})
    if "PatientID" not in table.columns:
        raise DataError(f"{csv}: no PatientID column (the clinical table lists each case as e.g. CHUM-001)")
    return table


def _label_path(base: Path, case: str) -> Path:
    hyphen = base / "labelsTr" / f"{case}.nii.gz"
    underscore = base / "labelsTr" / f"{case.replace('-', '_')}.nii.gz"  # as the Data page's tree spells it
    return underscore if not hyphen.is_file() and underscore.is_file() else hyphen


def _pet_on_ct(ct: Path, pet: Path, storage: Path) -> Path:
    """The PET resampled onto its CT's grid (trilinear through both affines, 0 outside the PET's field of view),
    written once under ``storage``; a file that cannot be read is a DataError naming it."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    h = hashlib.sha256()
    for f in (ct, pet):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    out = storage / "hecktor" / h.hexdigest()[:16] / pet.name.replace("__PT", "__PT_on_CT")
    if out.is_file():
        return out
    ct_img = nib.load(str(ct))  # its grid only (the header was read already): the CT's voxels are not read here
    try:
        pet_img = nib.load(str(pet))
        pet_arr = np.asarray(pet_img.dataobj, dtype=np.float32)
    except Exception as e:
        raise DataError(f"{pet}: cannot read the NIfTI volume ({type(e).__name__}: {e})") from e
    grid = (tuple(ct_img.shape[:3]), ct_img.affine)
    moved = resample_from_to(nib.Nifti1Image(pet_arr, pet_img.affine), grid, order=1, cval=0.0)
    img = nib.Nifti1Image(np.asarray(moved.dataobj, dtype=np.float32), ct_img.affine)
    img.set_qform(ct_img.affine, code=1)
    img.set_sform(ct_img.affine, code=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{out.name}")
    nib.save(img, str(tmp))
    os.replace(tmp, out)  # a concurrent writer of the same file loses harmlessly
    return out


def _row(base: Path, ct: Path, storage: Path, on_bad: str, skipped: list) -> dict | None:
    case = ct.name.removesuffix("__CT.nii.gz")
    pet, label = ct.with_name(f"{case}__PT.nii.gz"), _label_path(base, case)
    for p in (pet, label):
        if not p.is_file():
            if on_bad == "error":
                raise DataError(f"HECKTOR 2022: {p} missing beside {ct}. Expected layout:\n{LAYOUT}")
            skipped.append({"sample_id": case, "path": str(p), "reason": "missing"})
            return None
    shapes = [_header_shape(p, on_bad, skipped) for p in (ct, pet, label)]
    if None in shapes:
        return None
    _same_shape(ct, shapes[0], label, shapes[2])  # the label map lies on the CT grid; the PET on its own
    try:
        pet_on_ct = _pet_on_ct(ct, pet, storage)
    except DataError as e:
        if on_bad == "error":
            raise
        skipped.append({"sample_id": case, "path": str(e).split(": ")[0], "reason": str(e)})
        return None
    return {
        "sample_id": case,
        "patient_id": case,
        CENTER_COLUMN: case.split("-")[0],
        "path": str(ct),
        "pet_path": str(pet_on_ct),
        "mask_path": str(label),
        "n_slices": shapes[0][2],
    }


@register_dataset(
    "hecktor2022",
    task="segmentation",
    published=PublishedSize(
        524,
        "volume",
        per_unit=180,
        pixels=(512, 512),
        source="HECKTOR 2022 (Andrearczyk et al. 2023): 524 training cases of 7 centres (Task 1), CT 512 x 512 "
        "in-plane; ~180 slices per CT is an estimate (head-and-neck to whole-body fields at 1.5-3 mm), not a "
        "published median",
    ),
)
def prepare_hecktor(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "HECKTOR 2022", LAYOUT, SOURCE)
    base = _base(root)
    clinical = _clinical(base)
    rows, skipped = [], []
    for ct in sorted((base / "imagesTr").glob("*__CT.nii.gz")):
        if not CASE.fullmatch(ct.name):
            raise DataError(f"{ct}: not a HECKTOR case name (<Centre>-<nnn>__CT.nii.gz). Expected layout:\n{LAYOUT}")
        row = _row(base, ct, Path(storage), spec.on_bad_file, skipped)
        if row is not None:
            rows.append(row)
    if not rows:
        raise DataError(f"HECKTOR 2022: no imagesTr/*__CT.nii.gz under {base}. Expected layout:\n{LAYOUT}")
    df = pd.DataFrame(rows)
    unlisted = sorted(set(df["patient_id"]) - set(clinical["PatientID"]))
    if unlisted:
        raise DataError(
            f"{base / CLINICAL_CSV}: case(s) {unlisted[:5]} of imagesTr not listed in its PatientID column "
            f"({len(unlisted)} in all)"
        )
    df["split"], how = patient_splits(df, spec)
    ds = PreparedDataset(
        spec.name,
        "segmentation",
        [],
        df,
        _real(spec, "HECKTOR 2022", root, f"{how}; PET resampled onto its CT's grid"),
        root,
        mask_labels=dict(STRUCTURES),
    )
    ds.skipped.extend(skipped)
    return ds
