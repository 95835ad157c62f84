"""Adapters for published layouts (each tested on a small fixture written in that exact layout).

Every adapter: a missing root names the expected layout and the source; labels outside the class
list are errors naming the label and the file/row; splits are official where the dataset has them,
else patient-level. 3D adapters read NIfTI headers only (n_slices, shape checks), never voxels.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from dinoscale.data.dataset import CENTER_COLUMN, DataError, PreparedDataset, PublishedSize, register_dataset
from dinoscale.data.layout import data_root, fold_splits, patient_splits, require
from dinoscale.data.readers import npz_member
from dinoscale.provenance import REAL, data_tags


def _header_shape(path: Path, on_bad: str, skipped: list) -> tuple[int, ...] | None:
    import nibabel as nib

    try:
        return tuple(int(x) for x in nib.load(str(path)).shape)
    except Exception as e:
        if on_bad == "skip":
            skipped.append({"path": str(path), "reason": f"{type(e).__name__}: {e}"})
            return None
        raise DataError(f"{path}: cannot read NIfTI header ({type(e).__name__}: {e})") from e


def _same_shape(img: Path, img_shape, other: Path, other_shape) -> None:
    if tuple(img_shape[:3]) != tuple(other_shape[:3]):
        raise DataError(
            f"{other}: shape {tuple(other_shape[:3])} does not match its image {img} {tuple(img_shape[:3])}"
        )


def _real(spec, title, root, split_how, **kw) -> dict:
    return data_tags(REAL, title, root=root, split=split_how, **kw)


# ---------------------------------------------------------------- RSNA Pneumonia (DICOM)

RSNA_LAYOUT = """    stage_2_train_labels.csv       patientId,x,y,width,height,Target (one row per box; Target 0/1)
    stage_2_train_images/<patientId>.dcm
    train.csv, val.csv, test.csv   optional: MGCA's published split (a patientId column each)"""
RSNA_SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}  # MGCA (Wang et al. 2022)
RSNA_SOURCE = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge (RSNA / Kaggle)"


@register_dataset(
    "rsna-pneumonia",
    published=PublishedSize(
        26_684,
        pixels=(1024, 1024),
        source="RSNA Pneumonia Detection Challenge, stage 2 train: 26,684 DICOMs, 1024x1024",
    ),
)
def prepare_rsna(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "RSNA Pneumonia", RSNA_LAYOUT, RSNA_SOURCE)
    csv = require(root / "stage_2_train_labels.csv", "RSNA Pneumonia", RSNA_LAYOUT)
    raw = pd.read_csv(csv, dtype={"patientId": str})
    bad = ~raw["Target"].isin([0, 1])
    if bad.any():
        i = int(bad.idxmax())
        raise DataError(f"{csv}, line {i + 2}: label Target={raw['Target'][i]} not in the class list [0, 1]")
    per = raw.groupby("patientId", sort=True)["Target"].max()
    images = root / "stage_2_train_images"
    df = pd.DataFrame(
        {
            "sample_id": per.index,
            "patient_id": per.index,
            "path": [str(images / f"{p}.dcm") for p in per.index],
            "Pneumonia": per.to_numpy().astype(int),
        }
    )
    absent = [p for p in df["path"] if not Path(p).is_file()]
    if absent and spec.on_bad_file == "error":
        raise DataError(
            f"RSNA Pneumonia: {len(absent)} image(s) in {csv.name} missing (first: {absent[0]}). Expected layout:\n{RSNA_LAYOUT}"
        )
    df["split"], how = patient_splits(df, spec, _rsna_split(root, df))
    return PreparedDataset(spec.name, "multilabel", ["Pneumonia"], df, _real(spec, "RSNA Pneumonia", root, how), root)


