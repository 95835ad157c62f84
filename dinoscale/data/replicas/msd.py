"""Medical Segmentation Decathlon replicas: ``TaskXX_Name/`` exactly as the Decathlon tarballs unpack.

What a task folder holds (Antonelli et al. 2022; every task the same):

    TaskXX_Name/dataset.json   name, description, reference, licence, release, tensorImageSize ("3D" / "4D"),
                               modality {"0": "FLAIR", ...}, labels {"0": "background", ...}, numTraining,
                               numTest, training [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                               test ["./imagesTs/y.nii.gz", ...]
    TaskXX_Name/imagesTr/*.nii.gz, labelsTr/*.nii.gz, imagesTs/*.nii.gz
    (and the tarballs' macOS ``._*`` resource-fork files beside them, which are not NIfTI)

Task01_BrainTumour: 4-channel MRI (x, y, z, 4) float32 in the modality order FLAIR, T1w, t1gd, T2w on BraTS'
1 mm grid, labels 0-3 (edema, non-enhancing tumour, enhancing tumour) uint8, case names ``BRATS_NNN``.
Task09_Spleen (and the other CT tasks): single-channel CT int16 in HU, stored in LPS (negative x / y in the
affine) with in-plane spacing 0.6-1.0 mm and slices 1.5-8 mm thick, every case its own shape; labels 0/1,
case names ``spleen_N`` with gaps in the numbering.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dinoscale.data.replicas import Replica, ellipsoid, register_replica, save_nifti

# The published dataset.json header fields of the tasks a replica writes (the real files' values).
TASKS = {
    "Task01_BrainTumour": {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "relase": "2.0 04/05/2018",  # sic: the published file spells it so
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    },
    "Task09_Spleen": {
        "name": "Spleen",
        "description": "Spleen Segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 06/08/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
    },
}
_CASE = {"Task01_BrainTumour": "BRATS_{:03d}", "Task09_Spleen": "spleen_{}"}
N_TRAIN, N_TEST = 20, 2  # enough cases for 5 folds of 3 train/val cases after a test share of 20 %


def _brain_case(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (x, y, z, 4) float32, label (x, y, z) uint8, affine): BraTS' 1 mm grid, shrunk to 24 x 24 x 16."""
    shape = (24, 24, 16)
    brain = ellipsoid(shape, (11.5, 11.5, 7.5), (10.5, 11, 7))
    c = rng.uniform([8, 8, 5], [15, 15, 10])
    edema = ellipsoid(shape, c, (5, 5, 3.5)) & brain
    core = ellipsoid(shape, c, (3, 3, 2.2)) & brain
    enh = core & ~ellipsoid(shape, c, (1.8, 1.8, 1.3))
    label = np.zeros(shape, np.uint8)
    label[edema] = 1
    label[core] = 2
    label[enh] = 3
    # Sequence contrasts: FLAIR bright in edema, t1gd bright in the enhancing rim, T2 bright in edema and core.
    contrast = {
        "FLAIR": (300, 600, 450, 420),
        "T1w": (400, 350, 330, 360),
        "t1gd": (420, 380, 360, 900),
        "T2w": (350, 700, 750, 600),
    }
    img = np.zeros((*shape, 4), np.float32)
    for k, (tissue, ed, nc, en) in enumerate(contrast.values()):
        ch = np.where(brain, tissue, 0.0).astype(np.float32)
        ch[label == 1], ch[label == 2], ch[label == 3] = ed, nc, en
        img[..., k] = ch + rng.normal(0, 15, shape) * brain
    return img, label, np.diag([1.0, 1.0, 1.0, 1.0])


