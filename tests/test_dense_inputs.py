"""Inputs of segmentation, EM and PET/CT cells: per-slice feature rows, PET fusion, label maps, the
watershed agglomeration, and the task / probe checks made before a sweep starts."""

import nibabel as nib
import numpy as np
import pytest
import torch

from dinoscale.data import DataError
from dinoscale.data.masks import load_label_maps
from dinoscale.features.extract import extract_features, extract_volume_slices, recipe_for
from dinoscale.metrics import variation_of_information
from dinoscale.models import load_backbone
from dinoscale.probes.segmentation import affinity_targets, agglomerate_affinities
from test_extraction_volumes import CPU, Slices, _volumes


def SL(backbone, tokens, **fields):
    """The recipe of per-slice features at 32 px."""
    return recipe_for(backbone, 32, view="slices", tokens=tokens, antialias="gaussian", **fields)


@pytest.fixture(scope="module")
def xs():
    return load_backbone("dinov3-demo-xs", "random", seed=0)


def test_slice_rows_are_each_slice_in_volume_order(xs, tmp_path):
    paths = _volumes(tmp_path, n=3)  # 5, 6 and 7 slices
    n = [5, 6, 7]
    grids, stats = extract_volume_slices(xs, SL(xs, "patch_grid"), paths, n, batch_size=4, device=CPU, num_workers=2)
    assert grids.shape == (18, xs.model.num_features, 2, 2) and stats.slices == 18 and stats.images == 3
    for v, p in enumerate(paths):
        ref, _ = extract_features(
            xs, recipe_for(xs, 32, tokens="patch_grid"), Slices(p, xs, 32), batch_size=8, device=CPU, num_workers=0
        )
        np.testing.assert_allclose(grids[sum(n[:v]) : sum(n[: v + 1])], ref, rtol=1e-4, atol=1e-5)


def test_a_volume_with_another_slice_count_than_the_manifest_names_its_file(xs, tmp_path):
    paths = _volumes(tmp_path, n=2)
    with pytest.raises(DataError, match=r"vol1\.nii\.gz: 6 slices .* the manifest says 9"):
        extract_volume_slices(xs, SL(xs, "cls_mean_patch"), paths, [5, 9], device=CPU, num_workers=0)


def _pet_pair(tmp_path, shape=(24, 24, 4), pet_shape=None, hot=True):
    rng = np.random.default_rng(0)
    ct = (rng.normal(size=shape) * 50).astype(np.float32)
    pet = np.zeros(pet_shape or shape, np.float32)
    if hot:
        pet[8:16, 8:16] = 8.0  # a hot lesion, invisible on CT
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(pet, np.eye(4)), str(tmp_path / f"pet{int(hot)}.nii.gz"))
    return str(tmp_path / "ct.nii.gz"), str(tmp_path / f"pet{int(hot)}.nii.gz")


def test_pet_is_fused_into_the_input_channels(xs, tmp_path):
    ct, hot = _pet_pair(tmp_path)
    _, cold = _pet_pair(tmp_path, hot=False)
    a, _ = extract_volume_slices(
        xs, SL(xs, "cls_mean_patch", window=(-160, 240)), [ct], [4], pet_paths=[hot], device=CPU, num_workers=0
    )
    b, _ = extract_volume_slices(
        xs, SL(xs, "cls_mean_patch", window=(-160, 240)), [ct], [4], pet_paths=[cold], device=CPU, num_workers=0
    )
    assert a.shape == b.shape == (4, xs.model.num_features * 2)
    assert np.abs(a - b).max() > 1e-3  # the PET lesion changes the features of the same CT


def test_pet_of_another_shape_than_its_ct_names_both_files(xs, tmp_path):
    ct, _ = _pet_pair(tmp_path)
    _, pet = _pet_pair(tmp_path / ".." / tmp_path.name, pet_shape=(20, 24, 4))
    with pytest.raises(DataError, match=r"pet1\.nii\.gz: PET shape \(20, 24, 4\) differs from its CT .*ct\.nii\.gz"):
        extract_volume_slices(xs, SL(xs, "cls_mean_patch"), [ct], [4], pet_paths=[pet], device=CPU, num_workers=0)