def _rsna_split(root: Path, df: pd.DataFrame) -> pd.Series | None:
    """MGCA's split (the reference benchmark's) when its three lists lie beside the labels; else None."""
    files = {split: root / name for split, name in RSNA_SPLIT_FILES.items()}
    if not all(f.is_file() for f in files.values()):
        return None
    where: dict[str, str] = {}
    for split, f in files.items():
        table = pd.read_csv(f, dtype={"patientId": str})
        if "patientId" not in table.columns:
            raise DataError(f"{f}: no patientId column (MGCA's split lists name each image's patientId)")
        for pid in table["patientId"]:
            if where.setdefault(pid, split) != split:
                raise DataError(f"{f}: patientId {pid} is also in {RSNA_SPLIT_FILES[where[pid]]}")
    unlisted = [p for p in df["patient_id"] if p not in where]
    if unlisted:
        raise DataError(
            f"{root}: {len(unlisted)} image(s) of stage_2_train_labels.csv are in none of {list(RSNA_SPLIT_FILES.values())} "
            f"(first: {unlisted[0]}); give all three lists of the split or none"
        )
    return df["patient_id"].map(where)


# ---------------------------------------------------------------- CT-RATE (NIfTI + multi-abnormality labels)

CT_RATE_CLASSES = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]
CT_RATE_LAYOUT = """    dataset/train/train_<patient>/train_<patient>_<scan>/train_<patient>_<scan>_<recon>.nii.gz
    dataset/valid/valid_<patient>/...                                  (official validation = test here)
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + 18 abnormality columns"""
CT_RATE_SOURCE = "https://huggingface.co/datasets/ibrahimhamamci/CT-RATE"


@register_dataset(
    "ct-rate",
    published=PublishedSize(
        50_188,
        "volume",
        per_unit=300,
        pixels=(512, 512),
        source="Hamamci et al. 2024 (CT-RATE): 50,188 reconstructed volumes of 25,692 chest CTs, 21,304 patients; "
        "in-plane 512^2 to 1024^2, slices 0.5-2.5 mm thick; ~300 axial slices per volume is an estimate "
        "(a ~300 mm chest field at ~1 mm), not a published median",
    ),
)
def prepare_ct_rate(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "CT-RATE", CT_RATE_LAYOUT, CT_RATE_SOURCE)
    base = root / "dataset" if (root / "dataset").is_dir() else root
    frames = []
    for part, split in (("train", "train"), ("valid", "test")):
        csv = base / "multi_abnormality_labels" / f"{part}_predicted_labels.csv"
        if csv.is_file():
            lab = pd.read_csv(csv)
            extra = [c for c in lab.columns if c not in CT_RATE_CLASSES and c != "VolumeName"]
            if extra:
                raise DataError(f"{csv}: label(s) {extra} not in the class list {CT_RATE_CLASSES}")
            for c in CT_RATE_CLASSES:
                bad = ~lab[c].isin([0, 1])
                if bad.any():
                    raise DataError(
                        f"{csv}, line {int(bad.idxmax()) + 2}, '{c}': value '{lab[c][bad.idxmax()]}' is not 0 or 1"
                    )
            frames.append(lab.assign(split=split, _csv=str(csv)))
    if not frames:
        raise DataError(
            f"CT-RATE: no multi_abnormality_labels/*_predicted_labels.csv under {base}. Expected layout:\n{CT_RATE_LAYOUT}"
        )
    lab = pd.concat(frames, ignore_index=True)[["VolumeName", *CT_RATE_CLASSES, "split", "_csv"]]
    files = {p.name: p for p in base.rglob("*.nii.gz")}
    rows, skipped = [], []
    for r in lab.itertuples(index=False):
        name = r.VolumeName
        p = files.get(name)
        if p is None:
            if spec.on_bad_file == "skip":
                skipped.append({"sample_id": name.removesuffix(".nii.gz"), "path": name, "reason": "missing"})
                continue
            raise DataError(
                f"CT-RATE: volume {name} (listed in {Path(r[-1]).name}) not found under {base}. Expected layout:\n{CT_RATE_LAYOUT}"
            )
        shape = _header_shape(p, spec.on_bad_file, skipped)
        if shape is None:
            continue
        rows.append(
            {
                "sample_id": name.removesuffix(".nii.gz"),
                "patient_id": "_".join(name.split("_")[:2]),
                "path": str(p),
                "n_slices": shape[2],
                "split": r.split,
                **{c: int(v) for c, v in zip(CT_RATE_CLASSES, r[1 : 1 + len(CT_RATE_CLASSES)])},
            }
        )
    df = pd.DataFrame(rows)
    df["split"], how = patient_splits(df, spec, df["split"])
    ds = PreparedDataset(spec.name, "multilabel", list(CT_RATE_CLASSES), df, _real(spec, "CT-RATE", root, how), root)
    ds.skipped.extend(skipped)
    return ds


