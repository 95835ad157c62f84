"""Medical readers (DICOM, NIfTI, windows, slices), the generic manifest adapter, bad input, the 3D /
WSI phantom suite and the published-layout adapters, each on real files written in that layout."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoscale.data import DataError, prepare_dataset
from dinoscale.data.splits import LeakageError
from dinoscale.features import FeatureRecipe
from dinoscale.spec import DatasetSpec, PhantomSpec, SplitSpec

pydicom = pytest.importorskip("pydicom")


def _dicom(path, arr, photometric="MONOCHROME2", slope=1.0, intercept=-1024.0, patient="p1"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID, ds.Modality = (
        CTImageStorage,
        meta.MediaStorageSOPInstanceUID,
        patient,
        "CT",
    )
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelSpacing, ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.7, 0.7], [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ---------------------------------------------------------------- readers


def test_dicom_rescale_to_hu_and_monochrome1(tmp_path):
    from dinoscale.data.readers import read_image

    raw = np.zeros((8, 6), np.uint16)
    raw[2, 3] = 1012  # 2 * 1012 - 1024 = 1000 HU (bone); background: -1024 HU (air)
    hu = read_image(_dicom(tmp_path / "ct.dcm", raw, slope=2.0))
    assert hu.shape == (8, 6)  # [rows, cols], display order
    assert hu[2, 3] == 1000.0 and hu[0, 0] == -1024.0
    inv = read_image(_dicom(tmp_path / "cr.dcm", raw, "MONOCHROME1", slope=1.0, intercept=0.0))
    assert inv[2, 3] == 0.0 and inv[0, 0] == 1012.0  # MONOCHROME1: the high stored value was the dark one


def test_real_pydicom_ct_is_in_hounsfield_units():
    from dinoscale.data.readers import read_image

    path = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    hu = read_image(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.shape == (128, 128)
    np.testing.assert_allclose(hu, expected)
    assert hu.min() < -800 and hu.max() > 1000  # air-like and bone-like values: HU, not raw 0..4095


def test_nifti_reoriented_to_ras_and_resampled(tmp_path):
    from dinoscale.data.readers import read_volume

    a = np.zeros((10, 12, 6), np.float32)
    a[1, 2, 3] = 7.0
    nib.save(nib.Nifti1Image(a, np.diag([-1.0, -1.0, 2.0, 1.0])), str(tmp_path / "lps.nii.gz"))  # LPS-like affine
    vol, spacing = read_volume(tmp_path / "lps.nii.gz")
    assert vol.shape == (1, 10, 12, 6) and spacing == (1.0, 1.0, 2.0)
    assert vol[0, 10 - 1 - 1, 12 - 1 - 2, 3] == 7.0  # x and y flipped into RAS
    coarse, sp2 = read_volume(tmp_path / "lps.nii.gz", spacing=(2.0, 2.0, 2.0))
    assert coarse.shape[1:3] == (6, 6) and sp2 == (2.0, 2.0, 2.0)  # ~half the voxels per axis
    real = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    vol, sp = read_volume(real)
    assert vol.ndim == 4 and vol.shape[0] == 1 and min(vol.shape[1:]) > 10 and all(s > 0 for s in sp)


def test_ct_window_presets_through_the_sweeps_volume_path(tmp_path):
    """Windows map HU to [0, 1] (clipped) in the transform extraction uses; grey becomes 3 equal channels."""
    from dinoscale.data.preprocess import build_volume_transform
    from dinoscale.data.windows import CT_WINDOWS, window_range

    assert {"lung", "mediastinum", "bone", "brain", "abdomen"} <= set(CT_WINDOWS)
    assert window_range("lung") == (-1350.0, 150.0) and window_range("brain") == (0.0, 80.0)
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0], np.float32)
    nib.save(nib.Nifti1Image(np.tile(hu[:, None, None], (1, 4, 2)), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    for window, expected in (("lung", [0, 0, 0.5, 1, 1]), ((-1000.0, 1000.0), [0, 0, 0.2, 0.575, 1])):
        load, to_input = build_volume_transform(
            FeatureRecipe("t", "w", 32, (0.5,) * 3, (0.25,) * 3, intensity="window", window=window_range(window))
        )
        vol = load(str(tmp_path / "ct.nii.gz"))
        np.testing.assert_allclose(vol[:, 0, 0].numpy(), expected, atol=1e-6)
    x = to_input(vol[..., 0])
    assert tuple(x.shape) == (3, 32, 32) and bool((x[0] == x[2]).all())
    with pytest.raises(ValueError, match="unknown window preset 'lungs'"):
        DatasetSpec(name="phantom-ct", window="lungs")


# ---------------------------------------------------------------- generic manifest adapter and bad input


def _manifest_root(tmp_path, rows, corrupt=None):
    root = tmp_path / "m"
    (root / "img").mkdir(parents=True)
    for r in rows:
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(root / r["path"])
    if corrupt:
        (root / corrupt).write_bytes(b"not an image")
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _rows(n=12, label=lambda i: "a|b" if i % 3 == 0 else ("a" if i % 2 else "")):
    return [{"path": f"img/{i}.png", "patient_id": f"P{i // 2}", "labels": label(i)} for i in range(n)]


def test_manifest_adapter_resolves_relative_paths_and_labels(tmp_path):
    root = _manifest_root(tmp_path, _rows(24))
    ds = prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["a", "b"]), tmp_path)
    assert ds.classes == ["a", "b"] and len(ds.manifest) == 24
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in ds.manifest.path)
    assert ds.manifest.loc[0, ["a", "b"]].tolist() == [1, 1] and ds.manifest.loc[2, ["a", "b"]].tolist() == [0, 0]
    assert (ds.manifest.groupby("patient_id").split.nunique() == 1).all()


def test_missing_root_names_layout_and_source(tmp_path):
    for name, needle in [
        ("manifest", "path,patient_id"),
        ("rsna-pneumonia", "stage_2_train_labels.csv"),
        ("ct-rate", "multi_abnormality_labels"),
        ("msd", "dataset.json"),
        ("autopet", "SUV.nii.gz"),
        ("wsi-tiles", "slides.csv"),
        ("medmnist", ".npz"),
        ("cremi", "neuron_ids"),
    ]:
        with pytest.raises(DataError) as e:
            prepare_dataset(
                DatasetSpec(name=name, root=str(tmp_path / "nowhere"), classes=["a"] if name == "manifest" else None),
                tmp_path,
            )
        assert "does not exist" in str(e.value) and needle in str(e.value) and "Source:" in str(e.value), name


def test_label_outside_class_list_names_label_and_line(tmp_path):
    root = _manifest_root(tmp_path, _rows(label=lambda i: "covid" if i == 5 else "a"))
    with pytest.raises(DataError, match=r"manifest.csv, line 7: label\(s\) \['covid'\] not in the class list"):
        prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["a", "b"]), tmp_path)


def test_patient_in_two_official_splits_is_refused(tmp_path):
    rows = [dict(r, split=s) for r, s in zip(_rows(), ["train", "test"] + ["train"] * 4 + ["val"] * 3 + ["test"] * 3)]
    root = _manifest_root(tmp_path, rows)
    with pytest.raises(LeakageError, match=r"patient\(s\) appear in more than one split \(e.g. P0"):
        prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["a", "b"]), tmp_path)


def test_empty_split_is_an_error(tmp_path):
    rows = [dict(r, split="train" if i < 8 else "test") for i, r in enumerate(_rows())]
    rows = [dict(r, split="train") if r["split"] == "val" else r for r in rows]
    root = _manifest_root(tmp_path, rows)
    # no 'val' rows: an official split list without val gets val carved by patient; an official 'val' only: test empty
    rows2 = [dict(r, split="train" if i < 8 else "val") for i, r in enumerate(_rows())]
    root2 = _manifest_root(tmp_path / "x", rows2)
    assert set(
        prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["a", "b"]), tmp_path).manifest.split
    ) == {"train", "val", "test"}
    with pytest.raises(DataError, match="split 'test' is empty"):
        prepare_dataset(DatasetSpec(name="manifest", root=str(root2), classes=["a", "b"]), tmp_path)


def test_corrupt_file_errors_by_name_or_is_skipped_and_recorded(tmp_path):
    from dinoscale.data.readers import read_image

    root = _manifest_root(tmp_path, _rows(24), corrupt="img/5.png")
    ds = prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["a", "b"]), tmp_path)
    with pytest.raises(DataError, match=r"img/5.png: the PNG/JPEG/TIFF reader \(MONAI PILReader\) failed"):
        read_image(ds.manifest.path[5])
    ds = prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["a", "b"], on_bad_file="skip"), tmp_path)
    assert len(ds.manifest) == 23 and not ds.manifest.path.str.endswith("img/5.png").any()
    assert len(ds.skipped) == 1 and ds.skipped[0]["path"].endswith("img/5.png") and ds.skipped[0]["reason"]
    assert ds.provenance["data.skipped"] == "1"


# ---------------------------------------------------------------- phantom suite


def _ph(kind, **kw):
    return DatasetSpec(
        name=f"phantom-{kind}",
        phantom=PhantomSpec(n_patients=12, image_size=64, depth=16, images_per_patient=(1, 2), tiles_per_slide=8, **kw),
    )


@pytest.mark.parametrize("kind", ["ct", "mri", "wsi", "em", "petct"])
def test_phantoms_are_deterministic_and_patient_level(tmp_path, kind):
    a, b = prepare_dataset(_ph(kind), tmp_path / "a"), prepare_dataset(_ph(kind), tmp_path / "b")
    assert a.manifest.drop(columns=[c for c in a.manifest if c.endswith("path")]).equals(
        b.manifest.drop(columns=[c for c in b.manifest if c.endswith("path")])
    )
    assert a.manifest_digest("test") == b.manifest_digest("test")
    assert a.manifest_digest("test") != prepare_dataset(_ph(kind, seed=1), tmp_path / "a").manifest_digest("test")
    assert (a.manifest.groupby("patient_id").split.nunique() == 1).all() and a.is_phantom
    for col in ("path", "mask_path", "pet_path"):
        if col in a.manifest:
            assert all(Path(p).is_file() for p in a.manifest[col])


def test_phantom_ct_ground_truth_in_hu(tmp_path):
    ds = prepare_dataset(_ph("ct"), tmp_path)
    m = ds.manifest
    assert (
        ds.task == "multilabel" and set(ds.classes) == {"nodule", "effusion", "emphysema"} and (m.n_slices == 16).all()
    )
    for c in ds.classes:
        assert 0 < m[c].sum() < len(m), c

    def lung_low(path):
        v = nib.load(path).get_fdata()
        assert v.shape == (64, 64, 16) and v.min() >= -1024 and v.max() > 500  # HU: air, lung, bone
        return (v[16:26, 26:38, 5:11] < -940).sum()  # inside the left lung: -850 HU parenchyma, -990 HU holes

    emph = m[m.emphysema == 1].path.iloc[0]
    clean = m[(m.emphysema == 0)].path.iloc[0]
    assert lung_low(emph) > 3 * max(lung_low(clean), 1)


def test_phantom_mri_em_petct_masks_match_images(tmp_path):
    mri = prepare_dataset(_ph("mri"), tmp_path)
    assert mri.task == "segmentation" and mri.mask_labels == {1: "ventricles", 2: "tumour", 3: "lesion"}
    labels = set()
    for r in mri.manifest.itertuples():
        img, mask = nib.load(r.path).get_fdata(), nib.load(r.mask_path).get_fdata()
        assert img.shape == mask.shape == (64, 64, 16)
        labels |= set(np.unique(mask).astype(int))
        assert img[mask == 1].mean() < img[(mask == 0) & (img > 300)].mean()  # ventricles are dark on T1
    assert labels == {0, 1, 2, 3}
    em = prepare_dataset(_ph("em"), tmp_path)  # CREMI's layout: samples A, B, C, sections split in blocks
    assert em.task == "instance_segmentation" and sorted(em.manifest["sample"].unique()) == ["A", "B", "C"]
    units = em.units("test")
    assert units.groups == ["A", "B", "C"] and units.spacing == [(4.0, 4.0, 40.0)] * 3  # nm, from the files
    from dinoscale.data.readers import read_volume

    img, sp = read_volume(units.items[0])
    ids, _ = read_volume(units.masks[0], mode="nearest", dtype=None)
    img, ids = img[0], ids[0]
    assert ids.dtype == np.uint64 and len(np.unique(ids)) >= 5 and sp == (4.0, 4.0, 40.0)
    boundary = np.zeros(ids.shape, bool)
    boundary[:-1] |= ids[:-1] != ids[1:]
    assert img[boundary].mean() < img[~boundary].mean() - 50  # membranes are dark where neurons meet
    pet = prepare_dataset(_ph("petct"), tmp_path)
    lesions = 0
    for r in pet.manifest.itertuples():
        suv, seg = nib.load(r.pet_path).get_fdata(), nib.load(r.mask_path).get_fdata()
        assert suv.shape == seg.shape == nib.load(r.path).shape
        if seg.any():
            lesions += 1
            assert suv[seg == 1].max() > 3 * np.median(suv[(seg == 0) & (suv > 0.3)])
    assert 0 < lesions < len(pet.manifest)  # lesions, and negative controls


def test_phantom_wsi_slide_label_is_tumour_in_some_tiles(tmp_path):
    ds = prepare_dataset(_ph("wsi"), tmp_path)
    m = ds.manifest
    assert ds.task == "mil" and ds.classes == ["tumor"] and (m.groupby("bag_id").size() == 8).all()
    per_slide = m.groupby("bag_id").agg(tumor=("tumor", "first"), pos=("tile_label", "sum"), n=("tile_label", "size"))
    assert ((per_slide.tumor == 1) == (per_slide.pos > 0)).all() and 0 < per_slide.tumor.sum() < len(per_slide)
    assert (per_slide.pos <= per_slide.n / 2).all()  # "a few tiles"
    dark = lambda p: (np.asarray(Image.open(p)).mean(-1) < 90).mean()
    assert np.mean([dark(p) for p in m[m.tile_label == 1].path]) > 3 * np.mean(
        [dark(p) for p in m[m.tile_label == 0].path]
    )


# ---------------------------------------------------------------- published layouts


def test_rsna_pneumonia_layout_with_dicoms(tmp_path):
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    rows = []
    for i in range(16):
        pid = f"0a{i:04d}-uuid"
        _dicom(
            root / "stage_2_train_images" / f"{pid}.dcm",
            np.full((8, 8), 100 + i, np.uint16),
            "MONOCHROME2",
            patient=pid,
        )
        rows.append({"patientId": pid, "x": "", "y": "", "width": "", "height": "", "Target": i % 2})
        if i % 2:
            rows.append({"patientId": pid, "x": 1, "y": 1, "width": 3, "height": 3, "Target": 1})  # a second box
    pd.DataFrame(rows).to_csv(root / "stage_2_train_labels.csv", index=False)
    ds = prepare_dataset(DatasetSpec(name="rsna-pneumonia", root=str(root)), tmp_path)
    assert len(ds.manifest) == 16 and ds.manifest.Pneumonia.sum() == 8 and ds.classes == ["Pneumonia"]
    from dinoscale.data.readers import read_image

    assert read_image(ds.manifest.path[3])[0, 0] == 103 - 1024  # HU after rescale
    pd.DataFrame(rows).assign(Target=lambda d: d.Target.where(d.index != 4, 2)).to_csv(
        root / "stage_2_train_labels.csv", index=False
    )
    with pytest.raises(DataError, match=r"line 6: label Target=2"):
        prepare_dataset(DatasetSpec(name="rsna-pneumonia", root=str(root)), tmp_path)


def test_ct_rate_layout(tmp_path):
    from dinoscale.data.adapters import CT_RATE_CLASSES

    base = tmp_path / "ctrate" / "dataset"
    recs = {"train": [], "valid": []}
    for part, n in (("train", 10), ("valid", 3)):
        for p in range(1, n + 1):
            name = f"{part}_{p}_a_1.nii.gz"
            d = base / part / f"{part}_{p}" / f"{part}_{p}_a"
            d.mkdir(parents=True)
            nib.save(nib.Nifti1Image(np.full((8, 8, 4 + p % 3), -1000, np.int16), np.eye(4)), str(d / name))
            recs[part].append({"VolumeName": name, **{c: int((p + k) % 4 == 0) for k, c in enumerate(CT_RATE_CLASSES)}})
    (base / "multi_abnormality_labels").mkdir()
    for part, r in recs.items():
        pd.DataFrame(r).to_csv(base / "multi_abnormality_labels" / f"{part}_predicted_labels.csv", index=False)
    ds = prepare_dataset(DatasetSpec(name="ct-rate", root=str(tmp_path / "ctrate")), tmp_path)
    m = ds.manifest.set_index("sample_id")
    assert len(m) == 13 and len(ds.classes) == 18
    assert set(m[m.split == "test"].patient_id) == {"valid_1", "valid_2", "valid_3"}  # official validation set
    assert m.loc["train_4_a_1", "n_slices"] == 5 and m.loc["train_4_a_1", "Medical material"] == 1
    assert (ds.manifest.split == "val").any()


def test_medmnist_npz_2d_and_3d(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 20), ("val", 5), ("test", 6)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 11)[:, None]
    np.savez(tmp_path / "organmnist3d_64.npz", **arrays)
    np.savez(
        tmp_path / "chestmnist_224.npz",
        **{k: (v[:, 0] if "images" in k else rng.integers(0, 2, (len(v), 14))) for k, v in arrays.items()},
    )
    ds = prepare_dataset(DatasetSpec(name="medmnist", root=str(tmp_path), subset="organmnist3d_64"), tmp_path)
    assert ds.task == "multiclass" and len(ds.classes) == 11 and (ds.manifest.n_slices == 28).all()
    assert ds.manifest.groupby("split").size().to_dict() == {"test": 6, "train": 20, "val": 5}
    assert (ds.manifest[ds.classes].sum(1) == 1).all() and ds.manifest.loc[3, "class_3"] == 1
    ds2 = prepare_dataset(DatasetSpec(name="medmnist", root=str(tmp_path), subset="chestmnist_224"), tmp_path)
    assert ds2.task == "multilabel" and len(ds2.classes) == 14 and "n_slices" not in ds2.manifest


def test_msd_task_folder_and_mask_shape_mismatch(tmp_path):
    task = tmp_path / "msd" / "Task09_Spleen"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    training = []
    for i in range(10):
        nib.save(
            nib.Nifti1Image(np.zeros((8, 8, 5), np.float32), np.eye(4)), str(task / "imagesTr" / f"spleen_{i}.nii.gz")
        )
        nib.save(
            nib.Nifti1Image(np.ones((8, 8, 5), np.uint8), np.eye(4)), str(task / "labelsTr" / f"spleen_{i}.nii.gz")
        )
        training.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    (task / "dataset.json").write_text(
        json.dumps({"name": "Spleen", "labels": {"0": "background", "1": "spleen"}, "training": training})
    )
    ds = prepare_dataset(DatasetSpec(name="msd", root=str(tmp_path / "msd"), subset="Task09_Spleen"), tmp_path)
    assert ds.task == "segmentation" and ds.mask_labels == {1: "spleen"} and len(ds.manifest) == 10
    assert (ds.manifest.n_slices == 5).all() and all(Path(p).is_file() for p in ds.manifest.mask_path)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4)), str(task / "labelsTr" / "spleen_3.nii.gz"))
    with pytest.raises(DataError, match=r"spleen_3.nii.gz: shape \(8, 8, 4\) does not match its image"):
        prepare_dataset(DatasetSpec(name="msd", root=str(tmp_path / "msd"), subset="Task09_Spleen"), tmp_path)


def test_autopet_pairs_and_corrupt_volume_skip(tmp_path):
    root = tmp_path / "autopet"
    for p in range(10):
        for s in range(1 + p % 2):
            d = root / f"PETCT_{p:03d}" / f"study{s}"
            d.mkdir(parents=True)
            for name, dt in (("CTres", np.int16), ("SUV", np.float32), ("SEG", np.uint8)):
                nib.save(nib.Nifti1Image(np.zeros((6, 6, 7), dt), np.eye(4)), str(d / f"{name}.nii.gz"))
    ds = prepare_dataset(DatasetSpec(name="autopet", root=str(root)), tmp_path)
    assert len(ds.manifest) == 15 and (ds.manifest.groupby("patient_id").split.nunique() == 1).all()
    assert ds.manifest.pet_path.str.endswith("SUV.nii.gz").all() and (ds.manifest.n_slices == 7).all()
    (root / "PETCT_004" / "study0" / "SUV.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match=r"PETCT_004/study0/SUV.nii.gz: cannot read NIfTI header"):
        prepare_dataset(DatasetSpec(name="autopet", root=str(root)), tmp_path)
    ds = prepare_dataset(DatasetSpec(name="autopet", root=str(root), on_bad_file="skip"), tmp_path)
    assert len(ds.manifest) == 14 and ds.skipped[0]["path"].endswith("PETCT_004/study0/SUV.nii.gz")


def test_wsi_tile_bags(tmp_path):
    root = tmp_path / "wsi"
    slides = []
    for i in range(12):
        (root / f"slide_{i}").mkdir(parents=True)
        for t in range(3 + i % 2):
            Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / f"slide_{i}" / f"{t}.png")
        slides.append(
            {
                "slide_id": f"slide_{i}",
                "label": "tumor" if i % 3 == 0 else "normal",
                "split": "test" if i >= 9 else "train",
            }
        )
    pd.DataFrame(slides).to_csv(root / "slides.csv", index=False)
    ds = prepare_dataset(DatasetSpec(name="wsi-tiles", root=str(root)), tmp_path)
    m = ds.manifest
    assert ds.task == "mil" and m.bag_id.nunique() == 12 and len(m) == 42
    assert set(m[m.split == "test"].bag_id) == {"slide_9", "slide_10", "slide_11"} and (m.split == "val").any()
    assert m[m.bag_id == "slide_3"].tumor.eq(1).all()
    pd.DataFrame(slides).assign(label=lambda d: d.label.where(d.index != 2, "itc")).to_csv(
        root / "slides.csv", index=False
    )
    with pytest.raises(DataError, match=r"slides.csv, line 4: label 'itc' not in the class list"):
        prepare_dataset(DatasetSpec(name="wsi-tiles", root=str(root)), tmp_path)


def test_cremi_hdf5_sections_split(tmp_path):
    h5py = pytest.importorskip("h5py")
    for s in "AB":
        with h5py.File(tmp_path / f"sample_{s}_20160501.hdf", "w") as f:
            f["volumes/raw"] = np.zeros((20, 16, 16), np.uint8)
            f["volumes/labels/neuron_ids"] = np.arange(20 * 16 * 16, dtype=np.uint64).reshape(20, 16, 16)
    ds = prepare_dataset(
        DatasetSpec(
            name="cremi", root=str(tmp_path), subset="A,B", split=SplitSpec(val_fraction=0.2, test_fraction=0.25)
        ),
        tmp_path,
    )
    a = ds.manifest[ds.manifest.sample_id.str.startswith("A")].set_index("split")
    assert (a.loc["train", "z_start"], a.loc["train", "z_stop"], a.loc["test", "z_start"], a.loc["test", "z_stop"]) == (
        0,
        11,
        15,
        20,
    )
    assert ds.task == "instance_segmentation" and (ds.manifest.mask_key == "volumes/labels/neuron_ids").all()
