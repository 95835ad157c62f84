"""Adapter ``edd2020``: EDD2020 (Endoscopy Disease Detection and Segmentation, EndoCV2020; Ali et al. 2020, arXiv
2003.03376), 2D RGB endoscopy frames with five disease classes whose masks may overlap.

The published release (``EDD2020_release-I_2020-01-15/``; layout below) holds every frame as
``originalImages/<stem>.jpg``, one binary mask per class annotated on the frame as ``masks/<stem>_<class>.tif``
(255 on the region; a class without a file is absent from the frame) and the detection boxes as
``bbox/<stem>.txt`` (``x1 y1 x2 y2 <class>`` per line, VOC). ``class_list.txt`` lists BE, suspicious, HGD,
cancer, polyp in that order. Sources checked: the organisers' repository (github.com/sharib-vision/EDD2020:
README "255 gray values", class_list.txt, compositeMasks.py stacking the per-class tifs, the evaluation script
thresholding masks at > 0) and public loaders of the release (file names ``EDD2020_ACB0001.jpg``,
``masks/EDD2020_ACB0001_BE.tif``, ``bbox/EDD2020_ACB0001.txt``); 386 frames with 502 mask files (BE 160,
suspicious 88, HGD 74, cancer 53, polyp 127 frames) per dataset-ninja's statistics of the release. Not checked:
the frames' sizes (they come from several centres and differ; the adapter does not assume one).

Masks are multi-label: the task is ``multilabel_segmentation`` (``dinoscale.tasks``): the adapter composes the
per-class tifs of a frame into one bit-packed label map (bit c-1 = class c, ``dinoscale.metrics.pack_labels``),
and the segmentation probe trains a sigmoid per class. Frames differ in size and segmentation cells stack label
maps, so every map is resampled (nearest) to one grid: the smallest frame's rows x columns over the dataset
(no map is upsampled beyond its frame); the encoder sees each frame resized to its square input as usual, so
token grid and label map cover the same field of view. The composed maps are PNGs under the sweep's storage,
written once per set of files. Dice and IoU are computed on that grid, not at each frame's native size.

Split: the release publishes no train/val/test split (the challenge's test frames were held back) and no
patient ids, so every frame is its own unit: a seeded frame-level random split (``dataset.split``), intervals
over frames. Frames of one patient or video may fall into different splits (the release cannot tell).
The bbox files are not read (segmentation only).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import atomic_dir, data_root, patient_splits, require
from dinoscale.data.readers import BAD_FILE_HINT
from dinoscale.metrics import pack_labels
from dinoscale.provenance import REAL, data_tags

CLASSES = ("BE", "suspicious", "HGD", "cancer", "polyp")  # class_list.txt, in its order
STRUCTURES = {i + 1: c for i, c in enumerate(CLASSES)}  # bit i of a composed map = class i + 1
LAYOUT = """    originalImages/<stem>.jpg          RGB frames (e.g. EDD2020_ACB0001.jpg), sizes differ between centres
    masks/<stem>_<class>.tif           one binary mask (255 = region) per class on the frame; none = absent
    bbox/<stem>.txt                    x1 y1 x2 y2 <class> per line (VOC; not read)
    class_list.txt                     BE, suspicious, HGD, cancer, polyp (optional; checked when present)"""
SOURCE = "https://edd2020.grand-challenge.org (EDD2020_release-I_2020-01-15; github.com/sharib-vision/EDD2020)"


def _masks(root: Path) -> dict[str, dict[str, Path]]:
    """stem -> class -> mask file; a class outside class_list.txt is an error naming the file."""
    out: dict[str, dict[str, Path]] = {}
    for f in sorted(require(root / "masks", "EDD2020", LAYOUT).glob("*.tif")):
        stem, _, cls = f.stem.rpartition("_")
        if cls not in CLASSES:
            raise DataError(
                f"{f}: class label '{cls}' outside EDD2020's class_list.txt ({', '.join(CLASSES)}); masks are "
                "named masks/<stem>_<class>.tif"
            )
        out.setdefault(stem, {})[cls] = f
    return out


def _check_class_list(root: Path) -> None:
    f = root / "class_list.txt"
    if f.is_file():
        listed = [line.strip() for line in f.read_text().splitlines() if line.strip()]
        if listed != list(CLASSES):
            raise DataError(f"{f}: lists {listed}; the EDD2020 release lists {list(CLASSES)} (in that order)")


def _size(img: Path) -> tuple[int, int]:
    """(rows, cols) from the file's header."""
    try:
        with Image.open(img) as im:
            w, h = im.size
    except Exception as e:  # PIL raises several types for a broken file
        raise DataError(f"{img}: unreadable image ({e}); {BAD_FILE_HINT}") from e
    return h, w