# ---------------------------------------------------------------- MedMNIST+ (.npz, 2D and 3D, any size)

MEDMNIST_LAYOUT = """    <subset>.npz   e.g. chestmnist_224.npz, organmnist3d_64.npz (28 px files: chestmnist.npz)
                   arrays train/val/test_images, train/val/test_labels (the official split)"""
MEDMNIST_SOURCE = "https://medmnist.com (Zenodo record 10519652; `pip install medmnist` downloads them)"


# MedMNIST v2 / MedMNIST+ subsets: (classes, multi-label, colour), as in the medmnist package's INFO
MEDMNIST_CLASSES = {
    "pathmnist": (9, False, True),
    "chestmnist": (14, True, False),
    "dermamnist": (7, False, True),
    "octmnist": (4, False, False),
    "pneumoniamnist": (2, False, False),
    "retinamnist": (5, False, True),
    "breastmnist": (2, False, False),
    "bloodmnist": (8, False, True),
    "tissuemnist": (8, False, False),
    "organamnist": (11, False, False),
    "organcmnist": (11, False, False),
    "organsmnist": (11, False, False),
    "organmnist3d": (11, False, False),
    "nodulemnist3d": (2, False, False),
    "adrenalmnist3d": (2, False, False),
    "fracturemnist3d": (3, False, False),
    "vesselmnist3d": (2, False, False),
    "synapsemnist3d": (2, False, False),
}


def _medmnist_color(subset: str | None) -> str:
    """The published colour model of a MedMNIST+ subset (PathMNIST, DermaMNIST, BloodMNIST, RetinaMNIST: RGB)."""
    return "rgb" if MEDMNIST_CLASSES.get(re.sub(r"_\d+$", "", subset or ""), (0, False, False))[2] else "grey"


# Published sizes (images or volumes, all splits): MedMNIST v2 (Yang et al. 2023, Sci. Data 10:41, Table 1) and
# MedMNIST+ (Doerrich et al. 2024, arXiv 2404.15786: the same samples at 64 / 128 / 224 px, 3D at 64^3), as the
# medmnist package's INFO n_samples sums them. Keyed by dataset.subset: '<name>' is the 28 px file, '<name>_<S>'.
MEDMNIST_SAMPLES = {
    **dict(pathmnist=107_180, chestmnist=112_120, dermamnist=10_015, octmnist=109_309, pneumoniamnist=5_856),
    **dict(retinamnist=1_600, breastmnist=780, bloodmnist=17_092, tissuemnist=236_386),
    **dict(organamnist=58_830, organcmnist=23_583, organsmnist=25_211),
    **dict(organmnist3d=1_742, nodulemnist3d=1_633, adrenalmnist3d=1_584, fracturemnist3d=1_370),
    **dict(vesselmnist3d=1_908, synapsemnist3d=1_759),
}
_MEDMNIST_CITE = (
    "MedMNIST v2 (Yang et al. 2023, Sci. Data) / MedMNIST+ (Doerrich et al. 2024): the medmnist INFO counts"
)
MEDMNIST_PUBLISHED = {
    name + ("" if size == 28 else f"_{size}"): PublishedSize(
        n,
        "volume" if name.endswith("3d") else "image",
        per_unit=size if name.endswith("3d") else 1.0,  # a 3D item is size^3: `size` axial slices
        pixels=(size, size),
        source=_MEDMNIST_CITE,
    )
    for name, n in MEDMNIST_SAMPLES.items()
    for size in ((28, 64) if name.endswith("3d") else (28, 64, 128, 224))
}


