"""Medical Segmentation Decathlon replicas: ``TaskXX_Name/`` exactly as the Decathlon tarballs unpack, for any
of the ten tasks (``dataset.subset``).

What a task folder holds (Antonelli et al. 2022; every task the same):

    TaskXX_Name/dataset.json   name, description, reference, licence, release, tensorImageSize ("3D" / "4D"),
                               modality {"0": "FLAIR", ...}, labels {"0": "background", ...}, numTraining,
                               numTest, training [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                               test ["./imagesTs/y.nii.gz", ...]
    TaskXX_Name/imagesTr/*.nii.gz, labelsTr/*.nii.gz, imagesTs/*.nii.gz
    (and the tarballs' macOS ``._*`` resource-fork files beside them, which are not NIfTI)

Per task (``TASKS``: each dataset.json's header as published; ``GRIDS``: its voxel grid; ``_CASE``: its file
names):

- Task01_BrainTumour: 4-channel MRI (x, y, z, 4) float32 in the modality order FLAIR, T1w, t1gd, T2w on BraTS'
  1 mm grid, labels 0-3 (edema, non-enhancing tumour, enhancing tumour) uint8, case names ``BRATS_NNN``.
- Task02_Heart: mono-modal MRI (left atrium), 1.25 x 1.25 x 1.37 mm, ``la_NNN`` (the published numbers).
- Task03_Liver: portal-venous CT (LiTS), liver and cancer, ``liver_N`` numbered from 0 without padding.
- Task04_Hippocampus: mono-modal T1 MRI crops around the hippocampus at 1 mm, Anterior / Posterior,
  ``hippocampus_NNN``.
- Task05_Prostate: 2-channel MRI (x, y, z, 2) in the order T2, ADC, ~0.6 mm in-plane x 3.6-4 mm slices, PZ / TZ,
  ``prostate_NN``.
- Task06_Lung, Task07_Pancreas, Task08_HepaticVessel, Task09_Spleen, Task10_Colon: single-channel CT int16 in HU,
  stored in LPS (negative x / y in the affine), every case its own shape, in-plane spacing and slice thickness;
  ``lung_NNN``, ``pancreas_NNN``, ``hepaticvessel_NNN``, ``spleen_N``, ``colon_NNN`` with gaps in the numbering.

Sources (checked with the code search): the labels and modality of every task as each dataset.json states them
(copies of the published files and loaders that quote them: nnU-Net's dataset-format docs for Task05 in full,
MSD readers quoting Task04's, Task07's and Task08's headers, a MSD label map listing all ten); the median voxel
spacings of each task are nnU-Net's fingerprints as MONAI's DynUNet MSD pipeline quotes them (task_params.py:
02 [1.37, 1.25, 1.25], 03 [1, 0.77, 0.77], 04 [1, 1, 1], 05 [3.6, 0.62, 0.62], 06 [1.24, 0.79, 0.79],
07 [2.5, 0.8, 0.8], 08 [1.5, 0.8, 0.8], 09 [1.6, 0.79, 0.79], 10 [3, 0.78, 0.78] in z, y, x; for 08 and 10 the
target is below the median slice thickness, nnU-Net's rule for anisotropic data). Not verified and marked so
below: the header strings (name, description, reference, release) of Task02, Task03, Task06 and Task10, the
ranges of in-plane spacing and slice thickness around those medians, the image dtypes of the MRI tasks other
than Task01, and the case numbers other than Task02's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinoscale.data.replicas import Replica, ellipsoid, register_replica, save_nifti

_MSD = {"licence": "CC-BY-SA 4.0"}
# The published dataset.json header fields of each task (the real files' values; "relase" is the files' spelling
# where they spell it so). Unverified header strings are marked; labels and modality are verified for all ten.
TASKS = {
    "Task01_BrainTumour": {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        **_MSD,
        "relase": "2.0 04/05/2018",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
    },
    "Task02_Heart": {  # name / description / reference / release: not verified (labels, modality: verified)
        "name": "LeftAtrium",
        "description": "Left atrium segmentation",
        "reference": "King’s College London",
        **_MSD,
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
    },
    "Task03_Liver": {  # name / description / reference / release: not verified (labels, modality: verified)
        "name": "LITS",
        "description": "Liver and liver tumor segmentation",
        "reference": "https://competitions.codalab.org/competitions/17094",
        **_MSD,
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
    },
    "Task04_Hippocampus": {
        "name": "Hippocampus",
        "description": "Left and right hippocampus segmentation",
        "reference": " Vanderbilt University Medical Center",  # sic: the leading space is the file's
        **_MSD,
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
    },
    "Task05_Prostate": {
        "name": "PROSTATE",
        "description": "Prostate transitional zone and peripheral zone segmentation",
        "reference": "Radboud University, Nijmegen Medical Centre",
        **_MSD,
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "4D",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
    },
    "Task06_Lung": {  # name / description / reference / release: not verified (labels, modality: verified)
        "name": "Lung",
        "description": "Lung and cancer segmentation",
        "reference": "The Cancer Imaging Archive",
        **_MSD,
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "cancer"},
    },
    "Task07_Pancreas": {
        "name": "Pancreas",
        "description": "Pancreas and cancer segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center ",  # sic: the trailing space is the file's
        **_MSD,
        "relase": "1.0 04/05/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
    },
    "Task08_HepaticVessel": {
        "name": "HepaticVessel",
        "description": "Hepatic Vessels and Tumour Segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center",
        **_MSD,
        "release": "1.1 14/08/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "Vessel", "2": "Tumour"},
    },
    "Task09_Spleen": {
        "name": "Spleen",
        "description": "Spleen Segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center",
        **_MSD,
        "release": "1.0 06/08/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
    },
    "Task10_Colon": {  # name / description / reference / release: not verified (labels, modality: verified)
        "name": "Colon",
        "description": "Colon cancer segmentation",
        "reference": "Memorial Sloan Kettering Cancer Center",
        **_MSD,
        "release": "1.0 06/08/2018",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "colon cancer primaries"},
    },
}
_CASE = {
    "Task01_BrainTumour": "BRATS_{:03d}",
    "Task02_Heart": "la_{:03d}",
    "Task03_Liver": "liver_{}",
    "Task04_Hippocampus": "hippocampus_{:03d}",
    "Task05_Prostate": "prostate_{:02d}",
    "Task06_Lung": "lung_{:03d}",
    "Task07_Pancreas": "pancreas_{:03d}",
    "Task08_HepaticVessel": "hepaticvessel_{:03d}",
    "Task09_Spleen": "spleen_{}",
    "Task10_Colon": "colon_{:03d}",
}
# Task02_Heart's published case numbers (training, then test): la_003 ... la_030, la_001 ... la_028.
_HEART_IDS = (
    (3, 4, 5, 7, 9, 10, 11, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24, 26, 29, 30),
    (1, 2, 6, 8, 12, 13, 15, 25, 27, 28),
)


@dataclass(frozen=True)
class Grid:
    """A task's voxel grid as published (``in_plane`` mm range, ``slices`` mm thicknesses, LPS or RAS storage)
    and the replica's shrunk extent (``side`` in-plane sizes, ``aspect`` y / x, ``depth`` slices lo-hi)."""

    in_plane: tuple[float, float]
    slices: tuple[float, ...]
    lps: bool
    side: tuple[int, ...]
    depth: tuple[int, int]
    aspect: float = 1.0

    def draw(self, rng) -> tuple[tuple[int, int, int], np.ndarray]:
        """(shape, affine) of one case: its own size, in-plane spacing and slice thickness."""
        side = int(rng.choice(self.side))
        shape = (side, max(4, round(side * self.aspect)), int(rng.integers(self.depth[0], self.depth[1] + 1)))
        lo, hi = self.in_plane
        sxy = float(rng.uniform(lo, hi)) if hi > lo else lo
        sz = float(rng.choice(self.slices))
        if not self.lps:
            return shape, np.diag([sxy, sxy, sz, 1.0])
        affine = np.diag([-sxy, -sxy, sz, 1.0])  # stored LPS: the reader reorients to RAS
        affine[:3, 3] = [shape[0] * sxy / 2, shape[1] * sxy / 2, -shape[2] * sz]
        return shape, affine


