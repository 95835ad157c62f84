"""HECKTOR 2022 replica: the training release as the challenge's Data page lays it out.

Written under ``root``::

    hecktor2022_training/
        imagesTr/<Centre>-<nnn>__CT.nii.gz   CT in HU (int16), ~1 mm in-plane, its own field of view
        imagesTr/<Centre>-<nnn>__PT.nii.gz   PET (float32, SUV), ~4 mm grid, a larger field of view
        labelsTr/<Centre>-<nnn>.nii.gz       uint8 0 / 1 GTVp / 2 GTVn on the CT grid
        hecktor2022_clinical_info_training.csv, hecktor2022_endpoint_training.csv

Source and what is verified: ``dinoscale.data.hecktor``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.data.replicas import Replica, ellipsoid, register_replica, save_nifti
from dinoscale.data.replicas._pixels import truncate

CENTRES = ("CHUM", "CHUP", "CHUS", "CHUV", "HGJ", "HMR", "MDA")
CASES = ("CHUM-001", "CHUP-005", "CHUS-003", "CHUV-001", "HGJ-007", "HMR-004", "MDA-001", "MDA-002")  # all 7 centres
CLINICAL = [
    "PatientID",
    "Task 1",
    "Task 2",
    "CenterID",
    "Gender",
    "Age",
    "Weight",
    "Tobacco",
    "Alcohol",
    "Performance status",
    "HPV status (0=-, 1=+)",
    "Surgery",
    "Chemotherapy",
]


def _case(rng, with_nodes: bool) -> dict:
    """CT (HU) and its label map on a ~1 mm grid; the PET (SUV) on a 4 mm grid covering more than the CT."""
    side, depth = int(rng.choice([32, 36, 40])), int(rng.integers(8, 12))
    sxy, sz = float(rng.choice([0.977, 1.0, 1.17])), 3.0
    shape = (side, side, depth)
    c = ((side - 1) / 2, (side - 1) / 2, (depth - 1) / 2)
    neck = ellipsoid(shape, c, (side * 0.38, side * 0.3, depth))
    ct = np.where(neck, 30.0, -1000.0) + rng.normal(0, 12, shape)
    label = np.zeros(shape, np.uint8)
    centres = {1: (c[0] + rng.uniform(-4, 4), c[1] - side * 0.08, c[2])}
    if with_nodes:
        centres[2] = (c[0] + side * 0.2 * rng.choice([-1, 1]), c[1] + side * 0.1, c[2] + rng.uniform(-2, 2))
    for value, centre in centres.items():
        blob = ellipsoid(shape, centre, (side * 0.12, side * 0.12, 2.2)) & neck
        label[blob], ct[blob] = value, 50.0
    ct_affine = np.diag([-sxy, -sxy, sz, 1.0])
    ct_affine[:3, 3] = [side * sxy / 2, side * sxy / 2, -depth * sz / 2]
    # the PET: 4 mm voxels, 3.27 mm slices, 8 mm more field of view on every side; SUV from the CT's world points
    pxy, pz = 4.0, 3.27
    pshape = (
        int(np.ceil((side * sxy + 16) / pxy)),
        int(np.ceil((side * sxy + 16) / pxy)),
        int(np.ceil((depth * sz + 6) / pz)),
    )
    pet_affine = np.diag([-pxy, -pxy, pz, 1.0])
    pet_affine[:3, 3] = ct_affine[:3, 3] + [8.0, 8.0, -3.0]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in pshape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ pet_affine[:3, :3].T + pet_affine[:3, 3]
    ct_ijk = np.round((world - ct_affine[:3, 3]) @ np.linalg.inv(ct_affine[:3, :3]).T).astype(int)
    inside = np.all((ct_ijk >= 0) & (ct_ijk < shape), axis=1)
    suv = np.zeros(len(ijk), np.float32)
    hit = ct_ijk[inside]
    lab = label[hit[:, 0], hit[:, 1], hit[:, 2]]
    suv[inside] = np.where(neck[hit[:, 0], hit[:, 1], hit[:, 2]], 1.0, 0.05) + np.where(lab > 0, 7.0, 0.0)
    suv = suv.reshape(pshape) + np.abs(rng.normal(0, 0.1, pshape)).astype(np.float32)
    return {
        "CT": (np.round(ct).astype(np.int16), ct_affine),
        "PT": (suv.astype(np.float32), pet_affine),
        "label": (label, ct_affine),
    }


def _tables(base: Path, rng) -> None:
    rows = []
    for case in CASES:
        rows.append(
            [
                case,
                1,
                int(case != "CHUP-005"),
                CENTRES.index(case.split("-")[0]),
                rng.choice(["M", "F"]),
                int(rng.integers(45, 80)),
            ]
            + [round(float(rng.uniform(55, 95)), 1) if rng.random() > 0.2 else np.nan]  # weight: missing for some
            + [rng.choice([0.0, 1.0, np.nan]) for _ in range(3)]  # tobacco, alcohol, performance status
            + [rng.choice([0.0, 1.0, np.nan]), float(rng.integers(0, 2)), float(rng.integers(0, 2))]
        )
    pd.DataFrame(rows, columns=CLINICAL).to_csv(base / "hecktor2022_clinical_info_training.csv", index=False)
    end = [[c, int(rng.integers(0, 2)), int(rng.integers(100, 3000))] for c in CASES if c != "CHUP-005"]
    pd.DataFrame(end, columns=["PatientID", "Relapse", "RFS"]).to_csv(
        base / "hecktor2022_endpoint_training.csv", index=False
    )


@register_replica("hecktor2022")
def write_hecktor(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    base = Path(root) / "hecktor2022_training"
    (base / "imagesTr").mkdir(parents=True, exist_ok=True)
    (base / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(CASES):
        parts = _case(rng, with_nodes=i % 3 != 2)  # a third of the cases without involved nodes (no label 2)
        save_nifti(base / "imagesTr" / f"{case}__CT.nii.gz", *parts["CT"])
        save_nifti(base / "imagesTr" / f"{case}__PT.nii.gz", *parts["PT"])
        save_nifti(base / "labelsTr" / f"{case}.nii.gz", *parts["label"])
    _tables(base, rng)
    broken = None
    if variant == "corrupt_file":
        broken = truncate(base / "imagesTr" / f"{CASES[1]}__PT.nii.gz", keep=0.3) + ": truncated gzip"
    elif variant in ("bad_label", "mask_shape"):
        import nibabel as nib

        path = base / "labelsTr" / f"{CASES[2]}.nii.gz"
        img = nib.load(str(path))
        lab = np.asarray(img.dataobj).copy()
        if variant == "bad_label":
            lab[tuple(s // 2 for s in lab.shape)] = 3  # a label the map (0 / 1 GTVp / 2 GTVn) does not have
            broken = f"{path}: label 3 outside 0 / 1 GTVp / 2 GTVn"
        else:
            lab = lab[:-4]
            broken = f"{path}: shape differs from its CT"
        save_nifti(path, lab.astype(np.uint8), img.affine)
    return Replica(
        root=base,
        dataset="hecktor2022",
        broken=broken,
        reproduces=[
            "hecktor2022_training/imagesTr/<Centre>-<nnn>__CT.nii.gz and __PT.nii.gz, labelsTr/<Centre>-<nnn>.nii.gz",
            "the 7 training centres' prefixes (CHUM, CHUP, CHUS, CHUV, HGJ, HMR, MDA)",
            "CT (int16 HU, ~1 mm in-plane) and PET (float32 SUV, 4 x 4 x 3.27 mm) on different grids and fields of "
            "view, stored LPS; the label map (uint8 1 GTVp, 2 GTVn) on the CT grid; cases without GTVn",
            "hecktor2022_clinical_info_training.csv (PatientID, Task 1, Task 2, CenterID, Gender, Age, Weight, "
            "Tobacco, Alcohol, Performance status, HPV status (0=-, 1=+), Surgery, Chemotherapy; some missing) and "
            "hecktor2022_endpoint_training.csv (PatientID, Relapse, RFS)",
        ],
        leaves_out=[
            f"size: {len(CASES)} cases of 32-40 px and 8-11 slices (published: 524 cases, CT 512 x 512)",
            "the CT / PET dtypes and PET units of the real files (int16 HU and SUV assumed, not verified); the "
            "CenterID codes (unverified: written as indices); anatomy (an ellipsoid neck with FDG-avid balls)",
            "the test release (imagesTs, 359 cases of other centres, labels not public)",
        ],
    )