@register_dataset("medmnist", task="auto", color=_medmnist_color, published=MEDMNIST_PUBLISHED)
def prepare_medmnist(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "MedMNIST+", MEDMNIST_LAYOUT, MEDMNIST_SOURCE)
    if not spec.subset:
        raise DataError(
            f"MedMNIST+: name the file with dataset.subset (e.g. 'organmnist3d_64'); found: "
            f"{sorted(p.stem for p in root.glob('*.npz'))}"
        )
    path = require(root / f"{spec.subset}.npz", "MedMNIST+", MEDMNIST_LAYOUT)
    frames = []
    try:
        with np.load(path, allow_pickle=False) as z:
            for split in ("train", "val", "test"):
                y = z[f"{split}_labels"]
                shape = npz_member(path, f"{split}_images").shape  # memory-mapped: the pixels are not read
                frames.append((split, y.reshape(len(y), -1), shape))
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # a truncated download: BadZipFile
        raise DataError(f"{path}: not a MedMNIST+ file ({type(e).__name__}: {e})") from e
    multilabel = frames[0][1].shape[1] > 1
    base = re.sub(r"_\d+$", "", spec.subset)
    if base in MEDMNIST_CLASSES:  # the published class count: a label outside it is an error, not a new class
        n_cls = MEDMNIST_CLASSES[base][0]
    else:
        n_cls = frames[0][1].shape[1] if multilabel else int(frames[0][1].max()) + 1  # from the train labels
    classes = list(spec.classes) if spec.classes else [f"class_{k}" for k in range(n_cls)]
    if len(classes) != n_cls:
        raise DataError(f"{path}: {n_cls} classes in the labels, {len(classes)} named in dataset.classes")
    # 2D colour sets store (N, S, S, 3), 3D sets (N, S, S, S): the published subset name tells them apart
    shape0 = frames[0][2]
    colour = len(shape0) == 4 and (
        MEDMNIST_CLASSES[base][2] if base in MEDMNIST_CLASSES else (shape0[-1] in (3, 4) and shape0[-1] != shape0[1])
    )
    rows = []
    for split, y, shape in frames:
        bad = np.flatnonzero((y < 0).any(1) | (y >= (2 if multilabel else n_cls)).any(1))
        if len(bad):
            raise DataError(
                f"{path}: {split}_labels[{bad[0]}] = {y[bad[0]].tolist()}: label outside "
                + ("0 / 1" if multilabel else f"the classes 0..{n_cls - 1}")
                + f" of {spec.subset}"
            )
        onehot = y if multilabel else np.eye(n_cls, dtype=int)[y[:, 0]]
        for i in range(len(y)):
            rows.append(
                {
                    "sample_id": f"{split}_{i}",
                    "patient_id": f"{split}_{i}",
                    "path": str(path),
                    "npz_key": f"{split}_images",
                    "npz_index": i,
                    "split": split,
                    **({"n_slices": shape[-1]} if len(shape) == 4 and not colour else {}),  # [x, y, z]: slices last
                    **dict(zip(classes, onehot[i].astype(int).tolist())),
                }
            )
    df = pd.DataFrame(rows)
    ds = PreparedDataset(
        spec.name,
        "multilabel" if multilabel else "multiclass",
        classes,
        df,
        _real(spec, f"MedMNIST+ {spec.subset}", root, "official (no patient ids: sample-level)"),
        root,
    )
    ds.color = "rgb" if colour else "grey"
    return ds


# ---------------------------------------------------------------- Medical Segmentation Decathlon

MSD_LAYOUT = """    <TaskXX_Name>/dataset.json     labels {"0": "background", ...}, training [{image, label}]
    <TaskXX_Name>/imagesTr/*.nii.gz, <TaskXX_Name>/labelsTr/*.nii.gz"""
MSD_SOURCE = "http://medicaldecathlon.com (CC-BY-SA 4.0)"


