"""Volumes of real datasets, on replicas of their published layouts (dinoscale.data.replicas: MSD, AutoPET).

The readers on the replicas (4 channels, LPS files reoriented to RAS, anisotropic spacings), the channel map
(which sequences the encoder sees, part of the feature key), the common grid (resampled, padded) and the way
back to each volume's native grid (metrics in mm on the native label maps, equal to MONAI's), the 5-fold
cross-validation by case, and the paper specs themselves run end to end on the replicas (slow).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from dinoscale.data import DataError, prepare_dataset
from dinoscale.data.replicas import get_replica
from dinoscale.spec import ChannelSpec, DatasetSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


def _replica(tmp_path: Path, name: str, subset: str | None = None, variant: str = "ok", **spec_kw):
    """Write a replica and prepare it with the spec's dataset part (``spec_kw``): (replica, prepared dataset)."""
    rep = get_replica(name).write(tmp_path / name, DatasetSpec(name=name, root=str(tmp_path), subset=subset), variant)
    ds = prepare_dataset(DatasetSpec(name=name, root=str(rep.root), subset=subset, **spec_kw), tmp_path)
    return rep, ds


# ---------------------------------------------------------------- the published layouts, read as published


def test_msd_brain_tumour_replica_is_the_decathlon_layout_and_reads_four_channels(tmp_path):
    from dinoscale.data.readers import read_volume

    rep, ds = _replica(tmp_path, "msd", "Task01_BrainTumour")
    task = rep.root / "Task01_BrainTumour"
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"} and meta["tensorImageSize"] == "4D"
    assert meta["numTraining"] == len(meta["training"]) == len(list((task / "labelsTr").glob("BRATS_*.nii.gz")))
    assert list((task / "imagesTr").glob("._*"))  # the tarballs' resource forks: listed by no dataset.json entry
    first = task / meta["training"][0]["image"]
    assert nib.load(str(first)).shape[3] == 4  # (x, y, z, 4) as published
    vol, spacing = read_volume(str(first))
    raw = np.asarray(nib.load(str(first)).dataobj)
    assert vol.shape == (4, *raw.shape[:3]) and spacing == (1.0, 1.0, 1.0)
    assert np.allclose(vol[2], raw[..., 2])  # channel k is the file's k-th sequence (t1gd)
    assert ds.volume_channels == ("FLAIR", "T1w", "t1gd", "T2w")
    assert ds.volume.channels.describe() == "['FLAIR', 't1gd', 'T2w'] -> R, G, B"  # the stated default
    assert set(np.unique(nib.load(str(task / meta["training"][0]["label"])).dataobj)) <= {0, 1, 2, 3}


def test_msd_spleen_is_reoriented_to_ras_with_its_anisotropic_spacing(tmp_path):
    from dinoscale.data.readers import read_volume, volume_spacing
    from dinoscale.data.volumes import native_geometry

    rep, ds = _replica(tmp_path, "msd", "Task09_Spleen")
    rows = ds.manifest
    shapes, spacings = set(), set()
    for path in rows["path"][:6]:
        img = nib.load(path)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # stored LPS, as the CT tasks are
        vol, sp = read_volume(path)
        raw = np.asarray(img.dataobj)
        assert np.array_equal(vol[0], raw[::-1, ::-1, :].astype(np.float32))  # RAS: x and y flipped
        assert sp == pytest.approx(volume_spacing(path)) and sp[2] > sp[0]  # thick slices
        assert native_geometry(path) == (vol.shape[1:], pytest.approx(sp))
        shapes.add(vol.shape[1:])
        spacings.add(round(sp[0], 3))
    assert len(shapes) > 1 and len(spacings) > 1  # every case its own shape and in-plane spacing


def test_autopet_replica_is_per_study_with_negatives_and_differing_grids(tmp_path):
    rep, ds = _replica(tmp_path, "autopet")
    assert rep.root.name == "FDG-PET-CT-Lesions"
    studies = sorted(rep.root.glob("PETCT_*/*"))
    assert all(" " in s.name and "-NA-" in s.name for s in studies)
    assert {p.name for p in studies[0].iterdir()} == {
        "CT.nii.gz",
        "CTres.nii.gz",
        "PET.nii.gz",
        "SUV.nii.gz",
        "SEG.nii.gz",
    }
    negatives = [s for s in studies if not np.asarray(nib.load(str(s / "SEG.nii.gz")).dataobj).any()]
    assert 0 < len(negatives) < len(studies)
    assert ds.manifest["patient_id"].nunique() < len(ds.manifest)  # follow-up studies: one patient, one split
    assert ds.volume.channels.describe() == "['ct', 'pet', 'mean'] -> R, G, B"  # PET/CT: one case of the map
    assert ds.grid is not None and ds.grid.spacing is None  # differing shapes: padded to one grid, not resampled


