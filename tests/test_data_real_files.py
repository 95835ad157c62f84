"""Real files that ship inside installed packages (pydicom's MR and CT, nibabel's NIfTI test volumes),
read through dinoscale's MONAI readers: shape, orientation and intensity units."""

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dinoscale.features import FeatureRecipe

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def test_real_mr_slice_keeps_its_values_and_layout():
    from dinoscale.data.readers import read_image

    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2" and "RescaleSlope" not in ds
    img = read_image(path)
    assert img.shape == (ds.Rows, ds.Columns) == (64, 64)  # [rows, cols], display order
    np.testing.assert_array_equal(img, ds.pixel_array.astype(np.float32))  # no rescale: MR arbitrary units


def _series(folder: Path, order=(3, 0, 4, 1, 2), spacing=2.5) -> list[int]:
    """A 5-slice CT series built from pydicom's real CT slice: files written in shuffled order, each slice
    at its own table position with a marker value in its corner."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir()
    for i, k in enumerate(order):
        ds = copy.deepcopy(src)
        arr = ds.pixel_array.copy()
        arr[0, 0] = 1000 + 10 * k
        ds.PixelData = arr.tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing]
        ds.SliceLocation, ds.InstanceNumber = k * spacing, k + 1
        ds.save_as(folder / f"img{i:02d}.dcm")
    return [1000 + 10 * k + int(src.RescaleIntercept) for k in range(len(order))]  # HU, by position


def test_dicom_series_folder_is_one_volume_sorted_by_position_in_hu(tmp_path):
    from dinoscale.data.preprocess import build_volume_transform

    expected_hu = _series(tmp_path / "series")
    lo, hi = -1024.0, 3071.0
    load, _ = build_volume_transform(
        FeatureRecipe("t", "w", 32, (0.5,) * 3, (0.5,) * 3, intensity="window", window=(lo, hi))
    )
    vol = load(str(tmp_path / "series"))
    assert tuple(vol.shape) == (128, 128, 5)  # x, y, slices, whatever the file order
    # reoriented to RAS: DICOM's patient axes are LPS, so the first row / column (L, P) end up last (R->L, A->P)
    np.testing.assert_allclose(vol[-1, -1, :].numpy(), (np.array(expected_hu) - lo) / (hi - lo), rtol=1e-6)


def test_a_dicom_series_feeds_volume_extraction_and_its_digest_tracks_the_files(tmp_path):
    from dinoscale.features.extract import extract_volume_slices, recipe_for
    from dinoscale.models import load_backbone

    _series(tmp_path / "s1")
    xs = load_backbone("dinov3-demo-xs", "random", seed=0)
    import torch

    feats, stats = extract_volume_slices(
        xs,
        recipe_for(xs, 32, view="slices", antialias="gaussian", window=(-160, 240)),
        [str(tmp_path / "s1")],
        [5],
        device=torch.device("cpu"),
        num_workers=0,
    )
    assert feats.shape == (5, 2 * xs.model.num_features) and stats.slices == 5
    from dinoscale.data import PreparedDataset

    df = pd.DataFrame(
        {"sample_id": ["a"], "patient_id": ["p"], "path": [str(tmp_path / "s1")], "split": ["train"], "n_slices": [5]}
    )
    before = PreparedDataset("x", "segmentation", [], df, {}, tmp_path).manifest_digest("train")
    (tmp_path / "s1" / "img00.dcm").unlink()  # one slice less: another dataset
    after = PreparedDataset("x", "segmentation", [], df, {}, tmp_path).manifest_digest("train")
    assert before != after


def test_real_las_nifti_is_reoriented_to_ras():
    from dinoscale.data.readers import read_volume

    img = nib.load(NIB_DATA / "anatomical.nii")
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    vol, spacing = read_volume(NIB_DATA / "anatomical.nii")
    assert vol.shape == (1, 33, 41, 25) and spacing == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(vol[0], np.flip(np.asarray(img.dataobj, dtype=np.float32), axis=0))  # L->R: x flipped


def test_real_anisotropic_nifti_keeps_its_spacing_and_can_be_resampled():
    from dinoscale.data.readers import read_volume

    vol, spacing = read_volume(NIB_DATA / "standard.nii.gz")
    assert vol.shape == (1, 4, 5, 7) and spacing == (1.0, 3.0, 2.0)
    np.testing.assert_array_equal(vol[0], np.asarray(nib.load(NIB_DATA / "standard.nii.gz").dataobj, dtype=np.float32))
    iso, sp = read_volume(NIB_DATA / "standard.nii.gz", spacing=(1.0, 1.0, 1.0), mode="nearest")
    assert sp == pytest.approx((1.0, 1.0, 1.0)) and iso.shape[1:] == (4, 13, 13)  # 5 x 3 mm -> 13, 7 x 2 mm -> 13


def test_semireal_ct_inserts_lesions_into_the_real_slice_and_says_so(tmp_path):
    from scipy import ndimage

    from dinoscale.data import prepare_dataset
    from dinoscale.data.readers import read_image
    from dinoscale.data.semireal import BASE_FILE, CLASSES, _hu, base_slice
    from dinoscale.spec import DatasetSpec, PhantomSpec

    spec = DatasetSpec(name="semireal-ct", phantom=PhantomSpec(n_patients=12, images_per_patient=(2, 2)))
    ds = prepare_dataset(spec, tmp_path)
    again = prepare_dataset(spec, tmp_path / "other")
    assert (
        ds.provenance["data.source"] == "semi-synthetic" and BASE_FILE in ds.provenance["data.base"] and ds.is_phantom
    )
    assert ds.classes == CLASSES and len(ds.manifest) == 24
    pd.testing.assert_frame_equal(ds.manifest[CLASSES], again.manifest[CLASSES])  # deterministic labels
    _, template = base_slice()
    real = _hu(template)
    for row in ds.manifest.itertuples():
        img = read_image(row.path)  # through MONAI's DICOM reader: HU again
        assert img.shape == real.shape
        np.testing.assert_array_equal(img, read_image(again.manifest.loc[row.Index, "path"]))
        candidates = [real, real[:, ::-1]]
        shifts = [
            np.abs(img - np.roll(c, (dy, dx), (0, 1))) for c in candidates for dy in range(-6, 7) for dx in range(-6, 7)
        ]
        diff = min(shifts, key=lambda d: np.median(d))
        assert np.median(diff) < 20  # the real anatomy, shifted / flipped, plus noise
        # lesions (+45..70 or -60..-40 HU, radius >= 2 px) survive a 3x3 mean; the noise (sd <= 12 HU) does not
        blobs, n = ndimage.label(ndimage.uniform_filter(diff, 3) > 25)
        largest = np.bincount(blobs.ravel())[1:].max() if n else 0
        has_lesion = bool(row.hyperdense or row.hypodense)
        assert (largest >= 4) == has_lesion, (row.sample_id, largest, has_lesion)


def test_a_ct_window_applies_to_2d_dicom_slices():
    from dinoscale.data.preprocess import build_transform
    from dinoscale.data.readers import read_image

    path = get_testdata_file("CT_small.dcm")
    hu = read_image(path)
    x = build_transform(FeatureRecipe("t", "w", 128, (0.0,) * 3, (1.0,) * 3, intensity="window", window=(-125, 225)))(
        path
    )[0].numpy()
    assert x.shape == (128, 128) and x.min() >= -1e-3 and x.max() <= 1 + 1e-3
    air = hu < -400  # clipped to the bottom of the window; soft tissue inside it
    assert x[air].max() < 0.05 and 0.2 < np.median(x[(hu > -50) & (hu < 100)]) < 0.6
    plain = build_transform(FeatureRecipe("t", "w", 128, (0.0,) * 3, (1.0,) * 3))(path)[0].numpy()
    tissue = (hu > -100) & (hu < 200)
    assert x[tissue].std() > 3 * plain[tissue].std()  # the window spreads soft tissue over [0, 1]; min-max does not


def test_real_mni152_template_and_tissue_maps_stay_aligned_through_the_readers(tmp_path):
    """nilearn's MNI152 T1 template (a real, averaged brain MRI) with its grey / white matter maps turned
    into a label map: read the way a segmentation sweep reads them, white matter is brighter than grey
    matter on T1 voxel for voxel, which only holds if image and labels are aligned."""
    import nilearn

    from dinoscale.data.masks import load_label_maps
    from dinoscale.data.preprocess import build_volume_transform
    from dinoscale.data.readers import read_volume

    data = Path(nilearn.__file__).parent / "datasets" / "data"
    t1_path = data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    gm = np.asarray(nib.load(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    wm = np.asarray(nib.load(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj)
    labels = np.where(wm > 128, 2, np.where(gm > 128, 1, 0)).astype(np.uint8)
    mask_path = tmp_path / "tissue.nii.gz"
    nib.save(nib.Nifti1Image(labels, nib.load(t1_path).affine), str(mask_path))

    vol, spacing = read_volume(t1_path)
    assert vol.shape == (1, 197, 233, 189) and spacing == (1.0, 1.0, 1.0)  # RAS already, 1 mm
    load, _ = build_volume_transform(FeatureRecipe("t", "w", 64, (0.5,) * 3, (0.5,) * 3))
    t1 = load(str(t1_path)).numpy()  # [X, Y, Z] in [0, 1], as extraction reads it
    y = load_label_maps([str(mask_path)], [189], n_classes=3)[0]  # (Z, X, Y): slice k = axial slice k
    t1_slices = np.moveaxis(t1, -1, 0)
    assert y.shape == t1_slices.shape == (189, 197, 233)
    white, grey, other = (t1_slices[y == c].mean() for c in (2, 1, 0))
    assert white > grey + 0.1 and grey > other  # T1: white matter brightest, then grey matter, then CSF / outside