# Training volumes per task (each task's dataset.json) and median slices / in-plane size (nnU-Net's dataset
# fingerprints, Isensee et al. 2021, Nat. Methods, supplement; BrainTumour: its fixed 240x240x155 BraTS grid).
_MSD_SOURCE = (
    "Antonelli et al. 2022 (MSD): training volumes per task; median shapes: nnU-Net fingerprints (Isensee et al. 2021)"
)
MSD_PUBLISHED = {
    task: PublishedSize(n, "volume", per_unit=slices, pixels=(side, side), source=_MSD_SOURCE)
    for task, n, slices, side in (
        ("Task01_BrainTumour", 484, 155, 240),
        ("Task02_Heart", 20, 115, 320),
        ("Task03_Liver", 131, 432, 512),
        ("Task04_Hippocampus", 260, 36, 50),
        ("Task05_Prostate", 32, 20, 320),
        ("Task06_Lung", 63, 252, 512),
        ("Task07_Pancreas", 281, 93, 512),
        ("Task08_HepaticVessel", 303, 49, 512),
        ("Task09_Spleen", 41, 90, 512),
        ("Task10_Colon", 126, 95, 512),
    )
}


MSD_FOLDS = 5  # the reference benchmark's cross-validation (PROTOCOL.md)


@register_dataset("msd", task="segmentation", published=MSD_PUBLISHED)
def prepare_msd(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "Medical Segmentation Decathlon", MSD_LAYOUT, MSD_SOURCE)
    task_dir = root / spec.subset if spec.subset else root
    meta_path = require(task_dir / "dataset.json", "Medical Segmentation Decathlon", MSD_LAYOUT)
    meta = json.loads(meta_path.read_text())
    labels = {int(k): v for k, v in meta.get("labels", {}).items() if int(k) != 0}
    rows, skipped = [], []
    for entry in meta.get("training", []):
        img, lab = (task_dir / entry["image"]).resolve(), (task_dir / entry["label"]).resolve()
        shapes = []
        for p in (img, lab):
            if not p.is_file() and spec.on_bad_file == "error":
                raise DataError(f"{meta_path}: {p} not found. Expected layout:\n{MSD_LAYOUT}")
            shapes.append(_header_shape(p, spec.on_bad_file, skipped) if p.is_file() else None)
        if None in shapes:
            continue
        _same_shape(img, shapes[0], lab, shapes[1])
        case = img.name.removesuffix(".nii.gz")
        rows.append(
            {"sample_id": case, "patient_id": case, "path": str(img), "mask_path": str(lab), "n_slices": shapes[0][2]}
        )
    df = pd.DataFrame(rows)
    # MSD publishes no labelled test set; the reference benchmark cross-validates by case (5 folds): folds of
    # the train + val cases (replicate k validates on fold k), with a test share of the cases held out.
    how = fold_splits(df, spec, MSD_FOLDS, unit="cases")
    modality = meta.get("modality") or {}
    ds = PreparedDataset(
        spec.name,
        "segmentation",
        [],
        df,
        _real(spec, f"MSD {task_dir.name}", root, how),
        root,
        mask_labels=labels,
        channel_names=tuple(modality[k] for k in sorted(modality, key=int)),
    )
    ds.skipped.extend(skipped)
    return ds


# ---------------------------------------------------------------- AutoPET (PET/CT NIfTI pairs)

AUTOPET_LAYOUT = """    <patient>/<study>/CTres.nii.gz   CT resampled to PET space (HU)
    <patient>/<study>/SUV.nii.gz     PET in SUV
    <patient>/<study>/SEG.nii.gz     lesion mask (1 = lesion)"""
AUTOPET_SOURCE = "https://autopet.grand-challenge.org (TCIA FDG-PET-CT-Lesions, NIfTI release)"


