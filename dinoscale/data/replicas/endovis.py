"""EndoVis 2018 replica in the layout ISINet's organiser writes (instrument types), small.

Written under ``root``::

    train/images/seq<N>_frame<XXX>.png               RGB frames (H x W = 128 x 160; real 1024 x 1280)
    train/annotations/seq<N>_frame<XXX>.png          uint8 instrument-type maps (0 background, 1-7)
    train/binary_annotations/seq<N>_frame<XXX>.png   uint8 instrument (1) vs background (0)
    val/...                                           sequences 2, 5, 9, 15 (ISINet's val = the test split)

Training sequences 1, 3, 4, 6, 7, 10, 11, 12, 13, 14, 16 as ISINet's organiser lists them; frame numbers step by
2 as at the 2 Hz subsampling of the release (frame000, frame002, ...). A frame is reddish tissue with one or
two instruments, each a shaft from the image border with a tip; each type gets its own tint so a probe has
something to find (real instruments are grey metal: the numbers of a rehearsal mean nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dinoscale.data.endovis import INSTRUMENT_TYPES, TEST_SEQUENCES
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import truncate

TRAIN_SEQUENCES = (1, 3, 4, 6, 7, 10, 11, 12, 13, 14, 16)
FRAMES = 3  # per sequence (real: 149)
H, W = 128, 160  # real: 1024 x 1280
TINT = {  # type -> RGB of its shaft (distinct hues; real instruments are grey)
    1: (70, 90, 200),
    2: (60, 190, 80),
    3: (210, 200, 60),
    4: (200, 70, 200),
    5: (60, 200, 210),
    6: (230, 140, 40),
    7: (240, 240, 240),
}


def _frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [H, W, 3], type map uint8 [H, W]): tissue with one or two instruments."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    tissue = np.stack([150 + 30 * np.sin(xx / 9), 60 + 15 * np.cos(yy / 7), 60 + 10 * np.sin((xx + yy) / 11)], -1)
    img = tissue + rng.normal(0, 8, (H, W, 3))
    types = np.zeros((H, W), np.uint8)
    for t in rng.choice(list(INSTRUMENT_TYPES), size=int(rng.integers(1, 3)), replace=False):
        x0, angle = rng.uniform(0.1, 0.9) * W, rng.uniform(0.35, 1.2)  # enters from the bottom border
        length, width = rng.uniform(0.45, 0.8) * H, rng.uniform(8, 14)
        dx, dy = np.cos(angle) * (1 if rng.random() < 0.5 else -1), -np.sin(angle)
        # distance of each pixel to the shaft segment from (x0, H) along (dx, dy)
        s = np.clip((xx - x0) * dx + (yy - H) * dy, 0, length)
        d = np.hypot(xx - (x0 + s * dx), yy - (H + s * dy))
        shaft = d < width / 2
        tip = np.hypot(xx - (x0 + length * dx), yy - (H + length * dy)) < width * 0.9
        part = shaft | tip
        img[part] = np.asarray(TINT[int(t)]) + rng.normal(0, 6, (int(part.sum()), 3))
        types[part] = t
    return np.clip(img, 0, 255).astype(np.uint8), types


@register_replica("endovis2018", variants=("corrupt_file", "bad_label", "mask_shape"))
def write_endovis2018(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    broken, written = None, []
    for folder, seqs in (("train", TRAIN_SEQUENCES), ("val", TEST_SEQUENCES)):
        for sub in ("images", "annotations", "binary_annotations"):
            (root / folder / sub).mkdir(parents=True, exist_ok=True)
        for seq in seqs:
            for k in range(FRAMES):
                name = f"seq{seq}_frame{2 * k:03d}.png"
                img, types = _frame(rng)
                if variant == "bad_label" and not written:
                    types[types > 0] = 9  # a type ISINet does not have
                    broken = f"{root / folder / 'annotations' / name}: label 9 outside the 7 instrument types"
                if variant == "mask_shape" and len(written) == 1:
                    types = types[:-8]
                    broken = f"{root / folder / 'annotations' / name}: shape {types.shape} differs from its frame"
                Image.fromarray(img).save(root / folder / "images" / name)
                Image.fromarray(types).save(root / folder / "annotations" / name)
                Image.fromarray((types > 0).astype(np.uint8)).save(root / folder / "binary_annotations" / name)
                written.append(root / folder / "images" / name)
    if variant == "corrupt_file":
        broken = truncate(written[0])
    return Replica(
        root=root,
        dataset="endovis2018",
        reproduces=[
            "ISINet's organised layout: {train,val}/{images,annotations,binary_annotations}/seq<N>_frame<XXX>.png",
            "the split by sequence: train 1, 3, 4, 6, 7, 10, 11, 12, 13, 14, 16; val (= test) 2, 5, 9, 15",
            "RGB PNG frames at the 5:4 aspect of the release; uint8 type maps with ISINet's 7 instrument types",
        ],
        leaves_out=[
            f"{FRAMES} frames per sequence at {W}x{H} (real: 149 at 1280x1024); the release folders, right frames, "
            "camera calibration and the 12-class scene labels",
            "real surgical video: tissue is a texture, each instrument type a tinted bar with a tip",
        ],
        broken=broken,
    )
