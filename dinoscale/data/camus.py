"""CAMUS (2D echocardiography, apical 2- and 4-chamber views): ED -> ES registration pairs.

The public NIfTI release (layout in ``dinoscale.data.replicas.camus``): per patient and view an end-diastolic
(ED) and an end-systolic (ES) frame with label maps (1 LV cavity, 2 myocardium, 3 left atrium), and the
official split lists ``database_split/subgroup_{training,validation,testing}.txt``.

The reference benchmark (arXiv 2509.06467, after DINO-Reg) registers ES (moving) onto ED (fixed) per view, the
frames resized to 128 x 128: 800 / 100 / 100 pairs. The adapter does that resize once, into PNG copies under
the sweep's storage (images bilinear with anti-aliasing, label maps nearest), keyed by the files it read: the
readers of 2D images read rasters, and every label map of a registration split has one shape. Its manifest lists
each pair as two rows, fixed (ED) then moving (ES), the order the registration probe reads
(``dinoscale.probes.registration``); distances are in px of the 128 x 128 grid, as the benchmark reports them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image

from dinoscale.data.dataset import DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import atomic_dir, data_root, patient_splits
from dinoscale.data.readers import BAD_FILE_HINT
from dinoscale.provenance import REAL, data_tags

LAYOUT = """    database_nifti/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz   (+ _gt.nii.gz: 0 bg, 1 LV, 2 myocardium, 3 LA)
    database_nifti/patientNNNN/Info_{2CH,4CH}.cfg
    database_split/subgroup_{training,validation,testing}.txt       (optional: the official split)"""
SOURCE = "https://humanheart-project.creatis.insa-lyon.fr/database/#collection/6373703d73e9f0047faa1bc8 (CAMUS)"
STRUCTURES = {1: "LV", 2: "myocardium", 3: "left atrium"}
VIEWS = ("2CH", "4CH")
SIZE = 128  # the reference benchmark's frame size
SPLIT_FILES = {"train": "subgroup_training.txt", "val": "subgroup_validation.txt", "test": "subgroup_testing.txt"}


def _read(path: Path) -> np.ndarray:
    """A CAMUS frame as (rows, cols): the release stores (width, height)."""
    try:
        arr = np.asarray(nib.load(str(path)).dataobj)
    except Exception as e:
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e}); {BAD_FILE_HINT}") from e
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2D frame, got shape {arr.shape}")
    return np.swapaxes(arr, 0, 1)


def _pair_files(folder: Path, view: str) -> list[Path]:
    name = folder.name
    return [folder / f"{name}_{view}_{phase}{gt}.nii.gz" for phase in ("ED", "ES") for gt in ("", "_gt")]


def _convert(files: list[Path], out: Path) -> None:
    """ED, ED_gt, ES, ES_gt of one view -> 128 x 128 PNGs (labels checked against the four CAMUS values)."""
    for img_path, gt_path in (files[:2], files[2:]):
        img, gt = _read(img_path), _read(gt_path)
        if gt.shape != img.shape:
            raise DataError(f"{gt_path}: label map of shape {gt.shape} does not match its frame {img_path} {img.shape}")
        bad = sorted(set(np.unique(gt).astype(int).tolist()) - {0, *STRUCTURES})
        if bad or np.any(gt != np.round(gt)):
            raise DataError(
                f"{gt_path}: label value(s) {bad[:5]} outside CAMUS's 0 background, 1 LV, 2 myocardium, 3 LA"
            )
        lo, hi = float(img.min()), float(img.max())
        grey = np.round((img - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
        Image.fromarray(grey).resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=None).save(
            out / (img_path.name.removesuffix(".nii.gz") + ".png")
        )
        Image.fromarray(gt.astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.NEAREST).save(
            out / (gt_path.name.removesuffix(".nii.gz") + ".png")
        )


def _official(root: Path) -> dict[str, str] | None:
    files = {split: root / "database_split" / name for split, name in SPLIT_FILES.items()}
    if not all(f.is_file() for f in files.values()):
        return None
    where: dict[str, str] = {}
    for split, f in files.items():
        for line in f.read_text().split():
            if where.setdefault(line.strip(), split) != split:
                raise DataError(f"{f}: {line.strip()} is also in {SPLIT_FILES[where[line.strip()]]}")
    return where


def _key(pairs: list[list[Path]]) -> str:
    h = hashlib.sha256(f"size={SIZE}\n".encode())
    for files in pairs:
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _pairs(root: Path, on_bad: str, skipped: list) -> list[tuple[str, str, list[Path]]]:
    """(patient, view, [ED, ED_gt, ES, ES_gt]) of every view whose four files exist."""
    folders = sorted(p for p in (root / "database_nifti").glob("patient*") if re.fullmatch(r"patient\d+", p.name))
    if not folders:
        raise DataError(f"CAMUS: no database_nifti/patientNNNN folders under {root}. Expected layout:\n{LAYOUT}")
    out = []
    for folder in folders:
        for view in VIEWS:
            files = _pair_files(folder, view)
            missing = [f for f in files if not f.is_file()]
            if missing and on_bad == "error":
                raise DataError(f"{missing[0]} not found. Expected layout:\n{LAYOUT}")
            if missing:
                skipped.append({"path": str(missing[0]), "reason": "missing"})
                continue
            out.append((folder.name, view, files))
    return out


def _resized(pairs, storage: Path, on_bad: str, skipped: list) -> tuple[Path, set[int]]:
    """The folder of 128 x 128 PNGs (written once per set of files) and the pairs dropped as unreadable."""
    out_dir = storage / "camus" / _key([p[2] for p in pairs])
    dropped: set[int] = set()

    def write(tmp: Path) -> None:
        for i, (_, _, files) in enumerate(pairs):
            try:
                _convert(files, tmp)
            except DataError as e:
                if on_bad == "error":
                    raise
                dropped.add(i)
                skipped.append({"path": str(e).split(":")[0], "reason": str(e)})
        (tmp / "done").write_text("\n".join(map(str, sorted(dropped))))

    atomic_dir(out_dir, write, marker="done")
    text = (out_dir / "done").read_text().strip()
    return out_dir, {int(x) for x in text.split()} if text else set()


@register_dataset(
    "camus",
    task="registration",
    replicates="fixed",
    published=PublishedSize(
        2_000,
        pixels=(SIZE, SIZE),
        source="CAMUS public release: 500 patients x 2 views x (ED, ES) frames = 1,000 ED->ES pairs, resized to "
        "128 x 128 (reference benchmark: 800 / 100 / 100 pairs)",
    ),
)
def prepare_camus(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "CAMUS", LAYOUT, SOURCE)
    skipped: list[dict] = []
    pairs = _pairs(root, spec.on_bad_file, skipped)
    folder, dropped = _resized(pairs, Path(storage), spec.on_bad_file, skipped)
    rows = []
    for i, (patient, _view, files) in enumerate(pairs):
        if i in dropped:
            continue
        for img in (files[0], files[2]):  # fixed (ED), then moving (ES): the pair order the probe reads
            stem = img.name.removesuffix(".nii.gz")
            rows.append(
                {
                    "sample_id": stem,
                    "patient_id": patient,
                    "path": str(folder / f"{stem}.png"),
                    "mask_path": str(folder / f"{stem}_gt.png"),
                }
            )
    df = pd.DataFrame(rows)
    official = _official(root)
    listed = pd.Series(df["patient_id"].map(official)) if official is not None else None
    if listed is not None and listed.isna().any():
        raise DataError(
            f"{root / 'database_split'}: patient {df['patient_id'][listed.isna()].iloc[0]} is in none of "
            f"{list(SPLIT_FILES.values())}; give all three lists of the split or none"
        )
    df["split"], how = patient_splits(df, spec, listed)
    tags = data_tags(REAL, "CAMUS", root=root, split=f"{how}; ED->ES pairs per view, resized to {SIZE} x {SIZE}")
    why = "the official database_split lists" if official is not None else ""
    ds = PreparedDataset(
        spec.name,
        "registration",
        [],
        df,
        tags,
        root,
        mask_labels=dict(STRUCTURES),
        replicates="fixed",
        replicates_reason=why,
    )
    ds.skipped.extend(skipped)
    return ds
