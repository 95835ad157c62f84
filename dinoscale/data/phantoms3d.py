"""Phantoms for the 3D and whole-slide modalities: deterministic, known ground truth, structures at
several scales (so that resolution and model size matter). Every result is tagged data.source=phantom.

- ``phantom-ct``: chest CT volumes in HU (NIfTI), multi-label: ``nodule`` (small sphere, r ~ 2 % of
  the field), ``effusion`` (medium: fluid layering at a lung base), ``emphysema`` (texture: fine
  low-attenuation holes in the lungs).
- ``phantom-mri``: T1-like head volumes + a label mask: 1 ventricles (large), 2 tumour (medium,
  in some patients), 3 lesions (small, a few voxels, in some patients). Bias field, arbitrary units.
- ``phantom-wsi``: one tile folder per slide (RGB PNG tiles, H&E-like); slide label ``tumor`` =
  a few tiles (4-15 %, at least one) hold small clusters of larger, darker nuclei; one manifest row per tile (bag_id).
- ``phantom-em``: CREMI's layout and protocol on synthetic tissue: three samples A, B, C (cells of
  decreasing size, as CREMI's samples grow harder), each one HDF5 file ``sample_<X>_phantom.hdf`` with
  ``volumes/raw`` [z, y, x] uint8 and ``volumes/labels/neuron_ids`` [z, y, x] uint64 at 4 x 4 x 40 nm
  (``resolution`` attributes, as CREMI), read and split by the CREMI adapter's code (first sections
  train, last test). Neurons are anisotropic 3D Voronoi cells with dark membranes on their boundaries
  and mitochondria; every voxel belongs to a neuron.
- ``phantom-petct``: CT (HU) + PET (SUV) pairs, AutoPET-style files, lesion mask (1 = lesion);
  lesions of several sizes, some patients without any (negative controls).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from dinoscale.data.dataset import PreparedDataset, register_dataset
from dinoscale.data.layout import atomic_dir
from dinoscale.data.splits import assign_patient_splits
from dinoscale.datasettings import PhantomSpec
from dinoscale.provenance import PHANTOM, data_tags

VERSION = "2"  # 2: spheres are round in millimetres (v1 flattened them along z to under a slice)
EM_VERSION = "3"  # 3: CREMI's layout (three HDF5 samples A / B / C, section split); v2: one NIfTI volume per patient
EM_SAMPLES = {"A": 18, "B": 30, "C": 48}  # Voronoi cells per sample volume: larger cells are easier
CT_CLASSES = ["nodule", "effusion", "emphysema"]
MRI_LABELS = {1: "ventricles", 2: "tumour", 3: "lesion"}
PETCT_LABELS = {1: "lesion"}


def _save_nifti(path: Path, arr: np.ndarray, spacing, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype), np.diag([*spacing, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _grid(n: int, depth: int):
    x = (np.arange(n) + 0.5) / n
    z = (np.arange(depth) + 0.5) / depth
    return np.meshgrid(x, x, z, indexing="ij")  # [X, Y, Z] in [0, 1]


CT_FIELD_MM = 256.0 * 1.4  # a ~36 cm field at any matrix size
MRI_SPACING = (1.0, 1.0, 2.0)  # mm
EM_SPACING = (4.0, 4.0, 40.0)  # nm: sections 10x thicker than the pixel


def _ct_spacing(n: int) -> tuple[float, float, float]:
    return (CT_FIELD_MM / n, CT_FIELD_MM / n, 2.5)


def _z_aniso(n: int, depth: int, spacing) -> float:
    """For ``_ball``: the z extent of the volume over its x extent (physical units), so that a radius
    given as a fraction of the field is round in millimetres (or nanometres)."""
    return depth * spacing[2] / (n * spacing[0])


def _ball(xx, yy, zz, c, r, aniso=1.0):
    return ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + ((zz - c[2]) * aniso) ** 2) < r**2


def _chest(n, depth, rng):
    """Body, lungs and spine in HU; returns (hu, lungs mask, lung centres)."""
    xx, yy, zz = _grid(n, depth)
    w = rng.uniform(0.85, 1.0)
    body = ((xx - 0.5) / (0.45 * w)) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)
    centres = [(0.5 - 0.2 * w, 0.5), (0.5 + 0.2 * w, 0.5)]
    lungs = np.zeros_like(body)
    for cx, cy in centres:
        lungs |= ((xx - cx) / (0.14 * w)) ** 2 + ((yy - cy) / 0.24) ** 2 + ((zz - 0.5) / 0.6) ** 2 < 1
    hu[lungs] = -850.0
    hu[((xx - 0.5) / 0.05) ** 2 + ((yy - 0.78) / 0.05) ** 2 < 1] = 700.0  # spine
    return hu, lungs, centres, (xx, yy, zz)


def _render_ct(n, depth, findings, rng):
    hu, lungs, centres, (xx, yy, zz) = _chest(n, depth, rng)
    if findings[0]:  # nodules: 1-3 small soft-tissue spheres inside a lung
        for _ in range(rng.integers(1, 4)):
            cx, cy = centres[rng.integers(2)]
            c = (cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.12, 0.12), rng.uniform(0.3, 0.7))
            hu[_ball(xx, yy, zz, c, rng.uniform(0.015, 0.025), aniso=_z_aniso(n, depth, _ct_spacing(n))) & lungs] = 30.0
    if findings[1]:  # effusion: fluid (15 HU) in the posterior third of one lung, lower half
        cx, _ = centres[rng.integers(2)]
        side = np.abs(xx - cx) < 0.15
        hu[lungs & side & (yy > 0.5 + rng.uniform(0.04, 0.1)) & (zz < 0.6)] = 15.0
    if findings[2]:  # emphysema: many 1-2 voxel holes (-990 HU) scattered through the lungs
        holes = (rng.random(hu.shape) < 0.08) & lungs
        hu[holes] = -990.0
    hu = hu + rng.normal(0, 12, hu.shape)
    return np.clip(hu, -1024, 3071)


def _render_mri(n, depth, has_tumour, has_lesions, rng):
    xx, yy, zz = _grid(n, depth)
    a = rng.uniform(0.36, 0.42)
    r2 = ((xx - 0.5) / a) ** 2 + ((yy - 0.5) / (a * 1.15)) ** 2 + ((zz - 0.5) / 0.55) ** 2
    img = np.zeros(xx.shape)
    img[(r2 < 1.0) & (r2 > 0.85)] = 0.9  # scalp / fat
    brain = r2 < 0.75
    img[brain] = 0.55  # grey matter
    img[r2 < 0.45] = 0.75  # white matter
    mask = np.zeros(xx.shape, np.uint8)
    vent = (((xx - 0.46) / 0.05) ** 2 + ((yy - 0.5) / 0.14) ** 2 + ((zz - 0.5) / 0.3) ** 2 < 1) | (
        ((xx - 0.54) / 0.05) ** 2 + ((yy - 0.5) / 0.14) ** 2 + ((zz - 0.5) / 0.3) ** 2 < 1
    )
    img[vent], mask[vent] = 0.15, 1
    if has_tumour:
        c = (0.5 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.22), rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))
        t = _ball(xx, yy, zz, c, rng.uniform(0.06, 0.1), aniso=_z_aniso(n, depth, MRI_SPACING)) & brain & ~vent
        img[t], mask[t] = 0.35 + 0.1 * rng.random(t.sum()), 2
    if has_lesions:
        for _ in range(rng.integers(3, 7)):
            c = (0.5 + rng.uniform(-0.2, 0.2), 0.5 + rng.uniform(-0.25, 0.25), rng.uniform(0.3, 0.7))
            les = _ball(xx, yy, zz, c, 0.018, aniso=_z_aniso(n, depth, MRI_SPACING)) & (r2 < 0.45) & (mask == 0)
            img[les], mask[les] = 0.3, 3
    bias = 1 + 0.2 * (xx - 0.5) + 0.1 * (yy - 0.5)
    return (np.clip(img * bias + rng.normal(0, 0.02, img.shape), 0, None) * 1000).astype(np.float32), mask


def _render_em(n, depth, rng, k: int | None = None):
    from scipy.spatial import cKDTree

    xx, yy, zz = _grid(n, depth)
    k = int(rng.integers(20, 35)) if k is None else k
    seeds = rng.random((k, 3))
    za = _z_aniso(n, depth, EM_SPACING)  # z in x units: sections 10x thicker than a pixel
    pts = np.stack([xx, yy, zz * za], -1).reshape(-1, 3)
    seeds[:, 2] *= za
    d, idx = cKDTree(seeds).query(pts, k=2)
    ids = (idx[:, 0] + 1).reshape(xx.shape).astype(np.uint32)
    membrane = ((d[:, 1] - d[:, 0]) < 1.6 / n).reshape(xx.shape)
    img = 0.7 + 0.05 * rng.standard_normal(xx.shape)
    img[membrane] = 0.2
    for _ in range(int(rng.integers(5, 12))):  # mitochondria: dark ellipsoids inside cells
        c = rng.random(3)
        img[_ball(xx, yy, zz, c, rng.uniform(0.02, 0.04), aniso=_z_aniso(n, depth, EM_SPACING)) & ~membrane] = 0.35
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), ids


def _render_petct(n, depth, n_lesions, rng):
    hu, lungs, centres, (xx, yy, zz) = _chest(n, depth, rng)
    body = hu > -500
    suv = np.where(body, 0.8, 0.0)
    liver = ((xx - 0.35) / 0.15) ** 2 + ((yy - 0.5) / 0.15) ** 2 + ((zz - 0.15) / 0.15) ** 2 < 1
    hu[liver], suv[liver] = 60.0, 2.0
    heart = ((xx - 0.55) / 0.1) ** 2 + ((yy - 0.45) / 0.1) ** 2 + ((zz - 0.55) / 0.15) ** 2 < 1
    hu[heart], suv[heart] = 40.0, 4.0  # physiological uptake: not a lesion
    from scipy.ndimage import gaussian_filter

    suv = gaussian_filter(suv, 1.0)  # PET resolution (lesions stay sharp: their mask is the ground truth)
    mask = np.zeros(hu.shape, np.uint8)
    for _ in range(n_lesions):
        organ = lungs if rng.random() < 0.6 else liver
        cand = np.argwhere(organ)
        c = (cand[rng.integers(len(cand))] + 0.5) / np.array([n, n, depth])
        les = _ball(xx, yy, zz, c, rng.choice([0.03, 0.05, 0.08]), aniso=_z_aniso(n, depth, _ct_spacing(n))) & body
        hu[les], suv[les], mask[les] = 35.0, rng.uniform(5, 15), 1
    suv = suv + np.abs(rng.normal(0, 0.1, suv.shape))
    return np.clip(hu + rng.normal(0, 10, hu.shape), -1024, 3071), suv.astype(np.float32), mask


def _image_and_mask(tmp: Path, sid: str, pid: str, img, mask, suffix: str, spacing, img_dtype, mask_dtype) -> dict:
    """Write ``<sid>.nii.gz`` and ``<sid>_<suffix>.nii.gz``; return the volume's manifest row."""
    _save_nifti(tmp / f"{sid}.nii.gz", img, spacing, img_dtype)
    _save_nifti(tmp / f"{sid}_{suffix}.nii.gz", mask, spacing, mask_dtype)
    return {
        "sample_id": sid,
        "patient_id": pid,
        "path": f"{sid}.nii.gz",
        "mask_path": f"{sid}_{suffix}.nii.gz",
        "n_slices": img.shape[-1],
    }


