"""EDD2020 replica in the layout of the published release (``EDD2020_release-I_2020-01-15/``), small.

Written under ``root``::

    originalImages/EDD2020_<centre><NNNN>.jpg     RGB JPEG frames, three sizes (real: several centres' sizes)
    masks/EDD2020_<centre><NNNN>_<class>.tif      uint8 0 / 255, one per class on the frame (absent: no file)
    bbox/EDD2020_<centre><NNNN>.txt               "x1 y1 x2 y2 <class>" per region (VOC), from the masks
    class_list.txt                                BE, suspicious, HGD, cancer, polyp

Frame names use centre codes seen in the release (ACB, AJ, B). A frame is pinkish mucosa with one to three
regions, each class tinted its own colour so a probe has something to find: Barrett's (BE) a large patch, with
a suspicious or HGD area inside it on some frames (the masks overlap, as in the release), cancer or a polyp
elsewhere (the numbers of a rehearsal mean nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from dinoscale.data.edd import CLASSES
from dinoscale.data.replicas import Replica, ellipsoid, register_replica

FRAMES = (("ACB", 5), ("AJ", 5), ("B", 5))  # centre code, frames (real: 386 frames)
SIZES = ((96, 120), (104, 128), (112, 136))  # (rows, cols) per centre (real: larger, several sizes)
TINT = {  # class -> RGB of its region (real lesions are subtle; tinted here so the probe can find them)
    "BE": (200, 120, 60),
    "suspicious": (120, 60, 160),
    "HGD": (60, 160, 200),
    "cancer": (230, 230, 90),
    "polyp": (90, 200, 90),
}


def _region(rng, shape, inside: np.ndarray | None = None) -> np.ndarray:
    h, w = shape
    if inside is not None:  # a smaller ellipse centred in the parent region (it overlaps it)
        ys, xs = np.nonzero(inside)
        centre, radii = (ys.mean(), xs.mean()), (max(3.0, ys.std()), max(3.0, xs.std()))
    else:
        centre = (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w)
        radii = (rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w)
    return ellipsoid(shape, centre, radii)


def _frame(rng: np.random.Generator, shape, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(RGB uint8, {class: bool mask}): BE with an overlapping suspicious / HGD area, or cancer, or a polyp."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([170 + 20 * np.sin(xx / 7), 90 + 15 * np.cos(yy / 9), 90 + 10 * np.sin((xx + yy) / 13)], -1)
    img = img + rng.normal(0, 6, (h, w, 3))
    masks: dict[str, np.ndarray] = {}
    if k % 3 == 2:
        masks["cancer" if k % 2 else "polyp"] = _region(rng, shape)
    else:
        masks["BE"] = _region(rng, shape)
        masks["suspicious" if k % 2 else "HGD"] = _region(rng, shape, masks["BE"])
    for cls, m in masks.items():  # inner regions painted last: their tint shows where they overlap BE
        img[m] = np.asarray(TINT[cls]) + rng.normal(0, 5, (int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), masks


def _bbox_lines(masks: dict[str, np.ndarray]) -> str:
    lines = []
    for cls, m in masks.items():
        ys, xs = np.nonzero(m)
        lines.append(f"{xs.min()} {ys.min()} {xs.max()} {ys.max()} {cls}")
    return "\n".join(lines) + "\n"


# no corrupt_file variant: an unreadable JPEG frame is the readers' case, rehearsed with Kvasir-Capsule's JPEG frames
@register_replica("edd2020", variants=("bad_label", "mask_shape"))
def write_edd2020(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    for sub in ("originalImages", "masks", "bbox"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "class_list.txt").write_text("\n".join(CLASSES))
    broken, written, k = None, [], 0
    for (centre, n), shape in zip(FRAMES, SIZES):
        for i in range(1, n + 1):
            stem = f"EDD2020_{centre}{i:04d}"
            img, masks = _frame(rng, shape, k)
            k += 1
            Image.fromarray(img).save(root / "originalImages" / f"{stem}.jpg", quality=90)
            (root / "bbox" / f"{stem}.txt").write_text(_bbox_lines(masks))
            for cls, m in masks.items():
                arr = m.astype(np.uint8) * 255
                name = f"{stem}_{cls}.tif"
                if variant == "bad_label" and broken is None:
                    name = f"{stem}_ulcer.tif"  # a class the release does not have
                    broken = f"{root / 'masks' / name}: class label 'ulcer' outside class_list.txt"
                if variant == "mask_shape" and len(written) == 1 and broken is None:
                    arr = arr[:-8]
                    broken = f"{root / 'masks' / name}: shape {arr.shape} differs from its frame"
                tifffile.imwrite(root / "masks" / name, arr)
            written.append(root / "originalImages" / f"{stem}.jpg")
    return Replica(
        root=root,
        dataset="edd2020",
        reproduces=[
            "the release's layout: originalImages/<stem>.jpg, masks/<stem>_<class>.tif, bbox/<stem>.txt, "
            "class_list.txt (BE, suspicious, HGD, cancer, polyp in that order)",
            "one uint8 0/255 tif per class annotated on a frame, none for an absent class; masks that overlap "
            "(suspicious / HGD inside BE); frames of different sizes; RGB JPEG frames; VOC bbox lines",
            "no published split or patient ids: the frame-level random split the adapter then draws",
        ],
        leaves_out=[
            f"{sum(n for _, n in FRAMES)} frames at {SIZES[0][1]}x{SIZES[0][0]} to {SIZES[-1][1]}x{SIZES[-1][0]} "
            "(real: 386 frames from several centres at their own, larger, sizes (not verified))",
            "real endoscopy: mucosa is a texture, each class a tinted ellipse; at most two classes per frame",
        ],
        broken=broken,
    )
