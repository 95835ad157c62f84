"""Phantom chest X-rays: deterministic grey images with multi-label findings at several scales.

Known ground truth, so a sweep can run anywhere; never mistaken for real data (every result that
comes from it is tagged ``data.source=phantom`` with the generator version and seed).

Findings, from large to fine:

- ``cardiomegaly``: an enlarged heart shadow (large; visible at any resolution)
- ``effusion``: fluid filling the base of one lung with a meniscus (medium)
- ``nodule``: one to three small round opacities, sigma ~2-3 px at 256 px (small; fades at 64 px)
- ``fibrosis``: a fine reticular texture in the lungs, period ~5 px at 256 px (finer than the
  Nyquist limit at 64 px: only a higher input resolution can see it)

A patient either has a condition or not; each of their images then shows it with high
probability, so images of one patient are correlated, as in real cohorts (and why splits and
bootstrap intervals must be patient-level).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dinoscale.data.dataset import PreparedDataset, register_dataset
from dinoscale.data.splits import assign_patient_splits
from dinoscale.datasettings import PhantomSpec
from dinoscale.provenance import PHANTOM, data_tags

GENERATOR = "phantom-xray"
GENERATOR_VERSION = "1"
CLASSES = ["cardiomegaly", "effusion", "nodule", "fibrosis"]
PATIENT_PREVALENCE = np.array([0.35, 0.35, 0.35, 0.35])
P_SHOWN_IF_PATIENT_HAS = 0.9
P_SHOWN_OTHERWISE = 0.04


def _ellipse(yy, xx, cy, cx, ry, rx, soft=0.01):
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return 1.0 / (1.0 + np.exp((d - 1.0) / soft / 4))


def render_xray(size: int, anatomy: dict, findings: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image in [0, 1] (float32, size x size) with the given findings (0/1 per CLASSES)."""
    dy, dx = rng.uniform(-0.025, 0.025, 2)
    yy, xx = np.meshgrid((np.arange(size) + 0.5) / size - dy, (np.arange(size) + 0.5) / size - dx, indexing="ij")
    w = anatomy["body_width"]
    img = 0.05 + 0.5 * _ellipse(yy, xx, 0.55, 0.5, 0.5, 0.42 * w, soft=0.05)
    lung_l = _ellipse(yy, xx, 0.45, 0.5 - 0.18 * w, 0.28, 0.13 * w, soft=0.03)
    lung_r = _ellipse(yy, xx, 0.45, 0.5 + 0.18 * w, 0.28, 0.13 * w, soft=0.03)
    lungs = np.clip(lung_l + lung_r, 0, 1)
    img -= 0.3 * lungs
    # ribs: low-frequency curved bands across the lungs
    img += 0.05 * lungs * np.clip(np.sin(2 * np.pi * (9 * yy + 2.5 * (xx - 0.5) ** 2) + anatomy["rib_phase"]), 0, 1)
    img += 0.18 * np.exp(-(((xx - 0.5) / 0.025) ** 2))  # spine
    heart_r = anatomy["heart_r"] * (1.45 if findings[0] else 1.0)
    img += 0.3 * _ellipse(yy, xx, 0.63, 0.53, 0.8 * heart_r, heart_r, soft=0.04)
    if findings[1]:  # effusion: one lung base fills up to a curved fluid line
        side = lung_l if rng.random() < 0.5 else lung_r
        cx = 0.5 - 0.18 * w if side is lung_l else 0.5 + 0.18 * w
        level = rng.uniform(0.55, 0.62) + 0.6 * (xx - cx) ** 2
        img += 0.3 * side * (1.0 / (1.0 + np.exp(-(yy - level) / 0.01)))
    if findings[2]:  # nodules: small Gaussian opacities inside the lungs
        for _ in range(rng.integers(1, 4)):
            cy = rng.uniform(0.3, 0.6)
            cx = 0.5 + rng.choice([-1, 1]) * 0.18 * w + rng.uniform(-0.06, 0.06)
            sigma = rng.uniform(2.0, 3.5) / 256
            img += 0.3 * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))
    if findings[3]:  # fibrosis: fine reticular pattern, period ~5 px at 256 px
        f = 256 / rng.uniform(4.5, 5.5)
        theta = rng.uniform(0, np.pi)
        u = np.cos(theta) * xx + np.sin(theta) * yy
        v = -np.sin(theta) * xx + np.cos(theta) * yy
        texture = np.abs(np.sin(np.pi * f * u)) * np.abs(np.sin(np.pi * f * v))
        img += 0.12 * lungs * texture
    img = anatomy["exposure"] * img
    img += rng.normal(0, 0.015, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _config_digest(cfg: dict) -> str:
    blob = json.dumps({"generator": GENERATOR, "version": GENERATOR_VERSION, **cfg}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def generate(
    out_dir: Path, seed: int, n_patients: int, images_per_patient: tuple[int, int], image_size: int
) -> pd.DataFrame:
    """Write PNGs and ``manifest.csv`` into ``out_dir`` (atomically); returns the manifest."""

    out_dir = Path(out_dir)
    marker = out_dir / "manifest.csv"
    if marker.exists():
        return pd.read_csv(marker, dtype={"sample_id": str, "patient_id": str})
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    (tmp / "images").mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        rng = np.random.default_rng([seed, p])
        anatomy = {
            "body_width": rng.uniform(0.85, 1.1),
            "heart_r": rng.uniform(0.1, 0.13),
            "rib_phase": rng.uniform(0, 2 * np.pi),
            "exposure": rng.uniform(0.85, 1.1),
        }
        has = rng.random(len(CLASSES)) < PATIENT_PREVALENCE
        n_img = int(rng.integers(images_per_patient[0], images_per_patient[1] + 1))
        for i in range(n_img):
            shown = np.where(
                has, rng.random(len(CLASSES)) < P_SHOWN_IF_PATIENT_HAS, rng.random(len(CLASSES)) < P_SHOWN_OTHERWISE
            )
            img = render_xray(image_size, anatomy, shown, rng)
            sample_id = f"P{p:05d}_{i:02d}"
            fname = f"images/{sample_id}.png"
            Image.fromarray((img * 255).round().astype(np.uint8), mode="L").save(tmp / fname)
            rows.append(
                {
                    "sample_id": sample_id,
                    "patient_id": f"P{p:05d}",
                    "path": fname,
                    **dict(zip(CLASSES, shown.astype(int))),
                }
            )
    df = pd.DataFrame(rows)
    df.to_csv(tmp / "manifest.csv", index=False)
    (tmp / "PHANTOM.txt").write_text(
        f"Synthetic chest X-ray phantom ({GENERATOR} v{GENERATOR_VERSION}, seed {seed}). Not patient data.\n"
    )
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process generated the same data first: identical by construction
        shutil.rmtree(tmp, ignore_errors=True)
    return pd.read_csv(marker, dtype={"sample_id": str, "patient_id": str})


@register_dataset("phantom-xray", phantom=True)
def prepare_phantom_xray(spec, storage: Path) -> PreparedDataset:
    ph = spec.phantom or PhantomSpec()
    cfg = {
        "seed": ph.seed,
        "n_patients": ph.n_patients,
        "images_per_patient": list(ph.images_per_patient),
        "image_size": ph.image_size,
    }
    root = Path(storage) / "data" / GENERATOR / _config_digest(cfg)
    root.parent.mkdir(parents=True, exist_ok=True)
    df = generate(root, ph.seed, ph.n_patients, ph.images_per_patient, ph.image_size)
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
        provenance=data_tags(PHANTOM, spec.name, generator=f"{GENERATOR} v{GENERATOR_VERSION}", seed=ph.seed),
    )