def _read_binary(mask: Path, img: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        arr = np.asarray(tifffile.imread(mask))
    except Exception as e:
        raise DataError(f"{mask}: unreadable mask ({e}); {BAD_FILE_HINT}") from e
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # a mask saved as RGB(A): any channel on
        arr = arr.max(-1)
    if arr.shape != shape:
        raise DataError(f"{mask}: mask of shape {tuple(arr.shape)} does not match its frame {img} {shape}")
    return arr > 0  # the organisers' evaluation thresholds masks at > 0


def _nearest(arr: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of (..., H, W) to ``grid`` (pixel centres)."""
    rows = ((np.arange(grid[0]) + 0.5) * arr.shape[-2] / grid[0]).astype(int)
    cols = ((np.arange(grid[1]) + 0.5) * arr.shape[-1] / grid[1]).astype(int)
    return arr[..., rows[:, None], cols[None, :]]


def _key(frames: list[tuple[Path, dict[str, Path]]], grid: tuple[int, int]) -> str:
    h = hashlib.sha256(f"grid={grid}\n".encode())
    for img, masks in frames:
        for f in [img, *masks.values()]:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _compose(frames, shapes, grid, storage: Path) -> Path:
    """The folder of composed bit-packed label maps (one PNG per frame, on ``grid``), written once."""
    out_dir = Path(storage) / "edd2020" / _key(frames, grid)

    def write(tmp: Path) -> None:
        for (img, masks), shape in zip(frames, shapes):
            binary = np.zeros((len(CLASSES), *shape), bool)
            for cls, f in masks.items():
                binary[CLASSES.index(cls)] = _read_binary(f, img, shape)
            Image.fromarray(pack_labels(_nearest(binary, grid))).save(tmp / f"{img.stem}.png")
        (tmp / "done").write_text("")

    atomic_dir(out_dir, write, marker="done")
    return out_dir


@register_dataset(
    "edd2020",
    task="multilabel_segmentation",
    color="rgb",
    published=PublishedSize(
        386,
        pixels=(1024, 1280),
        source="EDD2020 release-I: 386 frames, 502 per-class masks (5 classes, may overlap); frame sizes differ "
        "between centres (pixels: a typical size, not verified)",
    ),
)
def prepare_edd2020(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "EDD2020", LAYOUT, SOURCE)
    _check_class_list(root)
    images = sorted(require(root / "originalImages", "EDD2020", LAYOUT).glob("*.jpg"))
    if not images:
        raise DataError(f"EDD2020: no frames originalImages/*.jpg under {root}. Expected layout:\n{LAYOUT}")
    masks = _masks(root)
    orphans = sorted(set(masks) - {p.stem for p in images})
    if orphans:
        raise DataError(f"EDD2020: masks of {orphans[:5]} have no frame originalImages/<stem>.jpg under {root}")
    frames, shapes, skipped = [], [], []
    for img in images:
        try:
            shapes.append(_size(img))
        except DataError as e:
            if spec.on_bad_file != "skip":
                raise
            skipped.append({"path": str(img), "reason": str(e)})
            continue
        frames.append((img, masks.get(img.stem, {})))
    grid = (min(s[0] for s in shapes), min(s[1] for s in shapes))
    folder = _compose(frames, shapes, grid, storage)
    df = pd.DataFrame(
        {
            "sample_id": [img.stem for img, _ in frames],
            "patient_id": [img.stem for img, _ in frames],  # no patient ids published: the frame is the unit
            "path": [str(img) for img, _ in frames],
            "mask_path": [str(folder / f"{img.stem}.png") for img, _ in frames],
        }
    )
    df["split"], how = patient_splits(df, spec, None)
    tags = data_tags(
        REAL,
        "EDD2020",
        root=root,
        split=f"{how} by frame (no split or patient ids published); label maps on the {grid[0]} x {grid[1]} grid",
    )
    ds = PreparedDataset(spec.name, "multilabel_segmentation", [], df, tags, root, mask_labels=dict(STRUCTURES))
    ds.skipped.extend(skipped)
    return ds
