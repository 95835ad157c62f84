"""NIH ChestX-ray14 replica (Wang et al. 2017), in the Kaggle layout of the v2020 release.

Written under ``root``::

    Data_Entry_2017_v2020.csv    the real columns: Image Index, Finding Labels, Follow-up #, Patient ID,
                                 Patient Age, Patient Gender, View Position, OriginalImage[Width,Height],
                                 OriginalImagePixelSpacing[x,y]
    train_val_list.txt           official patient-wise lists (image names, one a line)
    test_list.txt
    images_001/images/00000001_000.png ...   <8-digit patient>_<3-digit follow-up>.png, spread over
    images_002/images/...                    several images_NNN folders as in the Kaggle release

PNG: 8-bit grey, and a few RGBA (the real set holds some 4-channel PNGs, which readers must average).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dinoscale.data.nih import CLASSES
from dinoscale.data.replicas import Replica, register_replica
from dinoscale.data.replicas._pixels import grey_image, truncate

N_PATIENTS = 48
SIZE = 128  # the real PNGs are 1024 x 1024
FOLDERS = 3  # images_001..003 (the real release: 12)
HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
]


@register_replica("nih-chestxray14", variants=("corrupt_file", "bad_label"))
def write_nih(root: Path, spec, variant: str = "ok", seed: int = 0) -> Replica:
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows, names = [], []
    n_test_patients = N_PATIENTS // 4
    test_names: list[str] = []
    for pid in range(1, N_PATIENTS + 1):
        for follow in range(int(rng.integers(1, 4))):
            name = f"{pid:08d}_{follow:03d}.png"
            findings = [c for c in CLASSES if rng.random() < 0.3]
            folder = root / f"images_{1 + len(names) % FOLDERS:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            img = grey_image(rng, SIZE, positive=bool(findings))
            if len(names) % 17 == 5:  # a few RGBA PNGs, as in the real set
                rgba = np.dstack([img, img, img, np.full_like(img, 255)])
                Image.fromarray(rgba, "RGBA").save(folder / name)
            else:
                Image.fromarray(img, "L").save(folder / name)
            w, h = (int(v) for v in rng.integers(2000, 3000, 2))
            spacing = 0.143 if rng.random() < 0.8 else 0.139
            rows.append(
                [
                    name,
                    "|".join(findings) or "No Finding",
                    follow,
                    pid,
                    int(rng.integers(18, 90)),
                    "M" if rng.random() < 0.56 else "F",
                    "PA" if rng.random() < 0.6 else "AP",
                    w,
                    h,
                    spacing,
                    spacing,
                ]
            )
            names.append(name)
            if pid > N_PATIENTS - n_test_patients:
                test_names.append(name)
    broken = None
    if variant == "bad_label":
        rows[3][1] = "Pneumonnia"  # a misspelt finding: not in the 14-class list
        broken = f"Data_Entry_2017_v2020.csv line 5 ({rows[3][0]}): label 'Pneumonnia'"
    pd.DataFrame(rows, columns=HEADER).to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    (root / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in set(test_names)) + "\n")
    if variant == "corrupt_file":
        broken = truncate(next(root.glob(f"images_*/images/{names[0]}")))
    return Replica(
        root=root,
        dataset="nih-chestxray14",
        reproduces=[
            "Data_Entry_2017_v2020.csv with its 11 real columns (multi-label 'Finding Labels' joined by '|', "
            "'No Finding')",
            "official patient-wise train_val_list.txt / test_list.txt",
            "Kaggle folders images_NNN/images/<patient>_<follow-up>.png",
            "8-bit grey PNGs and a few RGBA PNGs",
            "several follow-up images per patient",
        ],
        leaves_out=[
            f"{len(names)} images of {N_PATIENTS} patients at {SIZE} px (real: 112,120 of 30,805 at 1024 px)",
            "real anatomy and findings (a blob marks any finding)",
            f"{FOLDERS} image folders (real: 12); BBox_List_2017.csv",
        ],
        broken=broken,
    )