_CT = {"lps": True, "side": (20, 24, 28), "depth": (6, 10)}
# Medians: nnU-Net's fingerprints (module docstring); ranges around them and the thickness mix: not verified (Task08 /
# Task10 draw 5 mm twice: their median slice is thicker than nnU-Net's target, so most cases are thick-sliced).
# Task01 / Task09: the grids their writers (_brain_case, _ct_case) have always used, described here for the tests.
GRIDS = {
    "Task01_BrainTumour": Grid((1.0, 1.0), (1.0,), False, (24,), (16, 16)),
    "Task02_Heart": Grid((1.25, 1.25), (1.37,), False, (20, 24), (8, 10)),
    "Task03_Liver": Grid((0.6, 0.98), (0.7, 1.0, 2.5), **_CT),
    "Task04_Hippocampus": Grid((1.0, 1.0), (1.0,), False, (12, 14), (8, 10), aspect=1.4),
    "Task05_Prostate": Grid((0.6, 0.625), (3.6, 4.0), False, (20, 24), (6, 8)),
    "Task06_Lung": Grid((0.6, 0.98), (0.625, 1.25, 2.5), **_CT),
    "Task07_Pancreas": Grid((0.6, 0.98), (1.5, 2.5, 5.0), **_CT),
    "Task08_HepaticVessel": Grid((0.6, 0.98), (1.5, 5.0, 5.0), **_CT),
    "Task09_Spleen": Grid((0.6, 1.0), (1.5, 2.5, 5.0), True, (28, 32, 36), (8, 14)),
    "Task10_Colon": Grid((0.6, 0.98), (1.5, 5.0, 5.0), **_CT),
}
# Cases written (training, test): Task01 / Task09 enough for 5 folds of 3 train/val cases after a test share of
# 20 %; the others the fewest that still give every fold a validation case and a test split of 2.
_SIZES = {"Task01_BrainTumour": (20, 2), "Task09_Spleen": (20, 2)}
_DEFAULT_SIZE = (10, 2)


