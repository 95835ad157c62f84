"""Adapters for video-frame classification (endoscopy and surgery, RGB): the video is the grouping unit.

A video plays the part a patient plays in radiology: its frames are near-duplicates of one another, so the
manifest's ``patient_id`` is the video id, splits are by video (no video in two splits, checked), and the
bootstrap intervals resample videos whole. Frames keep their colour (``color="rgb"``). The task is
``video_frames`` (``dinoscale.tasks``): one class per frame, scored by macro AUROC and the frame metrics the
benchmark reports (accuracy, macro precision / recall / F1, Jaccard).

- **Kvasir-Capsule** (Smedsrud et al. 2021): the official 11-class, 2-fold split by video
  (``official_splits/split_0.csv`` / ``split_1.csv``); one fold trains (val carved from it by video), the
  other tests (``dataset.subset``: the test fold, ``split_1`` unless told).
- **AutoLaparo Task 1** (Wang et al. 2022): 7 surgical phases at 1 fps, videos 01-10 train, 11-14 val,
  15-21 test.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import data_root, patient_splits, require
from dinoscale.data.splits import LeakageError
from dinoscale.provenance import REAL, data_tags

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# ---------------------------------------------------------------- Kvasir-Capsule

# The official split's 11 classes, spelt as its CSVs spell them (ampulla, hematin and polyp are dropped).
KVASIR_CAPSULE_CLASSES = [
    "Angiectasia",
    "Blood",
    "Erosion",
    "Erythematous",
    "Foreign Bodies",
    "Ileo-cecal valve",
    "Lymphangiectasia",
    "Normal",
    "Pylorus",
    "Reduced Mucosal View",
    "Ulcer",
]
KVASIR_CAPSULE_FOLDS = ("split_0", "split_1")
KVASIR_CAPSULE_LAYOUT = """    labelled_images/<class folder>/<video id>_<frame>.jpg   (the 14 per-class archives of OSF, unpacked)
    official_splits/split_0.csv, split_1.csv       filename,label: the official 11-class 2-fold split by video
    metadata.csv                                   optional: filename;video_id;frame_number;... (video of a frame)"""
KVASIR_CAPSULE_SOURCE = (
    "https://osf.io/dv2ag/ (Smedsrud et al. 2021, Sci. Data 8:142; github.com/simula/kvasir-capsule)"
)


@register_dataset(
    "kvasir-capsule",
    task="video_frames",
    color="rgb",  # capsule endoscopy: mucosal colour (blood, erythema) is the finding
    published=PublishedSize(
        47_161,
        pixels=(336, 336),
        source="Kvasir-Capsule official splits: 23,061 + 24,100 labelled frames (11 classes) of 336x336 px from "
        "the videos of the two folds (47,238 labelled frames of 117 videos in all, 14 classes)",
    ),
)
def prepare_kvasir_capsule(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "Kvasir-Capsule", KVASIR_CAPSULE_LAYOUT, KVASIR_CAPSULE_SOURCE)
    test_fold = spec.subset or "split_1"
    if test_fold not in KVASIR_CAPSULE_FOLDS:
        raise DataError(
            f"Kvasir-Capsule: dataset.subset '{test_fold}' names no fold of the official split; use one of "
            f"{list(KVASIR_CAPSULE_FOLDS)} (the fold that tests; the other trains)"
        )
    files = _kvasir_files(root)
    videos = _kvasir_videos(root)
    rows, skipped = [], []
    for fold in KVASIR_CAPSULE_FOLDS:
        csv = require(root / "official_splits" / f"{fold}.csv", "Kvasir-Capsule", KVASIR_CAPSULE_LAYOUT)
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        if not {"filename", "label"} <= set(table.columns):
            raise DataError(f"{csv}: expected the columns filename,label, found {list(table.columns)}")
        for i, (name, label) in enumerate(zip(table["filename"], table["label"])):
            if label not in KVASIR_CAPSULE_CLASSES:
                raise DataError(f"{csv}, line {i + 2}: label '{label}' not in the class list {KVASIR_CAPSULE_CLASSES}")
            path = files.get(Path(name).name)
            if path is None:
                if spec.on_bad_file == "error":
                    raise DataError(
                        f"{csv}, line {i + 2}: {name} is in no class folder of {root / 'labelled_images'}. "
                        f"Expected layout:\n{KVASIR_CAPSULE_LAYOUT}"
                    )
                skipped.append({"path": name, "reason": f"listed in {csv.name}, not found"})
                continue
            rows.append(_frame_row(name, videos.get(name) or kvasir_video_id(name), path, fold, label))
    df = pd.DataFrame(rows)
    _no_video_in_two(df, "part", "Kvasir-Capsule official_splits")
    official = df.pop("part").map(lambda f: "test" if f == test_fold else "train")
    df["split"], how = patient_splits(df, spec, official)
    how += f" by video ({test_fold} tests)" if spec.split.official else " (by video)"
    ds = PreparedDataset(
        spec.name,
        "video_frames",
        list(KVASIR_CAPSULE_CLASSES),
        _one_hot(df, KVASIR_CAPSULE_CLASSES),
        _tags("Kvasir-Capsule", root, how, "metadata.csv video_id" if videos else "video id: file name before '_'"),
        root,
    )
    ds.skipped.extend(skipped)
    return ds


def kvasir_video_id(filename: str) -> str:
    """The video of a labelled frame from its file name ``<video id>_<frame>.jpg``."""
    return Path(filename).stem.rsplit("_", 1)[0]


def _kvasir_files(root: Path) -> dict[str, Path]:
    folder = require(root / "labelled_images", "Kvasir-Capsule", KVASIR_CAPSULE_LAYOUT)
    return {p.name: p for p in sorted(folder.glob("*/*")) if p.suffix.lower() in IMAGE_SUFFIXES}


def _kvasir_videos(root: Path) -> dict[str, str]:
    """filename -> video_id from the optional metadata.csv (semicolon-separated), else empty."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        return {}
    table = pd.read_csv(meta, sep=";", dtype=str, keep_default_na=False)
    if not {"filename", "video_id"} <= set(table.columns):
        raise DataError(f"{meta}: expected the columns filename;video_id;..., found {list(table.columns)}")
    return dict(zip(table["filename"], table["video_id"]))