def _mask(tmp_path, name, arr):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    return str(p)


def test_label_maps_are_slices_first_and_checked(tmp_path):
    m = np.zeros((8, 6, 3), np.uint8)
    m[2:4, 1:3, 1] = 2
    good = _mask(tmp_path, "a.nii.gz", m)
    y = load_label_maps([good, good], [3, 3], n_classes=3)
    assert y.shape == (2, 3, 8, 6) and y[0, 1, 2, 1] == 2 and y[0, 0].max() == 0  # slice k = last axis k
    with pytest.raises(DataError, match=r"a\.nii\.gz: label value\(s\) \[2\] outside the probe's 2 classes"):
        load_label_maps([good], [3], n_classes=2)
    with pytest.raises(DataError, match=r"a\.nii\.gz: mask of shape \(8, 6, 3\) does not match its image \(4 slices"):
        load_label_maps([good], [4], n_classes=3)
    other = _mask(tmp_path, "b.nii.gz", np.zeros((8, 7, 3), np.uint8))
    with pytest.raises(DataError, match=r"b\.nii\.gz: mask shape \(3, 8, 7\) differs"):
        load_label_maps([good, other], [3, 3], n_classes=3)
    frac = _mask(tmp_path, "c.nii.gz", np.full((8, 6, 3), 0.5, np.float32))
    with pytest.raises(DataError, match=r"c\.nii\.gz: a label map holds integers"):
        load_label_maps([frac], [3], n_classes=3)
    assert load_label_maps([other], [3], n_classes=None).dtype == np.int64  # instance ids: any non-negative value


def test_watershed_keeps_objects_apart_where_one_leak_merges_components():
    labels = np.zeros((1, 16, 16), np.int64)
    labels[0, :, :8], labels[0, :, 8:] = 1, 2
    aff = affinity_targets(torch.as_tensor(labels))[0].numpy() * 0.9 + 0.05  # soft, like a trained head
    aff[1, 7, 8] = 0.95  # one leaky pixel across the boundary
    merged = agglomerate_affinities(aff, 0.5, method="components")
    assert len(np.unique(merged[merged > 0])) == 1  # connected components: the leak merges both objects
    split = agglomerate_affinities(aff, 0.5, min_size=4, method="watershed")
    assert sum(variation_of_information(split, labels[0])) == pytest.approx(0.0, abs=1e-9)


def test_probes_must_fit_the_task_before_anything_runs(tmp_path):
    import yaml

    from conftest import ROOT
    from dinoscale.spec import SpecError, parse_spec
    from dinoscale.sweep.plan import NotRunnableError, build_plan, check_runnable

    def plan(modality, **changes):
        raw = yaml.safe_load((ROOT / "sweeps" / "demo" / f"{modality}.yaml").read_text())
        raw.update(
            {
                "storage": {"path": str(tmp_path / "store")},
                "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
                "resolutions": [64],
                **changes,
            }
        )
        raw["dataset"]["phantom"].update({"n_patients": 12, "depth": 8})
        return build_plan(parse_spec(raw), tmp_path, require_data=True)

    # the registry states these datasets' tasks: refused by the spec's validation already (``validate``)
    with pytest.raises(SpecError, match=r"probe\(s\) \['linear'\] do not fit dataset 'phantom-mri' \(segmentation"):
        plan("mri", probes=[{"kind": "linear"}], features={"tokens": "cls_mean_patch"})
    with pytest.raises(SpecError, match=r"probe\(s\) \['segmentation'\] do not fit .*instance_segmentation"):
        plan("em", probes=[{"kind": "segmentation"}])
    with pytest.raises(NotRunnableError, match="patch_grid"):
        check_runnable(plan("ct", features={"tokens": "patch_grid"}))
    with pytest.raises(NotRunnableError, match=r"strategies \['lora'\] .* Use strategies: \[frozen\]"):
        check_runnable(plan("wsi", strategies=["frozen", "lora"]))
    ok = plan("mri")
    check_runnable(ok)
    assert {f.view for f in ok.feature_sets} == {"slices"} and all(
        (f.key.recipe.tokens, f.key.recipe.view) == ("patch_grid", "slices") for f in ok.feature_sets
    )
