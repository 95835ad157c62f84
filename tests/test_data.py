"""Phantom generator, patient-level splits, the NIH adapter on a real on-disk layout, bad input."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoscale.data import DataError, prepare_dataset
from dinoscale.data.phantom import CLASSES, render_xray
from dinoscale.data.splits import LeakageError, assign_patient_splits, check_no_leakage
from dinoscale.spec import DatasetSpec, PhantomSpec, SplitSpec


def _phantom_spec(**kw):
    return DatasetSpec(name="phantom-xray", phantom=PhantomSpec(n_patients=24, image_size=128, **kw))


def test_phantom_is_deterministic_and_patient_level(tmp_path):
    a = prepare_dataset(_phantom_spec(seed=3), tmp_path / "a")
    b = prepare_dataset(_phantom_spec(seed=3), tmp_path / "b")
    assert a.manifest.drop(columns="path").equals(b.manifest.drop(columns="path"))
    first_a = np.asarray(Image.open(a.manifest.path[0]))
    assert np.array_equal(first_a, np.asarray(Image.open(b.manifest.path[0])))
    assert first_a.shape == (128, 128) and first_a.dtype == np.uint8
    assert a.manifest_digest("test") == b.manifest_digest("test")
    # several images per patient, every patient in exactly one split, all three splits populated
    per_patient = a.manifest.groupby("patient_id")
    assert per_patient.size().max() >= 2
    assert (per_patient["split"].nunique() == 1).all()
    assert set(a.manifest.split) == {"train", "val", "test"}
    # every finding occurs and is absent somewhere (multi-label, not one-hot)
    y = a.manifest[CLASSES].to_numpy()
    assert (y.sum(0) > 0).all() and (y.sum(0) < len(y)).all()
    assert (y.sum(1) >= 2).any()
    assert a.provenance["data.source"] == "phantom" and a.provenance["data.seed"] == "3"


def test_phantom_seed_changes_data(tmp_path):
    a = prepare_dataset(_phantom_spec(seed=0), tmp_path)
    b = prepare_dataset(_phantom_spec(seed=1), tmp_path)
    assert a.root != b.root
    assert a.manifest_digest("train") != b.manifest_digest("train")


def test_fine_finding_only_survives_at_high_resolution():
    """Fibrosis texture (period ~5 px at 256 px) is erased by an anti-aliased resize to 64 px."""
    anatomy = {"body_width": 1.0, "heart_r": 0.11, "rib_phase": 0.0, "exposure": 1.0}
    none = np.zeros(len(CLASSES), bool)
    fib = none.copy()
    fib[CLASSES.index("fibrosis")] = True

    def energy_at(size, findings):
        img = render_xray(256, anatomy, findings, np.random.default_rng(0))
        small = np.asarray(
            Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC), float
        )
        hp = small - np.asarray(
            Image.fromarray(small.astype(np.uint8))
            .resize((size // 4, size // 4), Image.Resampling.BOX)
            .resize((size, size), Image.Resampling.BILINEAR),
            float,
        )
        return np.abs(hp[size // 4 : size // 2, size // 5 : size // 2]).mean()  # left lung

    gain_256 = energy_at(256, fib) / energy_at(256, none)
    gain_64 = energy_at(64, fib) / energy_at(64, none)
    assert gain_256 > 2.0
    assert gain_64 < 1.3


def test_split_depends_on_patients_not_row_order():
    ids = pd.Series([f"p{i % 40}" for i in range(200)])
    s1 = assign_patient_splits(ids, 0.2, 0.3, seed=0)
    shuffled = ids.sample(frac=1, random_state=1)
    s2 = assign_patient_splits(shuffled, 0.2, 0.3, seed=0)
    assert (s1.loc[shuffled.index] == s2).all()
    counts = pd.Series(dict(zip(ids, s1))).value_counts()
    assert counts["test"] == 12 and counts["val"] == 8 and counts["train"] == 20


def test_leakage_is_refused():
    df = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(LeakageError, match="1 patient"):
        check_no_leakage(df)


def _write_nih(root, n_patients=12, bad_png=False):
    (root / "images_001" / "images").mkdir(parents=True)
    rows, test_names = [], []
    labels = ["No Finding", "Effusion", "Cardiomegaly|Effusion", "Nodule", "Hernia"]
    for p in range(n_patients):
        for i in range(2):
            name = f"{p:08d}_{i:03d}.png"
            path = root / "images_001" / "images" / name
            Image.fromarray(np.full((64, 64), 40 * i + p, np.uint8)).save(path)
            rows.append(
                {
                    "Image Index": name,
                    "Finding Labels": labels[(p + i) % len(labels)],
                    "Follow-up #": i,
                    "Patient ID": p,
                }
            )
            if p >= n_patients - 3:
                test_names.append(name)
    pd.DataFrame(rows).to_csv(root / "Data_Entry_2017.csv", index=False)
    (root / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (root / "train_val_list.txt").write_text(
        "\n".join(r["Image Index"] for r in rows if r["Image Index"] not in test_names) + "\n"
    )
    if bad_png:
        (root / "images_001" / "images" / rows[0]["Image Index"]).write_bytes(b"not a png")


def test_nih_adapter_reads_published_layout(tmp_path):
    _write_nih(tmp_path / "nih")
    ds = prepare_dataset(
        DatasetSpec(name="nih-chestxray14", root=str(tmp_path / "nih"), split=SplitSpec(val_fraction=0.2)), tmp_path
    )
    assert len(ds.classes) == 14 and len(ds.manifest) == 24
    assert set(ds.split("test").patient_id) == {"9", "10", "11"}  # the official test list
    assert ds.split("val").patient_id.nunique() == 2  # carved from train_val by patient
    row = ds.manifest.set_index("sample_id").loc["00000002_000"]  # "Cardiomegaly|Effusion"
    assert row["Cardiomegaly"] == 1 and row["Effusion"] == 1 and row["Nodule"] == 0
    assert ds.provenance["data.source"] == "real"


def test_nih_missing_root_names_layout_and_source(tmp_path):
    with pytest.raises(DataError) as e:
        prepare_dataset(DatasetSpec(name="nih-chestxray14", root=str(tmp_path / "nowhere")), tmp_path)
    assert "does not exist" in str(e.value) and "Data_Entry_2017.csv" in str(e.value) and "nihcc" in str(e.value)


def test_nih_unknown_label_is_refused(tmp_path):
    _write_nih(tmp_path / "nih")
    csv = tmp_path / "nih" / "Data_Entry_2017.csv"
    df = pd.read_csv(csv)
    df.loc[3, "Finding Labels"] = "Covid"
    df.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"unknown finding label\(s\) \['Covid'\]"):
        prepare_dataset(DatasetSpec(name="nih-chestxray14", root=str(tmp_path / "nih")), tmp_path)


def test_corrupt_image_names_its_file(tmp_path):
    from dinoscale.data.preprocess import build_transform
    from dinoscale.features import FeatureRecipe

    _write_nih(tmp_path / "nih", bad_png=True)
    ds = prepare_dataset(DatasetSpec(name="nih-chestxray14", root=str(tmp_path / "nih")), tmp_path)
    t = build_transform(FeatureRecipe("t", "w", 32, (0.5,) * 3, (0.25,) * 3))
    good = t(ds.manifest.path[1])
    assert good.shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"00000000_000.png: the PNG/JPEG/TIFF reader \(MONAI PILReader\) failed"):
        t(ds.manifest.path[0])


def test_model_input_from_a_real_dicom_file():
    """pydicom ships a real CT slice; it goes through the same transform as PNG radiographs."""
    import torch
    from pydicom.data import get_testdata_file

    from dinoscale.data.preprocess import build_transform
    from dinoscale.features import FeatureRecipe

    t = build_transform(FeatureRecipe("t", "w", 32, (0.5,) * 3, (0.25,) * 3))
    x = t(get_testdata_file("CT_small.dcm"))
    assert x.shape == (3, 32, 32)
    # scaled to [0, 1] then normalised with mean 0.5 / std 0.25 (resizing to 32 px smooths the small bright bones)
    assert type(x) is torch.Tensor
    assert -2.3 < float(x.min()) < -1.5 and 0.5 < float(x.max()) < 2.3
    assert x.std() > 0.3  # anatomy, not a constant image