# ---------------------------------------------------------------- AutoLaparo Task 1 (phase recognition)

AUTOLAPARO_PHASES = [
    "Preparation",
    "Dividing Ligament and Peritoneum",
    "Dividing Uterine Vessels and Ligament",
    "Transecting the Vagina",
    "Specimen Removal",
    "Suturing",
    "Washing",
]
AUTOLAPARO_VIDEOS = 21
AUTOLAPARO_SPLIT = {"train": range(1, 11), "val": range(11, 15), "test": range(15, 22)}  # the release's split
AUTOLAPARO_LAYOUT = """    labels/label_01.txt ... label_21.txt   a header line, then 'frame phase' rows at 1 fps (frame from 1, phase 1-7)
    frames/01/00000.png ...                one frame a second of videos/01.mp4, named <frame - 1> on 5 digits:
                                           ffmpeg -i videos/01.mp4 -vf fps=1 -start_number 0 frames/01/%05d.png
    videos/01.mp4 ... 21.mp4               the release's videos (not read: frames are read as extracted)"""
AUTOLAPARO_SOURCE = "https://autolaparo.github.io (Wang et al. 2022, MICCAI; Task 1: workflow / phase recognition)"


@register_dataset(
    "autolaparo",
    task="video_frames",
    color="rgb",
    replicates="fixed",
    published=PublishedSize(
        83_243,
        pixels=(1080, 1920),
        source="AutoLaparo Task 1: 21 hysterectomy videos (1920x1080, 25 fps) labelled at 1 fps; about 83k frames "
        "as the reference benchmark reports (an approximation: the sum of the label files' rows)",
    ),
)
def prepare_autolaparo(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "AutoLaparo", AUTOLAPARO_LAYOUT, AUTOLAPARO_SOURCE)
    rows, skipped = [], []
    for v in range(1, AUTOLAPARO_VIDEOS + 1):
        video = f"{v:02d}"
        label_file = require(root / "labels" / f"label_{video}.txt", "AutoLaparo", AUTOLAPARO_LAYOUT)
        frames = _frame_files(root / "frames" / video)
        for line, frame, phase in autolaparo_labels(label_file):
            path = frames.get(frame - 1)
            if path is None:
                where = f"{label_file}, line {line}: frame {frame} has no image {root / 'frames' / video}/{frame - 1:05d}.png"
                if spec.on_bad_file == "error":
                    raise DataError(f"{where}. Expected layout:\n{AUTOLAPARO_LAYOUT}")
                skipped.append({"path": where, "reason": "frame not extracted"})
                continue
            split = next(s for s, vids in AUTOLAPARO_SPLIT.items() if v in vids)
            rows.append(_frame_row(f"{video}/{path.name}", video, path, split, AUTOLAPARO_PHASES[phase - 1]))
    df = pd.DataFrame(rows)
    official = df.pop("part")
    df["split"], how = patient_splits(df, spec, official)
    if spec.split.official:
        how += " by video (01-10 train, 11-14 val, 15-21 test)"
    ds = PreparedDataset(
        spec.name,
        "video_frames",
        list(AUTOLAPARO_PHASES),
        _one_hot(df, AUTOLAPARO_PHASES),
        _tags("AutoLaparo Task 1", root, how, "video number (01-21)"),
        root,
        replicates="fixed" if spec.split.official else "resplit",
        replicates_reason="the release fixes train / val / test by video" if spec.split.official else "",
    )
    ds.skipped.extend(skipped)
    return ds