def _patients(ph, nmin_max=None):
    for p in range(ph.n_patients):
        rng = np.random.default_rng([ph.seed, p])
        lo, hi = nmin_max or ph.images_per_patient
        yield p, rng, int(rng.integers(lo, hi + 1))


def _writer(kind: str, ph):
    n, depth = ph.image_size, ph.depth
    sp = _ct_spacing(n)

    def write(tmp: Path) -> None:
        rows = []
        if kind == "em":
            _write_em_samples(tmp, n, depth, ph.seed)
        for p, rng, n_items in _patients(ph) if kind != "em" else ():
            pid = f"P{p:04d}"
            if kind == "ct":
                has = rng.random(3) < 0.4
                for i in range(n_items):
                    shown = has & (rng.random(3) < 0.9)
                    sid = f"{pid}_{i}"
                    _save_nifti(tmp / f"{sid}.nii.gz", _render_ct(n, depth, shown, rng), sp, np.int16)
                    rows.append(
                        {
                            "sample_id": sid,
                            "patient_id": pid,
                            "path": f"{sid}.nii.gz",
                            "n_slices": depth,
                            **dict(zip(CT_CLASSES, shown.astype(int))),
                        }
                    )
            elif kind == "mri":
                for i in range(n_items):
                    sid = f"{pid}_{i}"
                    img, mask = _render_mri(n, depth, rng.random() < 0.6, rng.random() < 0.5, rng)
                    rows.append(_image_and_mask(tmp, sid, pid, img, mask, "seg", MRI_SPACING, np.float32, np.uint8))
            elif kind == "em":
                continue  # written below: three samples, not patients
            elif kind == "petct":
                for i in range(n_items):
                    sid = f"{pid}_{i}"
                    (tmp / sid).mkdir()
                    ct, suv, mask = _render_petct(n, depth, int(rng.integers(1, 4)) if rng.random() < 0.75 else 0, rng)
                    _save_nifti(tmp / sid / "CTres.nii.gz", ct, sp, np.int16)
                    _save_nifti(tmp / sid / "SUV.nii.gz", suv, sp, np.float32)
                    _save_nifti(tmp / sid / "SEG.nii.gz", mask, sp, np.uint8)
                    rows.append(
                        {
                            "sample_id": sid,
                            "patient_id": pid,
                            "path": f"{sid}/CTres.nii.gz",
                            "pet_path": f"{sid}/SUV.nii.gz",
                            "mask_path": f"{sid}/SEG.nii.gz",
                            "n_slices": depth,
                        }
                    )
            elif kind == "wsi":
                for i in range(n_items):
                    slide = f"{pid}_S{i}"
                    (tmp / slide).mkdir()
                    tumour = rng.random() < 0.45
                    n_pos = max(1, int(round(ph.tiles_per_slide * rng.uniform(0.04, 0.15)))) if tumour else 0
                    pos = set(rng.choice(ph.tiles_per_slide, n_pos, replace=False).tolist())
                    for t in range(ph.tiles_per_slide):
                        tile = _render_tile(n, t in pos, rng)
                        Image.fromarray(tile, mode="RGB").save(tmp / slide / f"tile_{t:04d}.png")
                        rows.append(
                            {
                                "sample_id": f"{slide}_{t:04d}",
                                "patient_id": pid,
                                "bag_id": slide,
                                "path": f"{slide}/tile_{t:04d}.png",
                                "tumor": int(tumour),
                                "tile_label": int(t in pos),
                            }
                        )
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
        (tmp / "PHANTOM.txt").write_text(
            f"Synthetic {kind} phantom (phantom-{kind} v{VERSION}, seed {ph.seed}). Not patient data.\n"
        )

    return write