# ---------------------------------------------------------------- the cases: ellipsoids with the tissue contrasts


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
    """Task09: (image int16 HU, label uint8, affine LPS): its own in-plane size, in-plane spacing and slice
    thickness."""
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


def _at(shape, rng, lo, hi) -> np.ndarray:
    """A point drawn between the fractions ``lo`` and ``hi`` of each axis."""
    return (np.asarray(shape, float) - 1) * rng.uniform(lo, hi)


def _r(shape, fractions, least: float = 1.5) -> tuple[float, ...]:
    """Radii as fractions of each axis, never below ``least`` voxels (every structure in every case)."""
    return tuple(max(least, n * f) for n, f in zip(shape, fractions))


def _ct_abdomen(shape, rng, organs, noise: float = 12.0):
    """(HU int16, label uint8): air, a soft-tissue body (40 HU), then ``organs`` [(mask, HU, label or 0)]."""
    body = ellipsoid(shape, [(n - 1) / 2 for n in shape], (shape[0] * 0.47, shape[1] * 0.42, shape[2] * 2))
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    label = np.zeros(shape, np.uint8)
    for mask, value, lab in organs:
        hu[mask & body] = value
        if lab:
            label[mask & body] = lab
    hu += rng.normal(0, noise, shape)
    return np.round(hu).astype(np.int16), label