@register_dataset(
    "autopet",
    task="segmentation",
    published=PublishedSize(
        1_014,
        "volume",
        per_unit=326,
        pixels=(400, 400),
        source="Gatidis et al. 2022 (FDG-PET-CT-Lesions): 1,014 whole-body studies of 900 patients; CTres/SUV on the "
        "400x400 PET grid; ~326 slices per study is an approximate median",
    ),
)
def prepare_autopet(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "AutoPET", AUTOPET_LAYOUT, AUTOPET_SOURCE)
    rows, skipped = [], []
    for ct in sorted(root.glob("*/*/CTres.nii.gz")):
        study = ct.parent
        trio = [ct, study / "SUV.nii.gz", study / "SEG.nii.gz"]
        for p in trio[1:]:
            if not p.is_file() and spec.on_bad_file == "error":
                raise DataError(f"AutoPET: {p} missing beside {ct}. Expected layout:\n{AUTOPET_LAYOUT}")
        shapes = [_header_shape(p, spec.on_bad_file, skipped) if p.is_file() else None for p in trio]
        if None in shapes:
            continue
        for p, s in zip(trio[1:], shapes[1:]):
            _same_shape(ct, shapes[0], p, s)
        rows.append(
            {
                "sample_id": f"{study.parent.name}/{study.name}",
                "patient_id": study.parent.name,
                "path": str(ct),
                "pet_path": str(trio[1]),
                "mask_path": str(trio[2]),
                "n_slices": shapes[0][2],
            }
        )
    if not rows:
        raise DataError(f"AutoPET: no <patient>/<study>/CTres.nii.gz under {root}. Expected layout:\n{AUTOPET_LAYOUT}")
    df = pd.DataFrame(rows)
    df["split"], how = patient_splits(df, spec)
    ds = PreparedDataset(
        spec.name, "segmentation", [], df, _real(spec, "AutoPET", root, how), root, mask_labels={1: "lesion"}
    )
    ds.skipped.extend(skipped)
    return ds


# ---------------------------------------------------------------- tiled WSI bags (tile folders per slide)

WSI_LAYOUT = """    slides.csv                 slide_id,label[,patient_id][,split][,center]   (label: normal | tumor)
    <slide_id>/*.png|jpg|tif   the slide's tiles (e.g. 224 px at 20x, tissue only)
    stage_labels.csv           optional, Camelyon17's own table (patient,stage): ITC slides left out, centres"""
WSI_SOURCE = "Camelyon16/17 (https://camelyon17.grand-challenge.org), tiled with your tiler of choice"


@register_dataset(
    "wsi-tiles",
    task="mil",
    color="rgb",  # H&E-stained tiles: stain colour carries diagnostic information
    published=PublishedSize(
        399,
        "slide",
        per_unit=8_000,
        pixels=(224, 224),
        mpp=0.5,
        tile=224,
        source="Camelyon16: 399 slides (270 train, 129 test); ~8,000 tissue tiles of 224 px per slide at 20x "
        "(0.5 um/px) as reported for DSMIL (Li et al. 2021: ~3.2M tiles); scales with the area at other "
        "magnifications",
    ),
)
def prepare_wsi_tiles(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "WSI tile bags", WSI_LAYOUT, WSI_SOURCE)
    csv = require(root / "slides.csv", "WSI tile bags", WSI_LAYOUT)
    slides = pd.read_csv(csv, dtype=str, keep_default_na=False)
    allowed = ["normal", "tumor"]
    for i, lab in enumerate(slides["label"]):
        if lab not in allowed:
            raise DataError(f"{csv}, line {i + 2}: label '{lab}' not in the class list {allowed}")
    slides, excluded = _camelyon17_stages(root, slides, csv)
    pid_rule = _slide_patients(slides, spec, csv)
    rows = []
    for s in slides.itertuples(index=False):
        tiles = sorted(
            p for p in (root / s.slide_id).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff")
        )
        if not tiles:
            raise DataError(f"WSI tile bags: slide '{s.slide_id}' (in {csv.name}) has no tiles in {root / s.slide_id}")
        pid = getattr(s, "patient_id", "") or s.slide_id
        for t in tiles:
            rows.append(
                {
                    "sample_id": f"{s.slide_id}/{t.stem}",
                    "patient_id": pid,
                    "bag_id": s.slide_id,
                    "path": str(t),
                    "tumor": int(s.label == "tumor"),
                    "_split": getattr(s, "split", ""),
                    **({CENTER_COLUMN: str(s.center)} if "center" in slides.columns else {}),
                }
            )
    df = pd.DataFrame(rows)
    official = df.pop("_split")
    df["split"], how = patient_splits(df, spec, official if (official != "").all() else None)
    tags = _real(spec, "WSI tile bags", root, how, patient_ids=pid_rule, excluded=excluded)
    return PreparedDataset(spec.name, "mil", ["tumor"], df, tags, root)


