"""HECKTOR 2022 and AC3/AC4 adapters on their replicas: the published layouts read as the protocol asks (the
end-to-end rehearsals of sweeps/petct-hecktor.yaml and sweeps/em-ac3ac4.yaml run in tests/test_rehearse.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dinoscale.data import prepare_dataset
from dinoscale.data.dataset import DataError
from dinoscale.data.replicas import get_replica
from dinoscale.data.replicas.hecktor import CASES
from dinoscale.spec import DatasetSpec


@pytest.fixture
def hecktor(tmp_path):
    spec = DatasetSpec(name="hecktor2022", root=str(tmp_path / "hecktor2022_training"))
    get_replica("hecktor2022").write(tmp_path, spec)
    return spec, tmp_path / "hecktor2022_training"


def test_hecktor_cases_carry_their_centre_and_a_pet_on_the_ct_grid(hecktor, tmp_path):
    spec, base = hecktor
    ds = prepare_dataset(spec, tmp_path / "store")
    m = ds.manifest
    assert sorted(m["sample_id"]) == sorted(CASES) and ds.mask_labels == {1: "GTVp", 2: "GTVn"}
    assert set(m["center"]) == {"CHUM", "CHUP", "CHUS", "CHUV", "HGJ", "HMR", "MDA"}
    assert (m.groupby("patient_id")["split"].nunique() == 1).all() and set(m["split"]) == {"train", "val", "test"}
    row = m.set_index("sample_id").loc["CHUM-001"]
    ct, pet_native, label = (
        nib.load(str(base / p))
        for p in ("imagesTr/CHUM-001__CT.nii.gz", "imagesTr/CHUM-001__PT.nii.gz", "labelsTr/CHUM-001.nii.gz")
    )
    assert pet_native.shape != ct.shape  # published: each on its own grid
    pet = nib.load(row["pet_path"])
    assert pet.shape == ct.shape and np.allclose(pet.affine, ct.affine)
    suv, lab = np.asarray(pet.dataobj), np.asarray(label.dataobj)
    assert suv[lab == 1].mean() > 3 * suv[lab == 0].mean()  # the FDG-avid tumour lands on its label
    again = prepare_dataset(spec, tmp_path / "store")  # resampled once: the copy is reused
    assert again.manifest["pet_path"].tolist() == m["pet_path"].tolist()


def test_hecktor_label_spelled_as_the_data_page_tree_and_an_unlisted_case(hecktor, tmp_path):
    spec, base = hecktor
    (base / "labelsTr" / "HMR-004.nii.gz").rename(base / "labelsTr" / "HMR_004.nii.gz")
    ds = prepare_dataset(spec, tmp_path / "store")
    assert ds.manifest.set_index("sample_id").loc["HMR-004", "mask_path"].endswith("HMR_004.nii.gz")
    csv = base / "hecktor2022_clinical_info_training.csv"
    table = pd.read_csv(csv)
    assert list(table.columns)[:4] == ["PatientID", "Task 1", "Task 2", "CenterID"]
    table[table["PatientID"] != "MDA-002"].to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"case\(s\) \['MDA-002'\] of imagesTr not listed"):
        prepare_dataset(spec, tmp_path / "store")


def test_ac3ac4_split_is_the_protocols_sections(tmp_path):
    spec = DatasetSpec(name="ac3ac4", root=str(tmp_path))
    get_replica("ac3ac4").write(tmp_path, spec)
    ds = prepare_dataset(spec, tmp_path / "store")
    cuts = {r.split: (r.sample, r.z_start, r.z_stop) for r in ds.manifest.itertuples()}
    assert cuts == {"train": ("AC4", 0, 80), "val": ("AC4", 80, 100), "test": ("AC3", 0, 100)}
    assert ds.replicates == "fixed"
    test = ds.units("test")
    assert test.masks == [f"{tmp_path / 'AC3_labels.h5'}::main::0:100"]
    assert test.spacing == [(6.0, 6.0, 29.0)]  # the files record no resolution: the stated 6 x 6 x 29 nm
    (tmp_path / "AC4_labels.h5").unlink()
    with pytest.raises(DataError, match=r"AC4_labels\.h5 not found"):
        prepare_dataset(spec, tmp_path / "store")


def test_aggregated_dice_accumulates_over_the_split_as_hecktor_2022():
    from dinoscale.tasks import _aggregated_dice

    target = np.zeros((3, 4, 4), np.int64)
    pred = np.zeros_like(target)
    target[0, :2, :2] = 1  # 4 GTVp voxels, half found
    pred[0, :1, :2] = 1
    target[1, 2:, 2:] = 2  # 4 GTVn voxels, all found, 4 spurious ones beside
    pred[1, 2:, :] = 2
    pred[2, 0, 0] = 1  # a GTVp predicted where the ground truth has none: counts (no volume dropped)
    out = _aggregated_dice(pred, target, 3, ["GTVp", "GTVn"])
    assert out["test_dice_agg_GTVp"] == pytest.approx(2 * 2 / (3 + 4))
    assert out["test_dice_agg_GTVn"] == pytest.approx(2 * 4 / (8 + 4))
    assert out["test_dice_agg"] == pytest.approx((4 / 7 + 8 / 12) / 2)
