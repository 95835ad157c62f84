"""Semi-real phantom: synthetic lesions inserted into a real CT slice that ships with pydicom.

``semireal-ct`` starts from pydicom's ``CT_small.dcm`` (a real 128 x 128 CT slice, read from the
installed package, never copied into the repository). Each synthetic patient gets their own
deterministic variant of it (flip, shift, noise at a per-patient level) and each image may carry
round lesions inserted in the soft tissue at several sizes:

- ``hyperdense``: +45..70 HU over the tissue (haemorrhage-like), radius 2-7 px
- ``hypodense``: -60..-40 HU (oedema / cyst-like), radius 2-7 px

The images are written as DICOM files (the original header, new pixel data and SOP UIDs), so they go
through the real DICOM path: rescale slope / intercept to HU. Every result is tagged
``data.source=semi-synthetic`` with the base file's sha256: the anatomy is real, the labels are not.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.data.dataset import DataError, PreparedDataset, register_dataset
from dinoscale.data.layout import atomic_dir
from dinoscale.data.splits import assign_patient_splits
from dinoscale.datasettings import PhantomSpec
from dinoscale.digest import sha256_file
from dinoscale.provenance import SEMI_SYNTHETIC, data_tags

GENERATOR = "semireal-ct"
VERSION = "1"
CLASSES = ["hyperdense", "hypodense"]
BASE_FILE = "CT_small.dcm"
PATIENT_PREVALENCE = 0.4
P_SHOWN_IF_PATIENT_HAS = 0.9


def base_slice() -> tuple[Path, object]:
    """pydicom's real CT slice (path, dataset)."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(BASE_FILE)
    if path is None:
        raise DataError(f"semireal-ct needs pydicom's test file {BASE_FILE}, which this pydicom install lacks")
    return Path(path), pydicom.dcmread(path)


def _hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def render(
    hu0: np.ndarray, findings: np.ndarray, patient_rng: np.random.Generator, rng: np.random.Generator
) -> np.ndarray:
    """One image in HU: the patient's variant of the real slice with the given lesions (0/1 per CLASSES)."""
    hu = hu0[:, ::-1] if patient_rng.random() < 0.5 else hu0.copy()
    hu = np.roll(hu, tuple(patient_rng.integers(-6, 7, 2)), axis=(0, 1))
    tissue = (hu > -100) & (hu < 150)
    yy, xx = np.mgrid[0 : hu.shape[0], 0 : hu.shape[1]]
    candidates = np.argwhere(tissue)
    for j, shift in enumerate(((45, 70), (-60, -40))):
        if not findings[j]:
            continue
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(2, 7)
            for _ in range(50):  # a centre whose disc lies (mostly) in soft tissue
                cy, cx = candidates[rng.integers(len(candidates))]
                blob = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2) & tissue
                if blob.sum() >= 0.8 * np.pi * r**2:
                    break
            hu[blob] += rng.uniform(*shift)
    hu = hu + rng.normal(0, 8 + 4 * patient_rng.random(), hu.shape)
    return hu


def _write_dicom(template, hu: np.ndarray, path: Path, uid_seed: str) -> None:
    from pydicom.uid import generate_uid

    ds = copy.deepcopy(template)
    raw = np.round((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    info = np.iinfo(ds.pixel_array.dtype)
    ds.PixelData = np.clip(raw, info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[uid_seed])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path)


@register_dataset("semireal-ct", phantom=True)
def prepare_semireal_ct(spec, storage: Path) -> PreparedDataset:
    ph = spec.phantom or PhantomSpec()
    base_path, template = base_slice()
    base_sha = sha256_file(base_path)
    cfg = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": ph.seed,
        "n_patients": ph.n_patients,
        "per_patient": list(ph.images_per_patient),
        "base_sha256": base_sha,
    }
    root = (
        Path(storage) / "data" / GENERATOR / hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    )
    hu0 = _hu(template)

    def write(tmp: Path) -> None:
        rows = []
        for p in range(ph.n_patients):
            prng = np.random.default_rng([ph.seed, p])
            has = prng.random(len(CLASSES)) < PATIENT_PREVALENCE
            for i in range(int(prng.integers(ph.images_per_patient[0], ph.images_per_patient[1] + 1))):
                rng = np.random.default_rng([ph.seed, p, i])
                shown = has & (rng.random(len(CLASSES)) < P_SHOWN_IF_PATIENT_HAS)
                sid = f"P{p:04d}_{i}"
                _write_dicom(
                    template,
                    render(hu0, shown, np.random.default_rng([ph.seed, p, 999]), rng),
                    tmp / f"{sid}.dcm",
                    f"{GENERATOR}-{ph.seed}-{sid}",
                )
                rows.append(
                    {
                        "sample_id": sid,
                        "patient_id": f"P{p:04d}",
                        "path": f"{sid}.dcm",
                        **dict(zip(CLASSES, shown.astype(int))),
                    }
                )
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
        (tmp / "SEMI-SYNTHETIC.txt").write_text(
            f"Synthetic lesions ({GENERATOR} v{VERSION}, seed {ph.seed}) inserted into pydicom's real {BASE_FILE} "
            f"(sha256 {base_sha}). The anatomy is one real slice; the labels are synthetic. Not patient data.\n"
        )

    atomic_dir(root, write)
    df = pd.read_csv(root / "manifest.csv", dtype={"sample_id": str, "patient_id": str})
    df["path"] = [str(root / p) for p in df["path"]]
    df["split"] = assign_patient_splits(
        df["patient_id"], spec.split.val_fraction, spec.split.test_fraction, spec.split.seed
    )
    return PreparedDataset(
        name=spec.name,
        task="multilabel",
        classes=list(CLASSES),
        manifest=df,
        root=root,
        provenance=data_tags(
            SEMI_SYNTHETIC,
            spec.name,
            generator=f"{GENERATOR} v{VERSION}",
            seed=ph.seed,
            base=f"pydicom {BASE_FILE} sha256:{base_sha[:16]}",
        ),
    )
