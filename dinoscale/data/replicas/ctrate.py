"""CT-RATE replica (Hamamci et al. 2024, huggingface.co/datasets/ibrahimhamamci/CT-RATE), its folder layout.

Written under ``root``::

    dataset/train/train_<patient>/train_<patient>_<scan>/train_<patient>_<scan>_<recon>.nii.gz
    dataset/valid/valid_<patient>/valid_<patient>_<scan>/valid_<patient>_<scan>_<recon>.nii.gz
    dataset/multi_abnormality_labels/train_predicted_labels.csv   VolumeName + the 18 abnormality columns
    dataset/multi_abnormality_labels/valid_predicted_labels.csv
    dataset/metadata/train_metadata.csv, valid_metadata.csv       VolumeName, XYSpacing, ZSpacing, ... (a subset)

Volumes: int16 Hounsfield units, stored LPS (as DICOM converters write them; the reader reorients to RAS),
each with its own slice count and spacing; one to two reconstructions per scan (same patient).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.data.adapters import CT_RATE_CLASSES
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import truncate

N_TRAIN, N_VALID = 12, 8  # patients (the real set: 20,000 / 1,304)
SIDE = 48  # in-plane pixels (real: 512 to 1024)


def _volume(rng, side: int, depth: int, findings: list[str]) -> np.ndarray:
    """[x, y, z] HU: air, a body ellipse of soft tissue, two lungs, a dense nodule per finding."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (side, side, depth)), indexing="ij")
    vol = np.full(x.shape, -1000.0)
    vol[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    for cx in (-0.4, 0.4):
        vol[((x - cx) / 0.3) ** 2 + (y / 0.5) ** 2 < 1] = -850.0
    for _ in findings[:3]:
        c = rng.uniform(-0.5, 0.5, 3)
        vol[((x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) / 2) ** 2) < 0.02] = 60.0
    vol += rng.normal(0, 20, vol.shape)
    return vol.astype(np.int16)


@register_replica("ct-rate", variants=("corrupt_file", "bad_label"))
def write_ct_rate(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    base = Path(root) / "dataset"
    written = []
    for part, n_patients in (("train", N_TRAIN), ("valid", N_VALID)):
        labels, meta = [], []
        for p in range(1, n_patients + 1):
            scan = "a"
            depth = int(rng.integers(6, 11))
            xy, zs = float(rng.choice([0.6, 0.7, 0.8])), float(rng.choice([1.0, 1.5, 2.0]))
            findings = [c for c in CT_RATE_CLASSES if rng.random() < 0.3]
            vol = _volume(rng, SIDE, depth, findings)
            for recon in range(1, int(rng.integers(1, 3)) + 1):
                name = f"{part}_{p}_{scan}_{recon}.nii.gz"
                folder = base / part / f"{part}_{p}" / f"{part}_{p}_{scan}"
                folder.mkdir(parents=True, exist_ok=True)
                affine = np.diag([-xy, -xy, zs, 1.0])  # LPS storage
                img = nib.Nifti1Image(vol[::-1, ::-1, :].copy(), affine)
                img.header.set_xyzt_units("mm")
                nib.save(img, str(folder / name))
                written.append(folder / name)
                labels.append({"VolumeName": name, **{c: int(c in findings) for c in CT_RATE_CLASSES}})
                meta.append(
                    {
                        "VolumeName": name,
                        "Manufacturer": "REPLICA",
                        "XYSpacing": f"[{xy}, {xy}]",
                        "ZSpacing": zs,
                        "Rows": SIDE,
                        "Columns": SIDE,
                        "RescaleSlope": 1.0,
                        "RescaleIntercept": 0.0,
                    }
                )
        lab = pd.DataFrame(labels)
        if variant == "bad_label" and part == "train":
            lab.loc[2, "Emphysema"] = 2  # neither 0 nor 1
        (base / "multi_abnormality_labels").mkdir(parents=True, exist_ok=True)
        lab.to_csv(base / "multi_abnormality_labels" / f"{part}_predicted_labels.csv", index=False)
        (base / "metadata").mkdir(exist_ok=True)
        pd.DataFrame(meta).to_csv(base / "metadata" / f"{part}_metadata.csv", index=False)
    broken = None
    if variant == "bad_label":
        broken = "dataset/multi_abnormality_labels/train_predicted_labels.csv line 4, 'Emphysema': value 2"
    elif variant == "corrupt_file":
        broken = truncate(written[0], keep=0.5)
    return Replica(
        root=Path(root),
        dataset="ct-rate",
        reproduces=[
            "dataset/{train,valid}/<split>_<patient>/<split>_<patient>_<scan>/<...>_<recon>.nii.gz naming",
            "multi_abnormality_labels/{train,valid}_predicted_labels.csv: VolumeName + the 18 real columns",
            "one to two reconstructions per scan (patient-level split across them); valid = test",
            "int16 HU volumes stored LPS, differing slice counts and spacings (metadata/*_metadata.csv subset)",
        ],
        leaves_out=[
            f"{N_TRAIN} + {N_VALID} patients, {SIDE}^2 x 6-10 slices (real: ~25k scans, 512^2 x ~300)",
            "real anatomy and findings; radiology reports; most metadata columns",
        ],
        broken=broken,
    )
