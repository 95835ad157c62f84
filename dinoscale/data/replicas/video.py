"""Video-frame datasets (``kvasir-capsule``, ``autolaparo``) in their published layouts, with coloured frames.

Kvasir-Capsule, written under ``root``::

    labelled_images/<class folder>/<video id>_<frame>.jpg   the 14 OSF class folders (their own spellings:
                                                            'Normal clean mucosa', 'Blood - fresh', ...)
    official_splits/split_0.csv, split_1.csv                filename,label in the 11-class spellings, by video
    metadata.csv                                            filename;video_id;frame_number;finding_category;...

AutoLaparo Task 1, written under ``root``::

    labels/label_01.txt ... label_21.txt   'Frame<TAB>Phase' header, one row a second (frame from 1, phase 1-7)
    frames/01/00000.png ...                the 1-fps frames as extracted (index = frame - 1), 16:9 RGB

Each frame is a mucosa- or tissue-coloured field with a class-coloured mark, so that a probe on random-weight
features has something to learn; the numbers of a rehearsal still mean nothing.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import truncate
from dinoscale.data.video import AUTOLAPARO_PHASES, AUTOLAPARO_SPLIT, AUTOLAPARO_VIDEOS, KVASIR_CAPSULE_CLASSES

# ---------------------------------------------------------------- frames


def colour_frame(rng, size: tuple[int, int], base: tuple, mark: tuple, radius: float) -> np.ndarray:
    """(h, w, 3) uint8: a lit field of colour ``base`` (vignetted, noisy) with a disc of colour ``mark``."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    light = 1.0 - 0.6 * ((xx - w / max(h, w) / 2) ** 2 + (yy - h / max(h, w) / 2) ** 2)
    img = np.asarray(base, np.float32)[None, None] * light[..., None]
    cx, cy = rng.uniform(0.3, 0.7) * w / max(h, w), rng.uniform(0.3, 0.7) * h / max(h, w)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) <= radius**2
    img[disc] = mark
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated saturated colours (hues round the wheel)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / n, 0.9, 0.95)) for k in range(n)]


# ---------------------------------------------------------------- Kvasir-Capsule

# OSF class folder (14) -> the official split's spelling (11); None: not in the official split
KVASIR_FOLDERS = {
    "Ampulla of vater": None,
    "Angiectasia": "Angiectasia",
    "Blood - fresh": "Blood",
    "Blood - hematin": None,
    "Erosion": "Erosion",
    "Erythema": "Erythematous",
    "Foreign body": "Foreign Bodies",
    "Ileocecal valve": "Ileo-cecal valve",
    "Lymphangiectasia": "Lymphangiectasia",
    "Normal clean mucosa": "Normal",
    "Polyp": None,
    "Pylorus": "Pylorus",
    "Reduced mucosal view": "Reduced Mucosal View",
    "Ulcer": "Ulcer",
}
ANATOMY = {"Ampulla of vater", "Ileocecal valve", "Pylorus", "Normal clean mucosa", "Reduced mucosal view"}
KVASIR_SIZE = 64  # px (the real frames: 336 x 336)
KVASIR_VIDEOS = 12  # six per fold (the real split: 25 videos per fold, 117 videos in all)
MUCOSA = (200, 120, 90)


def _kvasir_frames(rng) -> list[dict]:
    """Frames of each video: normal mucosa and three findings, the findings dealt so that each fold holds every
    class; a few frames of the three classes the official split drops."""
    findings = [c for c in KVASIR_CAPSULE_CLASSES if c != "Normal"]
    folder_of = {v: k for k, v in KVASIR_FOLDERS.items() if v}
    out = []
    for v in range(KVASIR_VIDEOS):
        video = rng.bytes(8).hex()
        fold = "split_0" if v < KVASIR_VIDEOS // 2 else "split_1"
        mine = ["Normal"] * 3 + [findings[(3 * (v % 6) + j) % len(findings)] for j in range(3) for _ in range(2)]
        if v < 3:  # the dropped classes: in their folders, in no split file
            mine.append([f for f, c in KVASIR_FOLDERS.items() if c is None][v])
        for frame, label in enumerate(mine):
            folder = folder_of.get(label, label)
            out.append({"video": video, "frame": 10 * frame + 1, "part": fold, "label": label, "folder": folder})
    return out