def _liver(shape, rng):
    """Liver (60 HU, label 1) with a hypodense cancer (25 HU, label 2) inside it."""
    liver = ellipsoid(shape, _at(shape, rng, [0.3, 0.4, 0.45], [0.38, 0.5, 0.55]), _r(shape, (0.24, 0.26, 0.45)))
    c = np.argwhere(liver)[rng.integers(liver.sum())]
    cancer = ellipsoid(shape, c, _r(shape, (0.07, 0.07, 0.15), 1.2)) & liver
    return _ct_abdomen(shape, rng, [(liver, 60.0, 1), (cancer, 25.0, 2)])


def _lung(shape, rng):
    """Two aerated lungs (-850 HU) and a solid cancer (30 HU, label 1) in one of them."""
    lungs = [
        ellipsoid(shape, (shape[0] * f, shape[1] * 0.48, shape[2] / 2), _r(shape, (0.17, 0.3, 0.6))) for f in (0.3, 0.7)
    ]
    side = lungs[int(rng.integers(2))]
    c = np.argwhere(side)[rng.integers(side.sum())]
    cancer = ellipsoid(shape, c, _r(shape, (0.07, 0.07, 0.15), 1.2)) & side
    return _ct_abdomen(shape, rng, [(lungs[0], -850.0, 0), (lungs[1], -850.0, 0), (cancer, 30.0, 1)])


def _pancreas(shape, rng):
    """An elongated pancreas (100 HU, label 1) with a hypodense cancer (50 HU, label 2) at its head."""
    c = _at(shape, rng, [0.45, 0.5, 0.45], [0.55, 0.6, 0.55])
    pancreas = ellipsoid(shape, c, _r(shape, (0.26, 0.08, 0.3)))
    head = ellipsoid(shape, (c[0] - shape[0] * 0.15, c[1], c[2]), _r(shape, (0.07, 0.07, 0.15), 1.2)) & pancreas
    return _ct_abdomen(shape, rng, [(pancreas, 100.0, 1), (head, 50.0, 2)])


