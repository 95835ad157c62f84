"""RSNA Pneumonia Detection Challenge replica (Kaggle, stage 2), with MGCA's split lists.

Written under ``root``::

    stage_2_train_labels.csv            patientId,x,y,width,height,Target   (one row per box; no box: empty x..height)
    stage_2_detailed_class_info.csv     patientId,class   (Lung Opacity | Normal | No Lung Opacity / Not Normal)
    stage_2_train_images/<patientId>.dcm
    train.csv, val.csv, test.csv        MGCA's split (Wang et al. 2022: 70 / 15 / 15 by patientId), as its
                                        preprocessing writes them beside the labels

DICOM: CR, MONOCHROME2, 8 bits stored, RescaleSlope / RescaleIntercept present (1 / 0 as in the Kaggle files'
convention of stored values), PatientID = the file's patientId, a UUID.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import grey_image, truncate

N = 60  # patients (one image each; the real stage 2 train set: 26,684)
SIZE = 128  # px (real: 1024)


def _write_dicom(path: Path, pixels: np.ndarray, patient: str, rng) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID = ds.PatientName = patient
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.ViewPosition = "PA" if rng.random() < 0.55 else "AP"
    ds.PatientSex, ds.PatientAge = ("M" if rng.random() < 0.57 else "F"), f"{int(rng.integers(18, 90)):03d}Y"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
    ds.PixelSpacing = [0.168, 0.168]
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@register_replica("rsna-pneumonia", variants=("corrupt_file", "bad_label"))
def write_rsna(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    images = root / "stage_2_train_images"
    images.mkdir(parents=True, exist_ok=True)
    labels, info, ids = [], [], []
    for _ in range(N):
        pid = str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4))
        target = int(rng.random() < 0.3)
        _write_dicom(images / f"{pid}.dcm", grey_image(rng, SIZE, bool(target)), pid, rng)
        if target:
            for _ in range(int(rng.integers(1, 3))):  # one or two boxes: one row each
                x, y = (float(v) for v in rng.integers(100, 600, 2))
                labels.append([pid, x, y, float(rng.integers(100, 300)), float(rng.integers(100, 400)), 1])
            info.append([pid, "Lung Opacity"])
        else:
            labels.append([pid, None, None, None, None, 0])
            info.append([pid, "Normal" if rng.random() < 0.5 else "No Lung Opacity / Not Normal"])
        ids.append(pid)
    broken = None
    if variant == "bad_label":
        labels[4][5] = 2
        broken = f"stage_2_train_labels.csv line 6 ({labels[4][0]}): Target=2"
    cols = ["patientId", "x", "y", "width", "height", "Target"]
    table = pd.DataFrame(labels, columns=cols)
    table.to_csv(root / "stage_2_train_labels.csv", index=False)
    pd.DataFrame(info, columns=["patientId", "class"]).to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    order = rng.permutation(ids)
    n_train, n_val = int(0.7 * N), int(0.15 * N)
    for name, part in (
        ("train.csv", order[:n_train]),
        ("val.csv", order[n_train : n_train + n_val]),
        ("test.csv", order[n_train + n_val :]),
    ):  # MGCA writes the label rows of its patients (with its own extra columns)
        rows = table[table["patientId"].isin(set(part))].assign(Path=lambda d: "stage_2_train_images/" + d.patientId)
        rows.to_csv(root / name)
    if variant == "corrupt_file":
        broken = truncate(images / f"{ids[0]}.dcm")
    return Replica(
        root=root,
        dataset="rsna-pneumonia",
        reproduces=[
            "stage_2_train_labels.csv (patientId,x,y,width,height,Target; one row per box, several boxes per "
            "positive image), stage_2_detailed_class_info.csv",
            "stage_2_train_images/<patientId>.dcm: CR, MONOCHROME2, 8 bits, rescale slope / intercept, UUID ids",
            "MGCA's train.csv / val.csv / test.csv split lists (70/15/15 by patientId)",
        ],
        leaves_out=[
            f"{N} images at {SIZE} px (real: 26,684 at 1024 px); stage_2_test_images (unlabelled)",
            "real radiographs (a blob marks an opacity, the boxes are not drawn)",
        ],
        broken=broken,
    )