@register_replica("kvasir-capsule", variants=("corrupt_file", "bad_label"))
def write_kvasir_capsule(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    frames = _kvasir_frames(rng)
    colours = dict(zip(KVASIR_FOLDERS, _palette(len(KVASIR_FOLDERS))))
    for f in frames:
        f["filename"] = f"{f['video']}_{f['frame']}.jpg"
        path = root / "labelled_images" / f["folder"] / f["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        normal = f["label"] == "Normal"
        pixels = colour_frame(rng, (KVASIR_SIZE, KVASIR_SIZE), MUCOSA, colours[f["folder"]], 0.05 if normal else 0.2)
        Image.fromarray(pixels, "RGB").save(path, quality=90)
    listed = [f for f in frames if f["label"] in KVASIR_CAPSULE_CLASSES]
    (root / "official_splits").mkdir(exist_ok=True)
    broken = None
    for fold in ("split_0", "split_1"):
        table = pd.DataFrame([{"filename": f["filename"], "label": f["label"]} for f in listed if f["part"] == fold])
        if variant == "bad_label" and fold == "split_1":
            table.loc[2, "label"] = "Erythema"  # the folder's spelling, not the split's
            broken = "official_splits/split_1.csv line 4: label 'Erythema'"
        table.to_csv(root / "official_splits" / f"{fold}.csv", index=False)
    _kvasir_metadata(root, frames)
    if variant == "corrupt_file":
        broken = truncate(root / "labelled_images" / listed[0]["folder"] / listed[0]["filename"])
    return Replica(
        root=root,
        dataset="kvasir-capsule",
        reproduces=[
            "labelled_images/<class folder>/<video id>_<frame>.jpg with the 14 OSF folder names (incl. the three "
            "classes the official split drops: Ampulla of vater, Blood - hematin, Polyp)",
            "official_splits/split_0.csv and split_1.csv (filename,label) in the split's 11-class spellings "
            "(Normal, Erythematous, Foreign Bodies, Ileo-cecal valve, ...), two folds by video",
            "metadata.csv (semicolon-separated: filename;video_id;frame_number;finding_category;finding_class;x1..y4)",
            "RGB JPEG frames, several frames per video (16-hex-digit video ids)",
        ],
        leaves_out=[
            f"{len(frames)} frames of {KVASIR_VIDEOS} videos at {KVASIR_SIZE} px (real: 47,238 labelled frames of "
            "117 videos at 336 px; the official folds hold 50 of them)",
            "the real class imbalance (Normal is ~70 % of the real split) and real mucosa (a coloured disc marks "
            "the class)",
            "the unlabelled frames and the raw videos; metadata.csv's bounding boxes are empty",
        ],
        broken=broken,
    )


def _kvasir_metadata(root: Path, frames: list[dict]) -> None:
    rows = [
        {
            "filename": f["filename"],
            "video_id": f["video"],
            "frame_number": f["frame"],
            "finding_category": "Anatomy" if f["folder"] in ANATOMY else "Luminal",
            "finding_class": f["folder"],
            **{f"{a}{k}": "" for k in range(1, 5) for a in ("x", "y")},
        }
        for f in frames
    ]
    pd.DataFrame(rows).to_csv(root / "metadata.csv", sep=";", index=False)


# ---------------------------------------------------------------- AutoLaparo Task 1

AUTOLAPARO_SIZE = (54, 96)  # (h, w) px, 16:9 (the real frames: 1080 x 1920)
TISSUE = (170, 60, 60)


def _phase_sequence(rng) -> list[int]:
    """Phases 1-7 in surgical order, one to two seconds each (the real videos: minutes each)."""
    return [p for p in range(1, len(AUTOLAPARO_PHASES) + 1) for _ in range(int(rng.integers(1, 3)))]


@register_replica("autolaparo", variants=("corrupt_file", "bad_label"))
def write_autolaparo(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    colours = _palette(len(AUTOLAPARO_PHASES))
    (root / "labels").mkdir(parents=True, exist_ok=True)
    n_frames, broken = 0, None
    for v in range(1, AUTOLAPARO_VIDEOS + 1):
        video = f"{v:02d}"
        phases = _phase_sequence(rng)
        folder = root / "frames" / video
        folder.mkdir(parents=True, exist_ok=True)
        for i, phase in enumerate(phases):
            pixels = colour_frame(rng, AUTOLAPARO_SIZE, TISSUE, colours[phase - 1], 0.15)
            Image.fromarray(pixels, "RGB").save(folder / f"{i:05d}.png")
        if variant == "bad_label" and v == 3:
            phases[2] = 8
            broken = "labels/label_03.txt line 4: phase 8"
        rows = "".join(f"{i + 1}\t{p}\n" for i, p in enumerate(phases))
        (root / "labels" / f"label_{video}.txt").write_text("Frame\tPhase\n" + rows)
        n_frames += len(phases)
    if variant == "corrupt_file":
        broken = truncate(root / "frames" / "01" / "00000.png")
    split = ", ".join(f"{s} {min(r):02d}-{max(r):02d}" for s, r in AUTOLAPARO_SPLIT.items())
    return Replica(
        root=root,
        dataset="autolaparo",
        reproduces=[
            "labels/label_NN.txt for the 21 videos: a header line, then tab-separated 'frame phase' rows at 1 fps "
            "(frame from 1, phase 1-7 in surgical order)",
            "frames/NN/<frame - 1:05d>.png, one RGB frame a second, 16:9, as the 1-fps extraction writes them",
            f"the release's split by video number ({split})",
        ],
        leaves_out=[
            f"{n_frames} frames, 1-2 seconds per phase, at {AUTOLAPARO_SIZE[1]}x{AUTOLAPARO_SIZE[0]} px (real: about "
            "83k frames, minutes per phase, 1920x1080)",
            "videos/NN.mp4 (the adapter reads the extracted frames, not the videos) and the release's README",
            "real surgical scenes (a coloured disc marks the phase)",
        ],
        broken=broken,
    )