@pytest.mark.parametrize("variant", ["corrupt_file", "mask_shape"])
@pytest.mark.parametrize("name,subset", [("msd", "Task09_Spleen"), ("autopet", None)])
def test_broken_replicas_are_named_before_anything_runs(tmp_path, name, subset, variant):
    with pytest.raises(DataError) as e:
        _replica(tmp_path, name, subset, variant)
    assert "nii.gz" in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize(
    "name,subset,spec_file", [("msd", "Task09_Spleen", "ct-msd-spleen.yaml"), ("autopet", None, "petct.yaml")]
)
def test_a_label_outside_the_class_list_is_named_before_extraction(tmp_path, name, subset, spec_file):
    """The pre-flight reads every label map (cached for the trials) before any backbone runs."""
    from dinoscale.sweep.inputs import prepare_label_maps
    from dinoscale.sweep.plan import build_plan

    rep = get_replica(name).write(tmp_path / "data", DatasetSpec(name=name, root="x", subset=subset), "bad_label")
    plan = build_plan(parse_spec(_paper(tmp_path, spec_file, rep.root)), project_dir=tmp_path)
    with pytest.raises(DataError, match=r"SEG\.nii\.gz|spleen_\d+\.nii\.gz") as e:
        prepare_label_maps(plan)
    assert "outside the probe's 2 classes" in str(e.value)
    ok = get_replica(name).write(tmp_path / "ok", DatasetSpec(name=name, root="x", subset=subset))
    assert prepare_label_maps(build_plan(parse_spec(_paper(tmp_path, spec_file, ok.root)), project_dir=tmp_path)) == 3


# ---------------------------------------------------------------- channels


def test_channel_map_is_a_setting_in_the_feature_key(tmp_path):
    from dinoscale.data.volumes import channel_map

    names = ("FLAIR", "T1w", "t1gd", "T2w")
    default = channel_map(names)
    assert default.pick == (0, 2, 3) and default.kinds == ("minmax",) * 4
    picked = channel_map(names, ChannelSpec(pick=["T1w", 1, "mean"]))
    assert picked.pick == (1, 1, -1)
    each = channel_map(names, ChannelSpec(mode="each"))
    assert each.pick == (0, 1, 2, 3)
    sigs = {default.signature(), picked.signature(), each.signature()}
    assert len(sigs) == 3 and all(sigs)
    with pytest.raises(DataError, match=r"dataset.channels.pick: no channel 'T3'.*FLAIR"):
        channel_map(names, ChannelSpec(pick=["T3", "FLAIR", "T2w"]))
    # PET/CT keeps the key it always had; grey volumes add nothing
    assert channel_map(("ct", "pet")).signature() == ",pet_suv=[0.0, 10.0],channels=ct|pet|mean"
    assert channel_map(("image",)).signature() == ""


def test_each_channel_through_the_encoder_averages_its_features(tmp_path):
    """'each' runs every sequence as grey and averages: the mean of four grey extractions, one per channel."""
    from dinoscale.data.volumes import VolumeInput, channel_map
    from dinoscale.features.extract import extract_volume_slices, pick_device, recipe_for
    from dinoscale.models import load_backbone

    _, ds = _replica(tmp_path, "msd", "Task01_BrainTumour")
    path = ds.sources("test").items[0]
    vol = nib.load(path)
    bb = load_backbone("dinov3-demo-xs", "random", 0)
    names = ("FLAIR", "T1w", "t1gd", "T2w")
    each = VolumeInput(channel_map(names, ChannelSpec(mode="each")))
    common = dict(device=pick_device(), num_workers=0, progress=False)
    grey = recipe_for(bb, 32, view="slices", antialias="gaussian")
    x, _ = extract_volume_slices(bb, grey.with_(volume=each), [path], [16], **common)
    singles = []
    for k in range(4):
        one = tmp_path / f"ch{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(vol.dataobj)[..., k], vol.affine), str(one))
        singles.append(extract_volume_slices(bb, grey, [str(one)], [16], **common)[0])
    assert np.allclose(x, np.mean(singles, axis=0), atol=1e-5)
    picked = extract_volume_slices(bb, grey.with_(volume=ds.volume), [path], [16], **common)[0]
    assert not np.allclose(picked, x)


def test_the_mapping_and_the_grid_change_the_feature_key(tmp_path):
    from dinoscale.sweep.plan import build_plan

    rep = get_replica("msd").write(tmp_path / "msd", DatasetSpec(name="msd", root="x", subset="Task01_BrainTumour"))
    raw = _paper(tmp_path, "mri.yaml", rep.root)
    keys = {}
    for label, channels in (("default", None), ("t1", {"pick": ["T1w", "T1w", "T1w"]})):
        r = copy.deepcopy(raw)
        if channels:
            r["dataset"]["channels"] = channels
        plan = build_plan(parse_spec(r), project_dir=tmp_path)
        keys[label] = {fs.key.digest for fs in plan.feature_sets}
    assert keys["default"].isdisjoint(keys["t1"])


