"""CAMUS replica: the public NIfTI release (``CAMUS_public/``) as it unpacks, written small.

What the release holds (Leclerc et al. 2019; the 2023 NIfTI re-release, 500 patients):

    database_nifti/patient0001 ... patient0500/
        Info_2CH.cfg, Info_4CH.cfg      'key: value' lines: ED, ES, NbFrame, Sex, Age, ImageQuality, EF, FrameRate
        patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz       grey B-mode frame, uint8, stored (width, height), spacing in mm
        patientNNNN_{2CH,4CH}_{ED,ES}_gt.nii.gz    labels 0 background, 1 LV cavity, 2 myocardium, 3 left atrium
        patientNNNN_{2CH,4CH}_half_sequence.nii.gz (+ _gt)   the ED -> ES cine, (width, height, frames)
    database_split/subgroup_{training,validation,testing}.txt   one patient folder name per line

The replica's frames are echo-like phantoms (``echo_pair``): a sector of speckled tissue, a dark LV cavity and
left atrium inside a bright myocardium, 64 x 64 px; each ES frame is its ED frame under a known smooth
deformation (a contraction towards the LV), so ED -> ES registration has a known answer.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dinoscale.data.replicas import Replica, register_replica, save_nifti

N_PATIENTS = 12
SPLIT = {"training": range(1, 9), "validation": range(9, 11), "testing": range(11, 13)}
VIEWS = ("2CH", "4CH")
SIZE = 64
SPACING = (0.308, 0.154)  # mm per px along the file's (width, height) axes: the release's typical pixel
STRUCTURES = {1: "LV", 2: "myocardium", 3: "left atrium"}


def _ellipse(shape, centre, radii) -> np.ndarray:
    r, c = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    return ((r - centre[0]) / radii[0]) ** 2 + ((c - centre[1]) / radii[1]) ** 2 <= 1.0


def es_anatomy(rng, size: int = SIZE) -> np.ndarray:
    """An apical view's label map (rows, cols) at end-systole: apex at the top, the LV cavity inside the
    myocardium (open at the base), the left atrium below."""
    s = size / 64.0
    cr, cc = (24 + rng.uniform(-2, 2)) * s, (32 + rng.uniform(-2, 2)) * s
    lv = _ellipse((size, size), (cr, cc), (11 * s * rng.uniform(0.9, 1.1), 6.5 * s * rng.uniform(0.9, 1.1)))
    wall = _ellipse((size, size), (cr, cc), (15 * s, 10 * s)) & ~lv
    wall[int(cr + 9 * s) :] = False  # the base of the ventricle is open to the valve plane
    la = _ellipse((size, size), (cr + 20 * s, cc), (6.5 * s, 7 * s)) & ~lv & ~wall
    label = np.zeros((size, size), np.uint8)
    label[lv], label[wall], label[la] = 1, 2, 3
    return label


def contraction(label: np.ndarray, rng, strength: float = 0.22) -> np.ndarray:
    """A smooth displacement (2, rows, cols) in px pointing towards the LV centre inside a Gaussian window around
    it, plus a small smooth random field: ED(x) = ES(x + u(x)) makes the ED heart the larger one."""
    size = label.shape[0]
    r, c = np.mgrid[:size, :size].astype(np.float64)
    cr, cc = np.argwhere(label == 1).mean(0)
    window = np.exp(-(((r - cr) ** 2 + (c - cc) ** 2) / (2 * (0.3 * size) ** 2)))
    u = np.stack([-(r - cr), -(c - cc)]) * strength * window
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (2, size, size)), sigma=(0, size / 8, size / 8))
    return u + noise / (np.abs(noise).max() + 1e-9) * 0.5


def warp_np(x: np.ndarray, u: np.ndarray, order: int) -> np.ndarray:
    """``x`` sampled at identity + ``u`` (px), border values outside: order 0 for labels, 1 for images."""
    r, c = np.mgrid[: x.shape[0], : x.shape[1]].astype(np.float64)
    return ndimage.map_coordinates(x, [r + u[0], c + u[1]], order=order, mode="nearest")


def echo_image(label: np.ndarray, rng) -> np.ndarray:
    """A B-mode-like frame (uint8) of a label map: a sector of speckled tissue, bright myocardium, dark cavities."""
    size = label.shape[0]
    r, c = np.mgrid[:size, :size].astype(np.float64)
    sector = np.abs(np.arctan2(c - size / 2, r + 2)) < 0.6
    mean = np.choose(label, [0.45, 0.08, 0.85, 0.1])
    img = ndimage.gaussian_filter(mean, 1.0) * rng.rayleigh(0.8, label.shape) * sector
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def echo_pair(rng, size: int = SIZE) -> dict[str, np.ndarray]:
    """One ED -> ES pair with its known answer: ``ed``/``es`` images, ``ed_gt``/``es_gt`` label maps and ``u``
    (2, rows, cols), the displacement in px with ED = ES(x + u(x)): registering moving ES onto fixed ED recovers u."""
    es_gt = es_anatomy(rng, size)
    u = contraction(es_gt, rng)
    ed_gt = warp_np(es_gt, u, order=0).astype(np.uint8)
    speckle = np.random.default_rng(rng.integers(1 << 31))
    es = echo_image(es_gt, speckle)
    ed = np.clip(warp_np(es.astype(np.float64), u, order=1), 0, 255).astype(np.uint8)
    return {"ed": ed, "es": es, "ed_gt": ed_gt, "es_gt": es_gt, "u": u}


def _nii(path: Path, rows_cols: np.ndarray) -> None:
    """A frame stored as the release stores it: (width, height[, frames]), the pixel spacing in the header."""
    arr = np.swapaxes(rows_cols, 0, 1)
    save_nifti(path, np.ascontiguousarray(arr), np.diag([*SPACING, 1.0, 1.0]))


def _info(rng, frames: int) -> str:
    sex, quality = rng.choice(["M", "F"]), rng.choice(["Good", "Medium", "Poor"])
    return (
        f"ED: 1\nES: {frames}\nNbFrame: {frames}\nSex: {sex}\nAge: {int(rng.integers(20, 90))}\n"
        f"ImageQuality: {quality}\nEF: {int(rng.integers(25, 70))}\nFrameRate: {rng.uniform(25, 60):.1f}\n"
    )


def _write_patient(folder: Path, name: str, rng) -> None:
    folder.mkdir(parents=True)
    frames = 4
    for view in VIEWS:
        p = echo_pair(rng)
        (folder / f"Info_{view}.cfg").write_text(_info(rng, frames))
        for phase in ("ED", "ES"):
            _nii(folder / f"{name}_{view}_{phase}.nii.gz", p[phase.lower()])
            _nii(folder / f"{name}_{view}_{phase}_gt.nii.gz", p[f"{phase.lower()}_gt"])
        # the cine from ED to ES: frame t is ES warped by (1 - t / (frames - 1)) of the known deformation
        ts = np.linspace(1.0, 0.0, frames)
        seq = np.stack([warp_np(p["es"].astype(np.float64), p["u"] * t, 1) for t in ts], -1)
        seq_gt = np.stack([warp_np(p["es_gt"], p["u"] * t, 0) for t in ts], -1)
        _nii(folder / f"{name}_{view}_half_sequence.nii.gz", np.clip(seq, 0, 255).astype(np.uint8))
        _nii(folder / f"{name}_{view}_half_sequence_gt.nii.gz", seq_gt.astype(np.uint8))


def _break(root: Path, variant: str) -> str:
    name = "patient0011"
    folder = root / "database_nifti" / name
    if variant == "corrupt_file":
        path = folder / f"{name}_2CH_ES.nii.gz"
        path.write_bytes(b"\x1f\x8b not a NIfTI file")
        return str(path)
    path = folder / f"{name}_4CH_ED_gt.nii.gz"
    gt = np.swapaxes(np.asarray(nib.load(str(path)).dataobj), 0, 1).copy()
    if variant == "bad_label":
        gt[SIZE // 2, SIZE // 2] = 5
    else:  # mask_shape
        gt = gt[:-8]
    _nii(path, gt)
    return str(path)


@register_replica("camus")
def write_camus(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    """The CAMUS release under ``root`` (``dataset.root``): 12 patients, both apical views, ED / ES frames and
    label maps, the half-sequence cines, the Info files and the official split lists."""
    rng = np.random.default_rng(seed)
    split_dir = root / "database_split"
    split_dir.mkdir(parents=True, exist_ok=True)
    for group, ids in SPLIT.items():
        (split_dir / f"subgroup_{group}.txt").write_text("".join(f"patient{i:04d}\n" for i in ids))
    for i in range(1, N_PATIENTS + 1):
        _write_patient(root / "database_nifti" / f"patient{i:04d}", f"patient{i:04d}", rng)
    broken = _break(root, variant) if variant != "ok" else None
    return Replica(
        root,
        "camus",
        reproduces=[
            "database_nifti/patientNNNN/ folders with Info_{2CH,4CH}.cfg (ED, ES, NbFrame, Sex, Age, ImageQuality, "
            "EF, FrameRate)",
            "patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz and _gt.nii.gz: uint8, stored (width, height), pixel spacing in the "
            "header; labels 0-3 (background, LV, myocardium, left atrium)",
            "patientNNNN_{2CH,4CH}_half_sequence.nii.gz (+ _gt): (width, height, frames), ED to ES",
            "database_split/subgroup_{training,validation,testing}.txt (one patient folder per line)",
        ],
        leaves_out=[
            "500 patients (12 here: 8 / 2 / 2), native sizes of ~500-1100 px per side (64 x 64 here) and the "
            "real per-patient spacing",
            "ultrasound content: the frames are speckled phantoms whose ES frame is a known smooth deformation "
            "of the ED frame",
            "cines of their real length (4 frames here)",
        ],
        broken=broken,
    )