# Camelyon17's release (https://camelyon17.grand-challenge.org/Data/) ships stage_labels.csv: a row per patient
# (patient_NNN.zip, its pN-stage) and a row per slide (patient_NNN_node_K.tif: negative | itc | micro | macro).
# Its 100 training patients come from five centres, 20 consecutive patients each (the release's center_0 ...
# center_4 folders: patient_000-019 in center_0, ..., patient_080-099 in center_4).
C17_STAGES = "stage_labels.csv"
C17_LABEL = {"negative": "normal", "micro": "tumor", "macro": "tumor"}  # itc: left out, as the reference does
C17_SLIDE = re.compile(r"patient_(\d+)_node_\d+")
C17_PATIENTS_PER_CENTER = 20


def _camelyon17_stages(root: Path, slides: pd.DataFrame, csv: Path) -> tuple[pd.DataFrame, str | None]:
    """Where the tile root holds Camelyon17's stage table: each slide's label checked against its stage, the
    isolated-tumour-cell (ITC) slides left out (the reference benchmark removes them: an ITC is neither normal
    nor a metastasis), and each training slide's centre stated from its patient number where slides.csv has no
    'center' column. Returns the slides kept and what was left out (a ``data.excluded`` tag), or None."""
    path = root / C17_STAGES
    if not path.is_file():
        return slides, None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"patient", "stage"} <= set(table.columns):
        raise DataError(f"{path}: expected Camelyon17's columns 'patient,stage', found {list(table.columns)}")
    stages = {
        p.removesuffix(".tif"): st.strip().lower()
        for p, st in zip(table["patient"], table["stage"])
        if p.endswith(".tif")
    }
    itc = []
    for i, s in enumerate(slides.itertuples(index=False)):
        stage = stages.get(s.slide_id)
        if stage is None:
            continue
        if stage != "itc" and stage not in C17_LABEL:
            raise DataError(f"{path}: slide '{s.slide_id}' has stage '{stage}'; expected negative, itc, micro or macro")
        if stage == "itc":
            itc.append(s.slide_id)
        elif C17_LABEL[stage] != s.label:
            raise DataError(
                f"{csv}, line {i + 2}: slide '{s.slide_id}' is labelled '{s.label}' but {C17_STAGES} gives stage "
                f"'{stage}' ({C17_LABEL[stage]}); correct the label in {csv.name}"
            )
    kept = slides[~slides["slide_id"].isin(itc)].copy()
    numbers = [C17_SLIDE.fullmatch(x) for x in kept["slide_id"]]
    if "center" not in kept.columns and all(m and int(m.group(1)) < 5 * C17_PATIENTS_PER_CENTER for m in numbers):
        kept["center"] = [str(int(m.group(1)) // C17_PATIENTS_PER_CENTER) for m in numbers]
    return kept, f"{len(itc)} isolated-tumour-cell (itc) slides of {C17_STAGES}"


# Slide naming of cohorts known to hold several slides per patient: a table of such slides needs patient ids.
SEVERAL_SLIDES_PER_PATIENT = {
    "Camelyon17 (5 lymph-node slides per patient)": re.compile(r"patient_(\d+)_node_\d+"),
}


def _slide_patients(slides: pd.DataFrame, spec, csv: Path) -> str:
    """Which patient each slide belongs to, or a refusal: without patient ids, slides of one patient would be
    split as if they were different patients (leaking the patient across train and test)."""
    have = "patient_id" in slides.columns and (slides["patient_id"] != "").all()
    if have:
        return "patient_id column"
    missing = (
        slides["slide_id"] if "patient_id" not in slides.columns else slides.loc[slides["patient_id"] == "", "slide_id"]
    )
    what = "no 'patient_id' column" if "patient_id" not in slides.columns else "an empty patient_id"
    for cohort, pattern in SEVERAL_SLIDES_PER_PATIENT.items():
        hit = next((s for s in missing if pattern.fullmatch(s)), None)
        if hit is not None:
            example = f"patient_{pattern.fullmatch(hit).group(1)}"
            raise DataError(
                f"{csv}: {what} for slide '{hit}', and slide ids like it are {cohort}: add a 'patient_id' column "
                f"(e.g. {example} for {hit}) so that no patient's slides fall into two splits"
            )
    if spec.patient_ids == "required":
        raise DataError(
            f"{csv}: {what} for slide '{missing.iloc[0]}' and dataset.patient_ids is 'required': add a 'patient_id' "
            "column (the patient of each slide) so that no patient's slides fall into two splits"
        )
    return "slide id (one slide per patient assumed; set dataset.patient_ids: required to refuse this)"


# ---------------------------------------------------------------- CREMI (HDF5 EM volumes + neuron ids)

CREMI_LAYOUT = """    sample_A_20160501.hdf (and B, C; .hdf/.h5)   volumes/raw [z, y, x] uint8,
                                                 volumes/labels/neuron_ids [z, y, x] uint64"""
CREMI_SOURCE = "https://cremi.org/data/"


@register_dataset(
    "cremi",
    task="instance_segmentation",
    published=PublishedSize(
        9,
        "block",
        per_unit=125 / 3,
        pixels=(1250, 1250),
        source="CREMI (cremi.org): samples A, B, C of 125 sections of 1250x1250 px each (4x4x40 nm); the adapter "
        "cuts each sample into train / val / test blocks of sections",
    ),
    replicates="fixed",
)
def prepare_cremi(spec, storage: Path) -> PreparedDataset:
    root = data_root(spec, "CREMI", CREMI_LAYOUT, CREMI_SOURCE)
    wanted = [s.strip() for s in (spec.subset or "A,B,C").split(",")]
    rows = []
    for s in wanted:
        found = sorted([*root.glob(f"sample_{s}_*.hdf"), *root.glob(f"sample_{s}*.h5"), *root.glob(f"sample_{s}.hdf")])
        if not found:
            raise DataError(
                f"CREMI: no file for sample {s} under {root}. Expected layout:\n{CREMI_LAYOUT}\nSource: {CREMI_SOURCE}"
            )
        path = found[0]
        try:
            with h5py.File(path, "r") as f:
                raw, ids = f["volumes/raw"].shape, f["volumes/labels/neuron_ids"].shape
        except (OSError, KeyError) as e:
            raise DataError(f"{path}: not a CREMI volume ({type(e).__name__}: {e})") from e
        if raw != ids:
            raise DataError(f"{path}: neuron_ids shape {ids} does not match raw {raw}")
        rows += cremi_rows(path, s, raw[0], spec.split)
    df = pd.DataFrame(rows)
    return PreparedDataset(
        spec.name,
        "instance_segmentation",
        [],
        df,
        _real(spec, "CREMI", root, CREMI_SPLIT),
        root,
        replicates="fixed",
        replicates_reason=CREMI_SPLIT,
    )


CREMI_SPLIT = "first sections train, last test, val in between (per sample)"


def cremi_rows(path: Path, sample: str, n_sections: int, split) -> list[dict]:
    """The manifest rows of one CREMI sample file: the benchmark's protocol cuts each sample's sections into
    train (first), val (in between) and test (last) blocks, one volume each, reported per sample."""
    n = int(n_sections)
    n_test = max(1, round(split.test_fraction * n))
    n_val = max(1, round(split.val_fraction * n))
    cuts = {"train": (0, n - n_test - n_val), "val": (n - n_test - n_val, n - n_test), "test": (n - n_test, n)}
    return [
        {
            "sample_id": f"{sample}:{z0}-{z1}",
            "patient_id": f"{sample}:{part}",
            "sample": sample,
            "path": str(path),
            "volume_key": "volumes/raw",
            "mask_key": "volumes/labels/neuron_ids",
            "z_start": z0,
            "z_stop": z1,
            "n_slices": z1 - z0,
            "split": part,
        }
        for part, (z0, z1) in cuts.items()
    ]