def _write_em_samples(tmp: Path, n: int, depth: int, seed: int) -> None:
    """CREMI's files: sample_<X>_phantom.hdf with raw and neuron ids [z, y, x] and resolution (40, 4, 4) nm."""

    resolution = (EM_SPACING[2], EM_SPACING[1], EM_SPACING[0])  # [z, y, x], nm
    for j, (sample, cells) in enumerate(EM_SAMPLES.items()):
        img, ids = _render_em(n, depth, np.random.default_rng([seed, 1000 + j]), k=cells)  # [x, y, z]
        with h5py.File(tmp / f"sample_{sample}_phantom.hdf", "w") as f:
            for key, arr in (("volumes/raw", img), ("volumes/labels/neuron_ids", ids.astype(np.uint64))):
                d = f.create_dataset(key, data=np.ascontiguousarray(np.transpose(arr, (2, 1, 0))), compression="gzip")
                d.attrs["resolution"] = resolution


def _prepare_em(spec, root: Path, ph) -> PreparedDataset:
    from dinoscale.data.adapters import CREMI_SPLIT, cremi_rows

    # CREMI's three samples, not patients: n_patients / images_per_patient do not apply (as depth does not
    # apply to 2D phantoms)
    rows = [r for s in EM_SAMPLES for r in cremi_rows(root / f"sample_{s}_phantom.hdf", s, ph.depth, spec.split)]
    return PreparedDataset(
        name=spec.name,
        task="instance_segmentation",
        classes=[],
        manifest=pd.DataFrame(rows),
        root=root,
        provenance=data_tags(
            PHANTOM, spec.name, generator=f"phantom-em v{EM_VERSION}", seed=ph.seed, split=CREMI_SPLIT
        ),
        replicates="fixed",
        replicates_reason=CREMI_SPLIT,
    )