# ---------------------------------------------------------------- the grid and the way back


def test_resampling_and_back_mapping_round_trip_a_label_map(tmp_path):
    from dinoscale.data.volumes import VolumeGrid, to_grid, to_native

    _, ds = _replica(tmp_path, "msd", "Task09_Spleen", spacing="auto")
    grid = ds.grid
    assert grid.spacing is not None and len(set(ds.sources("train").n_slices)) == 1
    from dinoscale.data.volumes import read_label_volume

    for sid, mask in zip(ds.units("test").sample_ids, ds.units("test").masks):
        shape, spacing = ds.geometry[sid]
        lab = read_label_volume(mask)
        assert lab.shape == shape
        on_grid = to_grid(lab, spacing, grid, labels=True)
        assert on_grid.shape == grid.shape
        back = to_native(on_grid, shape, spacing, grid)
        assert back.shape == lab.shape
        # equal up to interpolation at the boundaries: every voxel off by one more than a voxel from an edge agrees
        from scipy import ndimage

        edge = ndimage.binary_dilation(lab > 0) ^ ndimage.binary_erosion(lab > 0)
        edge = ndimage.binary_dilation(edge, iterations=1)
        assert (back == lab)[~edge].all()
        assert abs(int((back > 0).sum()) - int((lab > 0).sum())) <= 0.25 * (lab > 0).sum()
    # a crop to a smaller grid maps back as background outside the kept field, the rest unchanged
    small = VolumeGrid(None, (10, 10, 4))
    lab = np.arange(12 * 12 * 6).reshape(12, 12, 6)
    back = to_native(to_grid(lab, (1, 1, 1), small, labels=True), (12, 12, 6), (1, 1, 1), small)
    assert np.array_equal(back[1:11, 1:11, 1:5], lab[1:11, 1:11, 1:5]) and back[0].max() == 0


def test_metrics_in_mm_on_the_native_grid_equal_monai(tmp_path):
    """Predictions on the common grid are scored on each volume's native grid with its spacing: Dice and
    HD95 (mm) equal MONAI's on the native arrays."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    from dinoscale.data.volumes import native_predictions, read_label_volume, to_grid
    from dinoscale.metrics import segmentation_per_volume

    _, ds = _replica(tmp_path, "msd", "Task09_Spleen", spacing="auto")
    units = ds.units("test")
    rng = np.random.default_rng(0)
    grid_pred = []
    for sid, m in zip(units.sample_ids, units.masks):
        lab = to_grid(read_label_volume(m), ds.geometry[sid][1], ds.grid, labels=True)
        noisy = lab.copy()
        noisy[rng.random(lab.shape) < 0.02] = 1  # spurious voxels: a finite, non-trivial HD95
        grid_pred.append(np.moveaxis(noisy, -1, 0))
    preds, targets, spacings = native_predictions(np.stack(grid_pred), units.masks, units.native, ds.grid)
    ours = {k: [] for k in ("dice", "hd95_mm")}
    for p, t, sp in zip(preds, targets, spacings):
        v = segmentation_per_volume(p[None], t[None], 2, ["spleen"], spacing=[sp])
        for k in ours:
            ours[k].append(float(v[k][0]))
        oh = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a)[None], 2).movedim(-1, 1).float()  # noqa: E731
        assert ours["dice"][-1] == pytest.approx(float(compute_dice(oh(p), oh(t), include_background=False)), abs=1e-6)
        hd = compute_hausdorff_distance(oh(p), oh(t), percentile=95, spacing=list(sp))
        assert ours["hd95_mm"][-1] == pytest.approx(float(hd), rel=1e-5)
    assert all(np.isfinite(ours["hd95_mm"])) and min(ours["dice"]) < 1.0


# ---------------------------------------------------------------- cross-validation by case


def test_msd_folds_are_by_patient_and_replicates_validate_on_each(tmp_path):
    from dinoscale.data.splits import replicate_indices, replicate_recipe

    _, ds = _replica(tmp_path, "msd", "Task09_Spleen")
    m = ds.manifest
    assert ds.folds == 5 and (m.loc[m["split"] == "test", "fold"] == -1).all()
    assert m.groupby("patient_id")["fold"].nunique().max() == 1  # no patient in two folds
    assert set(m.loc[m["split"] == "val", "fold"]) == {0}  # replicate 0: the dataset's split is fold 0
    train, val = ds.units("train"), ds.units("val")
    seen = []
    for k in range(5):
        recipe = replicate_recipe(k, 0, ds.replicates, "resplit", ds.folds)
        tr, va = replicate_indices(train.patient_ids, val.patient_ids, recipe, train.folds, val.folds)
        pids = np.concatenate([train.patient_ids, val.patient_ids])
        assert set(pids[tr]).isdisjoint(pids[va]) and len(va) > 0
        seen += list(pids[va])
    assert sorted(seen) == sorted(np.concatenate([train.patient_ids, val.patient_ids]))  # each case validated once
    _, no_cv = _replica(tmp_path / "b", "msd", "Task09_Spleen", split={"folds": 0})
    assert no_cv.folds == 0


# ---------------------------------------------------------------- the paper specs, end to end on the replicas


def _paper(
    tmp_path: Path, spec_file: str, data_root: Path, resolution: int = 32, steps: int = 30, seeds=(0, 1), **dataset
) -> dict:
    """The paper spec scaled down as a rehearsal does it, but with enough probe steps and resolution for a known
    answer (the plain rehearsals of every paper spec are tests/test_rehearse.py): demo ladder with random weights, one small resolution, the probe's steps cut, a light bootstrap; the
    dataset part (adapter, subset, window, channels, spacing, split) is the paper's."""
    raw = yaml.safe_load((ROOT / "sweeps" / spec_file).read_text())
    raw["dataset"]["root"] = str(data_root)
    raw["dataset"].update(dataset)
    raw["backbones"] = [{"name": "dinov3-demo-xs", "weights": "random"}]
    raw["resolutions"] = [resolution]
    for p in raw["probes"]:
        p.update({"steps": steps, "batch_size": 4, "learning_rates": [0.01]})
    raw["features"] = {**raw["features"], "batch_size": 16}
    raw["seeds"] = list(seeds)
    raw["metrics"] = {"bootstrap": {"resamples": 100, "level": 0.95, "seed": 0}}
    raw["resources"] = {"cpus_per_trial": 1, "cpus_per_extraction": 1}
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlruns.db"}
    raw["storage"] = {"path": str(tmp_path / "store")}
    raw["ray"] = {"num_cpus": 2}
    return raw