def _hepatic_vessel(shape, rng):
    """A liver (60 HU, unlabelled), two contrast-filled vessels through it (180 HU, label 1), a tumour (30 HU,
    label 2)."""
    liver = ellipsoid(shape, _at(shape, rng, [0.3, 0.4, 0.45], [0.4, 0.5, 0.55]), _r(shape, (0.25, 0.28, 0.6)))
    xs, ys = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    vessels = np.zeros(shape, bool)
    for _ in range(2):
        c = np.argwhere(liver[..., shape[2] // 2])[rng.integers(liver[..., shape[2] // 2].sum())]
        vessels |= (((xs - c[0]) ** 2 + (ys - c[1]) ** 2) <= 1.5**2)[..., None] & liver
    c = np.argwhere(liver & ~vessels)[rng.integers((liver & ~vessels).sum())]
    tumour = ellipsoid(shape, c, _r(shape, (0.07, 0.07, 0.15), 1.2)) & liver & ~vessels
    return _ct_abdomen(shape, rng, [(liver, 60.0, 0), (vessels, 180.0, 1), (tumour, 30.0, 2)])


def _colon(shape, rng):
    """A gas-filled colon (-900 HU lumen) with a primary cancer in its wall (60 HU, label 1)."""
    c = _at(shape, rng, [0.55, 0.4, 0.45], [0.65, 0.5, 0.55])
    lumen = ellipsoid(shape, c, _r(shape, (0.09, 0.09, 0.6)))
    wall = ellipsoid(shape, c, _r(shape, (0.14, 0.14, 0.6))) & ~lumen
    tumour = wall & ellipsoid(shape, (c[0] + shape[0] * 0.1, c[1], c[2]), _r(shape, (0.08, 0.1, 0.2), 1.2))
    return _ct_abdomen(shape, rng, [(lumen, -900.0, 0), (wall, 45.0, 0), (tumour, 60.0, 1)])


def _mri(shape, rng, body, structures, noise: float = 15.0):
    """(float32 image, label uint8): ``body`` at 200, then ``structures`` [(mask, intensity, label or 0)]."""
    img = np.where(body, 200.0, 0.0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for mask, value, lab in structures:
        img[mask] = value
        if lab:
            label[mask] = lab
    return img + rng.normal(0, noise, shape).astype(np.float32) * body, label


def _heart(shape, rng):
    """A thorax with a bright blood pool: left ventricle (unlabelled) and left atrium (label 1)."""
    body = ellipsoid(shape, [(n - 1) / 2 for n in shape], (shape[0] * 0.48, shape[1] * 0.45, shape[2] * 2))
    la = ellipsoid(shape, _at(shape, rng, [0.45, 0.55, 0.45], [0.55, 0.62, 0.55]), _r(shape, (0.14, 0.1, 0.3)))
    lv = ellipsoid(shape, _at(shape, rng, [0.4, 0.3, 0.45], [0.5, 0.38, 0.55]), _r(shape, (0.15, 0.12, 0.35))) & ~la
    return _mri(shape, rng, body, [(lv, 480.0, 0), (la, 520.0, 1)])


def _hippocampus(shape, rng):
    """A crop of temporal lobe (grey 200, white matter 320) around a hippocampus (240) elongated front to back:
    its anterior half (head) label 1, posterior half (body and tail) label 2."""
    body = np.ones(shape, bool)
    white = ellipsoid(shape, (shape[0] * 0.8, shape[1] / 2, shape[2] / 2), _r(shape, (0.3, 0.6, 0.6)))
    c = _at(shape, rng, [0.4, 0.45, 0.4], [0.5, 0.55, 0.6])
    hip = ellipsoid(shape, c, _r(shape, (0.18, 0.38, 0.3)))
    ys = np.arange(shape[1])[None, :, None]
    return _mri(shape, rng, body, [(white, 320.0, 0), (hip & (ys >= c[1]), 240.0, 1), (hip & (ys < c[1]), 240.0, 2)])


def _prostate(shape, rng):
    """(x, y, z, 2) T2 and ADC: a prostate whose transition zone (label 2) sits anterior to the peripheral zone
    (label 1); PZ bright on T2 and ADC, TZ darker."""
    body = ellipsoid(shape, [(n - 1) / 2 for n in shape], (shape[0] * 0.48, shape[1] * 0.45, shape[2] * 2))
    c = _at(shape, rng, [0.45, 0.45, 0.45], [0.55, 0.55, 0.55])
    gland = ellipsoid(shape, c, _r(shape, (0.22, 0.18, 0.4)))
    tz = ellipsoid(shape, (c[0], c[1] + shape[1] * 0.05, c[2]), _r(shape, (0.14, 0.11, 0.35))) & gland
    pz = gland & ~tz
    t2, label = _mri(shape, rng, body, [(pz, 650.0, 1), (tz, 380.0, 2)])
    adc, _ = _mri(shape, rng, body, [(pz, 1600.0, 1), (tz, 1150.0, 2)], noise=40.0)
    return np.stack([t2, adc], axis=-1), label


_ANATOMY = {
    "Task02_Heart": _heart,
    "Task03_Liver": _liver,
    "Task04_Hippocampus": _hippocampus,
    "Task05_Prostate": _prostate,
    "Task06_Lung": _lung,
    "Task07_Pancreas": _pancreas,
    "Task08_HepaticVessel": _hepatic_vessel,
    "Task10_Colon": _colon,
}


def _case(task: str, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label uint8, affine) of one case of ``task`` on its own grid (``GRIDS``)."""
    if task == "Task01_BrainTumour":
        return _brain_case(rng)
    if task == "Task09_Spleen":
        return _ct_case(rng)
    shape, affine = GRIDS[task].draw(rng)
    img, label = _ANATOMY[task](shape, rng)
    return img, label, affine


def _ids(task: str, n_train: int, n_test: int, rng) -> list[int]:
    """Case numbers, training first."""
    n = n_train + n_test
    if task == "Task02_Heart":  # the published numbers
        return list(_HEART_IDS[0][:n_train]) + list(_HEART_IDS[1][:n_test])
    if task == "Task01_BrainTumour":
        return list(range(1, n + 1))
    if task == "Task03_Liver":  # liver_0, liver_1, ...
        return list(range(n))
    # the published numbering has gaps (spleen_2, spleen_3, spleen_6, ...; lung_001, lung_003, ...)
    return sorted(rng.choice(np.arange(2 if task == "Task09_Spleen" else 1, 4 * n), size=n, replace=False).tolist())


def _what(task: str) -> str:
    meta, grid = TASKS[task], GRIDS[task]
    channels = len(meta["modality"])
    if task == "Task01_BrainTumour":
        return "4-channel (x, y, z, 4) float32 MRI in the order FLAIR, T1w, t1gd, T2w; labels 0-3 uint8; 1 mm grid"
    if grid.lps:
        thick = " / ".join(f"{s:g}" for s in sorted(set(grid.slices)))
        return (
            f"int16 CT in HU stored LPS; in-plane {grid.in_plane[0]:g}-{grid.in_plane[1]:g} mm, slices {thick} mm; "
            "every case its own shape"
        )
    names = ", ".join(meta["modality"].values())
    form = f"{channels}-channel (x, y, z, {channels}) in the order {names}" if channels > 1 else f"mono-modal {names}"
    lo, hi = grid.in_plane
    plane = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    return f"{form} float32 MRI stored RAS; {plane} x {plane} x {' / '.join(f'{s:g}' for s in grid.slices)} mm voxels"


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
    n_train, n_test = _SIZES.get(task, _DEFAULT_SIZE)
    names = [_CASE[task].format(i) for i in _ids(task, n_train, n_test, rng)]
    train, test = names[:n_train], names[n_train:]
    broken = None
    for i, name in enumerate(names):
        img, lab, affine = _case(task, rng)
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
    return Replica(
        root=Path(root),
        dataset="msd",
        subset=task,
        broken=broken,
        reproduces=[
            f"{task}/dataset.json with the published keys and values (modality, labels, numTraining, training, test)",
            f"imagesTr / labelsTr / imagesTs NIfTI (.nii.gz, qform and sform set), case names as published "
            f"({_CASE[task].format(1)}, ...)",
            _what(task),
            "every structure of dataset.json's labels in every training case (uint8 label maps)",
            "macOS ._* resource-fork files beside the volumes, as in the tarballs",
        ],
        leaves_out=_leaves_out(task, n_train),
    )


def _leaves_out(task: str, n_train: int) -> list[str]:
    from dinoscale.data.adapters import MSD_PUBLISHED

    pub = MSD_PUBLISHED[task]
    grid = GRIDS[task]
    out = [
        f"size: {n_train} training cases of {min(grid.side)}-{max(grid.side)} px in-plane and {grid.depth[0]}-"
        f"{grid.depth[1]} slices (published: {pub.units:,} cases, median {pub.pixels[0]} x {pub.pixels[1]} x "
        f"{pub.per_unit} slices)",
        "anatomy: ellipsoids and tubes with the tissue contrasts, not patients",
    ]
    if task not in ("Task01_BrainTumour", "Task09_Spleen"):
        out.append(
            "the published spacing ranges and thickness mix (only each task's median spacing is verified, from "
            "nnU-Net's fingerprints); the published case numbers"
            + ("" if task != "Task02_Heart" else " beyond the first training and test cases")
        )
    if task in ("Task02_Heart", "Task03_Liver", "Task06_Lung", "Task10_Colon"):
        out.append("dataset.json's name / description / reference / release strings are not verified")
    if not grid.lps and task != "Task01_BrainTumour":
        out.append("the MRI files' stored dtype and orientation (written float32, RAS) are not verified")
    return out