def _render_tile(n: int, tumour: bool, rng) -> np.ndarray:
    """H&E-like RGB tile: pink stroma with sparse small nuclei; tumour: clusters of large dark nuclei."""
    yy, xx = np.mgrid[0:n, 0:n] / n
    stroma = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * rng.uniform(3, 6) + yy * rng.uniform(1, 3)) + rng.uniform(0, 6))
    hema = np.zeros((n, n))  # haematoxylin (nuclei) density
    for _ in range(int(rng.integers(8, 15))):
        cy, cx = rng.random(2)
        hema += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.2 / n) ** 2))
    if tumour:
        for _ in range(int(rng.integers(1, 3))):  # clusters
            ccy, ccx = rng.uniform(0.2, 0.8, 2)
            for _ in range(int(rng.integers(5, 12))):
                cy, cx = ccy + rng.normal(0, 0.08), ccx + rng.normal(0, 0.08)
                hema += 0.9 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (2.2 / n) ** 2))
    hema = np.clip(hema, 0, 1)
    r = 0.93 - 0.1 * stroma - 0.55 * hema
    g = 0.75 - 0.25 * stroma - 0.6 * hema
    b = 0.85 - 0.1 * stroma - 0.25 * hema
    rgb = np.stack([r, g, b], -1) + rng.normal(0, 0.02, (n, n, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


_TASK = {
    "ct": "multilabel",
    "mri": "segmentation",
    "em": "instance_segmentation",
    "petct": "segmentation",
    "wsi": "mil",
}
_CLASSES = {"ct": CT_CLASSES, "mri": [], "em": [], "petct": [], "wsi": ["tumor"]}
_MASK_LABELS = {"mri": MRI_LABELS, "petct": PETCT_LABELS, "em": {}}


def _prepare(kind: str, spec, storage: Path) -> PreparedDataset:
    ph = spec.phantom or PhantomSpec()
    cfg = {
        "generator": f"phantom-{kind}",
        "version": EM_VERSION if kind == "em" else VERSION,
        "seed": ph.seed,
        "n_patients": ph.n_patients,
        "per_patient": list(ph.images_per_patient),
        "size": ph.image_size,
        "depth": ph.depth,
        "tiles": ph.tiles_per_slide,
    }
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(storage) / "data" / f"phantom-{kind}" / digest
    atomic_dir(root, _writer(kind, ph))
    if kind == "em":
        return _prepare_em(spec, root, ph)
    df = pd.read_csv(root / "manifest.csv", dtype={"sample_id": str, "patient_id": str, "bag_id": str})
    for c in ("path", "mask_path", "pet_path"):
        if c in df:
            df[c] = [str(root / p) for p in df[c]]
    df["split"] = assign_patient_splits(
        df["patient_id"], spec.split.val_fraction, spec.split.test_fraction, spec.split.seed
    )
    return PreparedDataset(
        name=spec.name,
        task=_TASK[kind],
        classes=list(_CLASSES[kind]),
        manifest=df,
        root=root,
        mask_labels=dict(_MASK_LABELS.get(kind, {})),
        provenance=data_tags(PHANTOM, spec.name, generator=f"phantom-{kind} v{VERSION}", seed=ph.seed),
    )


for _kind in _TASK:
    register_dataset(
        f"phantom-{_kind}",
        phantom=True,
        task=_TASK[_kind],
        replicates="fixed" if _kind == "em" else "resplit",
        color="rgb" if _kind == "wsi" else "grey",  # H&E-stained tiles
    )((lambda k: lambda spec, storage: _prepare(k, spec, storage))(_kind))