def _ct_case(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16 HU, label uint8, affine LPS): its own in-plane size, in-plane spacing and slice thickness."""
    side = int(rng.choice([28, 32, 36]))
    depth = int(rng.integers(8, 15))
    sxy = float(rng.uniform(0.6, 1.0))
    sz = float(rng.choice([1.5, 2.5, 5.0]))
    # a field of view ~ side * sxy mm: the spleen ~ 30 % of it in-plane and a third of the depth
    shape = (side, side, depth)
    body = ellipsoid(shape, ((side - 1) / 2, (side - 1) / 2, (depth - 1) / 2), (side * 0.45, side * 0.4, depth))
    c = ((side - 1) * rng.uniform(0.6, 0.7), (side - 1) * rng.uniform(0.35, 0.5), (depth - 1) * rng.uniform(0.4, 0.6))
    spleen = ellipsoid(shape, c, (side * 0.14, side * 0.1, max(2.0, depth * 0.3))) & body
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[spleen] = 120.0  # contrast-enhanced parenchyma
    hu += rng.normal(0, 12, shape)
    affine = np.diag([-sxy, -sxy, sz, 1.0])  # the files are stored LPS: the reader reorients to RAS
    affine[:3, 3] = [side * sxy / 2, side * sxy / 2, -depth * sz]
    return np.round(hu).astype(np.int16), spleen.astype(np.uint8), affine


def _ids(task: str, n: int, rng) -> list[int]:
    if task == "Task09_Spleen":  # the published numbering has gaps (spleen_2, spleen_3, spleen_6, ...)
        return sorted(rng.choice(np.arange(2, 4 * n), size=n, replace=False).tolist())
    return list(range(1, n + 1))


@register_replica("msd")
def write_msd(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    """A Decathlon task folder under ``root`` (``dataset.root``) for ``spec.subset`` (default Task09_Spleen)."""
    task = spec.subset or "Task09_Spleen"
    if task not in TASKS:
        raise ValueError(f"no MSD replica for '{task}' (replicas: {', '.join(TASKS)})")
    rng = np.random.default_rng(seed)
    tdir = Path(root) / task
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tdir / sub).mkdir(parents=True, exist_ok=True)
    make = _brain_case if task == "Task01_BrainTumour" else _ct_case
    ids = _ids(task, N_TRAIN + N_TEST, rng)
    names = [_CASE[task].format(i) for i in ids]
    train, test = names[:N_TRAIN], names[N_TRAIN:]
    broken = None
    for i, name in enumerate(names):
        img, lab, affine = make(rng)
        folder = "imagesTr" if name in train else "imagesTs"
        save_nifti(tdir / folder / f"{name}.nii.gz", img, affine)
        if name in train:
            if variant == "bad_label" and i == 1:
                lab = lab.copy()
                lab[lab > 0] = len(TASKS[task]["labels"]) + 2  # a value dataset.json does not list
                broken = f"{tdir / 'labelsTr' / name}.nii.gz: label {int(lab.max())} not in dataset.json labels"
            if variant == "mask_shape" and i == 2:
                lab = lab[:-3]
                broken = f"{tdir / 'labelsTr' / name}.nii.gz: shape {lab.shape} differs from its image"
            save_nifti(tdir / "labelsTr" / f"{name}.nii.gz", lab, affine)
        # the tarballs carry macOS resource forks beside the volumes (AppleDouble, not NIfTI)
        if i < 2:
            (tdir / folder / f"._{name}.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    if variant == "corrupt_file":
        bad = tdir / "imagesTr" / f"{train[0]}.nii.gz"
        bad.write_bytes(bad.read_bytes()[:200])  # a truncated download
        broken = f"{bad}: truncated gzip"
    meta = {
        **TASKS[task],
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in train],
        "test": [f"./imagesTs/{n}.nii.gz" for n in test],
    }
    (tdir / "dataset.json").write_text(json.dumps(meta, indent=4))
    what = (
        "4-channel (x, y, z, 4) float32 MRI in the order FLAIR, T1w, t1gd, T2w; labels 0-3 uint8; 1 mm grid"
        if task == "Task01_BrainTumour"
        else "int16 CT in HU stored LPS; in-plane 0.6-1.0 mm, slices 1.5 / 2.5 / 5 mm; every case its own shape"
    )
    return Replica(
        root=Path(root),
        dataset="msd",
        subset=task,
        broken=broken,
        reproduces=[
            f"{task}/dataset.json with the published keys and values (modality, labels, numTraining, training, test)",
            "imagesTr / labelsTr / imagesTs NIfTI (.nii.gz, qform and sform set), case names as published",
            what,
            "macOS ._* resource-fork files beside the volumes, as in the tarballs",
        ],
        leaves_out=[
            f"size: {N_TRAIN} training cases of ~24-36 px in-plane and 8-16 slices (published: "
            + ("484 cases of 240 x 240 x 155" if task == "Task01_BrainTumour" else "41 cases of 512 x 512 x 31-168")
            + ")",
            "anatomy: ellipsoids with the tissue contrasts, not patients",
        ],
    )