def autolaparo_labels(path: Path) -> list[tuple[int, int, int]]:
    """(line, frame, phase) of a label file: a header line, then whitespace-separated 'frame phase' rows."""
    out = []
    for i, text in enumerate(path.read_text().splitlines()[1:], start=2):
        if not text.strip():
            continue
        parts = text.split()
        try:
            frame, phase = int(parts[0]), int(parts[1])
        except (IndexError, ValueError):
            raise DataError(
                f"{path}, line {i}: expected 'frame phase' (two integers), found '{text.strip()}'"
            ) from None
        if not 1 <= phase <= len(AUTOLAPARO_PHASES):
            raise DataError(
                f"{path}, line {i}: phase {phase} is outside the class list 1-{len(AUTOLAPARO_PHASES)} "
                f"({', '.join(AUTOLAPARO_PHASES)})"
            )
        out.append((i, frame, phase))
    return out


def _frame_files(folder: Path) -> dict[int, Path]:
    """Index -> file of the frames extracted from one video (``00000.png``: the first second)."""
    out = {}
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        if p.suffix.lower() in IMAGE_SUFFIXES and re.fullmatch(r"\d+", p.stem):
            out[int(p.stem)] = p
    return out


# ---------------------------------------------------------------- shared


def _frame_row(sample_id: str, video: str, path: Path, fold: str, label: str) -> dict:
    return {"sample_id": sample_id, "patient_id": str(video), "path": str(path), "part": fold, "label": label}


def _one_hot(df: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    labels = df.pop("label")
    hot = np.eye(len(classes), dtype=int)[labels.map(classes.index).to_numpy()]
    return pd.concat([df, pd.DataFrame(hot, columns=classes, index=df.index)], axis=1)


def _no_video_in_two(df: pd.DataFrame, column: str, where: str) -> None:
    """A published split by video holds no video in two parts (else train and test would share a video)."""
    parts = df.groupby("patient_id")[column].nunique()
    if (parts > 1).any():
        video = parts.index[int(np.argmax(parts.to_numpy() > 1))]
        found = sorted(df.loc[df["patient_id"] == video, column].unique())
        raise LeakageError(f"{where}: video {video} has frames in {found}; a split by video holds each video in one")


def _tags(title: str, root: Path, how: str, videos: str) -> dict:
    return data_tags(REAL, title, root=root, split=how, patient_ids=videos)