def _rehearse(tmp_path, spec_file, name, subset=None, **scale):
    from mlflow.tracking import MlflowClient

    from dinoscale.sweep.runner import run_sweep

    rep = get_replica(name).write(tmp_path / "data", DatasetSpec(name=name, root="x", subset=subset))
    spec = parse_spec(_paper(tmp_path, spec_file, rep.root, **scale))
    out = run_sweep(spec, project_dir=tmp_path, quiet=True, analyze=False)
    assert [r["state"] for r in out.rows] == ["FINISHED"] * len(out.rows) == ["FINISHED"] * len(spec.seeds)
    client = MlflowClient(out.tracking_uri)
    runs = [client.get_run(r["mlflow_run_id"]) for r in out.rows]
    return spec, out, runs


@pytest.mark.slow
def test_spleen_paper_spec_on_the_task09_replica_scores_on_the_native_grid(tmp_path, ray_local):
    # 4 x 4 tokens a slice (64 px) and 200 steps: enough for a linear head on random features to find the spleen
    spec, out, runs = _rehearse(
        tmp_path, "ct-msd-spleen.yaml", "msd", "Task09_Spleen", resolution=64, steps=200, seeds=[0]
    )
    for r in runs:
        m = r.data.metrics
        # scored on each case's native grid: a prediction mapped back misaligned would score ~0 (measured: 0.41)
        assert 0.1 < m["test_dice"] <= 1.0 and np.isfinite(m["test_hd95_mm"])
        assert m["n_test_volumes_scored"] == 4


def test_volumes_of_one_shape_keep_their_grid_and_their_feature_keys(tmp_path):
    """Phantom demos (one shape per split) are untouched: no resampling, no padding, the keys they had."""
    from dinoscale.data.preprocess import fusion_signature

    mri = prepare_dataset(
        DatasetSpec(name="phantom-mri", phantom={"n_patients": 12, "depth": 8, "image_size": 64}), tmp_path
    )
    assert (
        mri.volume is None
        and mri.sources("train").n_slices == mri.manifest.loc[mri.manifest.split == "train", "n_slices"].tolist()
    )
    pet = prepare_dataset(
        DatasetSpec(name="phantom-petct", phantom={"n_patients": 12, "depth": 8, "image_size": 64}), tmp_path
    )
    assert pet.grid is None and pet.volume.signature() == fusion_signature(("pet",))
    with pytest.raises(DataError, match="holds 2D images; dataset.channels / spacing apply to volumes"):
        prepare_dataset(DatasetSpec(name="phantom-xray", phantom={"n_patients": 12}, spacing="auto"), tmp_path)
