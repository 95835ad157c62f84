"""ACDC replica: the public release's ``database/`` folder as it unpacks, written small.

What the release holds (Bernard et al. 2018):

    database/training/patient001 ... patient100/   database/testing/patient101 ... patient150/
        Info.cfg                 'key: value' lines: ED, ES, Group (NOR/MINF/DCM/HCM/RV), Height, NbFrame, Weight
        patientXXX_4d.nii.gz     the cine, (x, y, z, t), int16
        patientXXX_frameNN.nii.gz, patientXXX_frameNN_gt.nii.gz   the ED and ES frames (NN 1-based) and their labels
                                 (uint8: 1 RV, 2 myocardium, 3 LV); ~1.4 mm in-plane, 5-10 mm slices

The replica's volumes are short-axis phantoms (a ring of myocardium around the LV, the RV beside it), 24 x 24 x 6
at 1.5 x 1.5 x 10 mm; each ES frame is its ED frame contracted towards the LV by a known smooth in-plane field.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dinoscale.data.replicas import Replica, register_replica, save_nifti

TRAIN, TEST = range(1, 11), range(101, 105)
SHAPE = (24, 24, 6)
SPACING = (1.5, 1.5, 10.0)
GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")


def _ed_labels(rng) -> np.ndarray:
    x, y = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(np.float64)
    cx, cy = 11.5 + rng.uniform(-1, 1), 12.5 + rng.uniform(-1, 1)
    r = np.hypot(x - cx, y - cy)
    lab = np.zeros(SHAPE[:2], np.uint8)
    lab[np.hypot(x - cx, y - (cy - 8)) < 5] = 1  # RV
    lab[r < 7] = 2
    lab[r < 4.5] = 3
    out = np.repeat(lab[:, :, None], SHAPE[2], axis=2)
    out[:, :, 0] = 0  # above the base and below the apex: no heart
    out[:, :, -1] = np.where(r < 4, 2, 0)  # the apex: a cap of myocardium
    return out


def _contract(vol: np.ndarray, centre, strength: float, order: int) -> np.ndarray:
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float64)
    w = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * 8.0**2))
    # ES(x) = ED(x - u(x)): the ES heart is the smaller one
    u = strength * w
    return ndimage.map_coordinates(
        vol, [x + u * (x - centre[0]), y + u * (y - centre[1]), z], order=order, mode="nearest"
    )


def _write_patient(folder: Path, name: str, rng) -> None:
    folder.mkdir(parents=True)
    frames, ed, es = 10, 1, int(rng.integers(7, 10))
    ed_gt = _ed_labels(rng)
    centre = np.argwhere(ed_gt == 3)[:, :2].mean(0)
    es_gt = _contract(ed_gt, centre, 0.25, 0).astype(np.uint8)
    image = {
        k: (np.choose(g, [200, 900, 300, 900]) + rng.normal(0, 40, SHAPE)).astype(np.int16)
        for k, g in (("ed", ed_gt), ("es", es_gt))
    }
    affine = np.diag([*SPACING, 1.0])
    for frame, key in ((ed, "ed"), (es, "es")):
        save_nifti(folder / f"{name}_frame{frame:02d}.nii.gz", image[key], affine)
        save_nifti(folder / f"{name}_frame{frame:02d}_gt.nii.gz", {"ed": ed_gt, "es": es_gt}[key], affine)
    cine = np.stack([image["ed"]] * (es - ed) + [image["es"]] * (frames - es + ed), -1)
    save_nifti(folder / f"{name}_4d.nii.gz", cine, affine)
    (folder / "Info.cfg").write_text(
        f"ED: {ed}\nES: {es}\nGroup: {rng.choice(GROUPS)}\nHeight: {rng.uniform(150, 195):.1f}\n"
        f"NbFrame: {frames}\nWeight: {rng.uniform(50, 110):.1f}\n"
    )


def _break(base: Path, variant: str) -> str:
    folder = base / "testing" / "patient101"
    path = folder / "patient101_frame01.nii.gz"
    if variant == "corrupt_file":
        path.write_bytes(b"\x1f\x8b not a NIfTI file")
        return str(path)
    gt = folder / "patient101_frame01_gt.nii.gz"
    arr = np.asarray(nib.load(str(gt)).dataobj).copy()
    if variant == "bad_label":
        arr[12, 12, 2] = 7
    else:  # mask_shape
        arr = arr[:-4]
    save_nifti(gt, arr, np.diag([*SPACING, 1.0]))
    return str(gt)


@register_replica("acdc")
def write_acdc(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    """The ACDC release under ``root`` (``dataset.root``): 10 training and 4 testing patients."""
    rng = np.random.default_rng(seed)
    base = root / "database"
    for ids, part in ((TRAIN, "training"), (TEST, "testing")):
        for i in ids:
            _write_patient(base / part / f"patient{i:03d}", f"patient{i:03d}", rng)
    broken = _break(base, variant) if variant != "ok" else None
    return Replica(
        root,
        "acdc",
        reproduces=[
            "database/{training,testing}/patientXXX/ folders with Info.cfg (ED, ES, Group, Height, NbFrame, Weight)",
            "patientXXX_frameNN.nii.gz (int16) and _gt.nii.gz (uint8; 1 RV, 2 myocardium, 3 LV) for the ED and ES "
            "frames named in Info.cfg, anisotropic spacing in the header; patientXXX_4d.nii.gz (x, y, z, t)",
        ],
        leaves_out=[
            "150 patients (10 training, 4 testing here), ~216 x 256 x 10 voxels (24 x 24 x 6 here)",
            "MRI content: short-axis phantoms whose ES frame is a known contraction of the ED frame; a two-phase cine",
        ],
        broken=broken,
    )
