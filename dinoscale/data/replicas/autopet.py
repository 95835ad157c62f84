"""AutoPET replica: the TCIA FDG-PET-CT-Lesions NIfTI release, one folder per patient and study.

As the release unpacks (Gatidis et al. 2022; the challenge's ``tcia2nifti`` conversion)::

    FDG-PET-CT-Lesions/PETCT_<10 hex>/<MM-DD-YYYY>-NA-<study description>-<5 digits>/
        CT.nii.gz      the CT on its own grid (HU)
        CTres.nii.gz   the CT resampled to the PET grid (HU)
        PET.nii.gz     the PET in Bq/ml
        SUV.nii.gz     the PET in SUV (body-weight)
        SEG.nii.gz     lesion mask (1 = lesion), all zeros for the negative (control) studies

Study folder names contain spaces ("PET-CT Ganzkoerper  primaer mit KM"); some patients have several
studies on different dates; every study has its own matrix size and voxel spacing (PET grids of 2.0-4.1 mm
in-plane, 3 mm slices), stored LPS (negative x / y in the affine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinoscale.data.replicas import Replica, ellipsoid, register_replica, save_nifti

N_PATIENTS = 12  # 3 of them with a second study; a third of the studies negative (empty SEG)
DESCRIPTIONS = ("PET-CT Ganzkoerper  primaer mit KM", "PET-CT Ganzkoerper  nativ", "PET-Teilkoerper (Kopf)")


def _study(rng, positive: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    side = int(rng.choice([24, 28, 32]))
    depth = int(rng.integers(10, 17))
    sxy = float(rng.choice([2.036, 3.0, 4.07]))
    sz = 3.0
    shape = (side, side, depth)
    body = ellipsoid(shape, ((side - 1) / 2, (side - 1) / 2, (depth - 1) / 2), (side * 0.42, side * 0.32, depth))
    ct = np.where(body, 20.0, -1000.0) + rng.normal(0, 10, shape)
    suv = np.where(body, 0.8, 0.0) + np.abs(rng.normal(0, 0.1, shape))
    seg = np.zeros(shape, np.uint8)
    if positive:
        for _ in range(int(rng.integers(1, 3))):
            c = rng.uniform([side * 0.3, side * 0.35, 2], [side * 0.7, side * 0.65, depth - 3])
            les = ellipsoid(shape, c, (side * 0.08, side * 0.08, 1.6)) & body
            seg[les] = 1
            suv[les] = rng.uniform(4.0, 12.0)
            ct[les] = 45.0
    affine = np.diag([-sxy, -sxy, sz, 1.0])
    affine[:3, 3] = [side * sxy / 2, side * sxy / 2, -depth * sz]
    ct_native = np.round(ct).astype(np.int16)
    return {
        "CT.nii.gz": (ct_native, np.diag([-sxy / 2, -sxy / 2, sz, 1.0])),  # not read: the CT's own finer grid
        "CTres.nii.gz": (ct.astype(np.float32), affine),
        "PET.nii.gz": ((suv * 5_000).astype(np.float32), affine),  # Bq/ml for a ~70 kg patient, ~350 MBq
        "SUV.nii.gz": (suv.astype(np.float32), affine),
        "SEG.nii.gz": (seg, affine),
    }


@register_replica("autopet")
def write_autopet(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    """``FDG-PET-CT-Lesions/`` under ``root``; the returned replica's root is that folder (``dataset.root``)."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "FDG-PET-CT-Lesions"
    broken, studies = None, []
    for p in range(N_PATIENTS):
        pid = f"PETCT_{rng.integers(0, 16**10):010x}"
        for s in range(1 + int(p < 3)):  # three patients with a follow-up study
            date = f"{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}-{2001 + p % 12 + 2 * s}"
            folder = base / pid / f"{date}-NA-{DESCRIPTIONS[(p + s) % 3]}-{rng.integers(10000, 99999)}"
            folder.mkdir(parents=True, exist_ok=True)
            files = _study(rng, positive=(p + s) % 3 != 2)
            for name, (arr, affine) in files.items():
                save_nifti(folder / name, arr, affine)
            studies.append(folder)
    if variant == "corrupt_file":
        bad = studies[1] / "SUV.nii.gz"
        bad.write_bytes(bad.read_bytes()[:150])
        broken = f"{bad}: truncated gzip"
    elif variant == "bad_label":
        bad = studies[2] / "SEG.nii.gz"
        import nibabel as nib

        img = nib.load(str(bad))
        seg = np.asarray(img.dataobj).copy()
        seg[tuple(s // 2 for s in seg.shape)] = 3  # a label the lesion mask (0 / 1) does not have
        save_nifti(bad, seg.astype(np.uint8), img.affine)
        broken = f"{bad}: label 3 outside the lesion mask's 0 / 1"
    elif variant == "mask_shape":
        bad = studies[3] / "SEG.nii.gz"
        import nibabel as nib

        img = nib.load(str(bad))
        save_nifti(bad, np.asarray(img.dataobj)[:-2].astype(np.uint8), img.affine)
        broken = f"{bad}: shape differs from its CTres / SUV"
    return Replica(
        root=base,
        dataset="autopet",
        broken=broken,
        reproduces=[
            "FDG-PET-CT-Lesions/PETCT_<hex id>/<MM-DD-YYYY>-NA-<description with spaces>-<n>/ per study",
            "CT, CTres, PET, SUV, SEG .nii.gz per study (CTres / SUV / SEG on the PET grid), stored LPS",
            "several studies for some patients (a patient's studies stay in one split)",
            "negative studies with an all-zero SEG; every study its own matrix and PET spacing (2.0-4.1 mm)",
        ],
        leaves_out=[
            f"size: {len(studies)} studies of ~24-32 px and 10-16 slices (published: 1,014 studies of 400 x 400 "
            "x ~326 of 900 patients)",
            "the clinical metadata CSV and the DICOM originals; anatomy is an ellipsoid with FDG-avid balls",
        ],
    )
