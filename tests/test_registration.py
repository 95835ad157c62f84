"""The registration task kind: ConvexAdam's known answer on a phantom pair, the warped-label metrics against a
reference computation, the CAMUS adapter on its replica, and the CAMUS paper spec rehearsed end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from conftest import ROOT
from dinoscale import record
from dinoscale.data.replicas.camus import echo_pair
from dinoscale.metrics import registration_per_pair
from dinoscale.probes.convex_adam import convex_adam, convex_step, inconsistency, warp
from dinoscale.probes.mind import mind_ssc
from dinoscale.probes.registration import RegistrationProbeSpec, foreground_mask, pca_maps, register_pair, token_mask
from dinoscale.probes.registry import SegSplit
from dinoscale.tasks import Scoring, get_task


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in (1, 2, 3)]))


def _phantom():
    p = echo_pair(np.random.default_rng(0), 64)
    # feature maps standing in for patch tokens: the frame at 4 scales (D = 4 channels at full resolution)
    feats = {k: np.stack([ndimage.gaussian_filter(p[k] / 255.0, s) for s in (0.5, 1, 2, 4)]) for k in ("ed", "es")}
    return p, feats


@pytest.mark.parametrize("features", ["dino", "mind", "dino+mind"])
def test_a_phantom_pair_is_registered_to_its_known_deformation(features):
    """The demo: an echo-like ED frame is its ES frame under a known smooth contraction u (ED(x) = ES(x + u(x)));
    the registration probe (joint PCA of the two feature maps on their foreground, and / or the frames' MIND-SSC;
    inverse-consistent ConvexAdam) registers ES onto ED. The warped ES labels beat the identity transform's Dice
    by far, and the recovered displacement is u within a fraction of its size."""
    p, feats = _phantom()
    spec = RegistrationProbeSpec(pca_channels=4, features=features)
    images = (p["ed"].astype(np.float32), p["es"].astype(np.float32))  # the foreground mask and MIND read them
    warped, disp = register_pair(feats["ed"], feats["es"], p["es_gt"], spec, 1.25, seed=0, images=images)
    identity, registered = _dice(p["es_gt"], p["ed_gt"]), _dice(warped, p["ed_gt"])
    heart = (p["ed_gt"] > 0) | (p["es_gt"] > 0)
    magnitude = np.linalg.norm(p["u"], axis=0)[heart].mean()
    endpoint_error = np.linalg.norm(disp - p["u"], axis=0)[heart].mean()
    print(
        f"{features}: Dice identity {identity:.3f} -> registered {registered:.3f}; "
        f"EPE {endpoint_error:.2f} px of {magnitude:.2f}"
    )
    assert identity < 0.8 and registered > identity + 0.15
    assert magnitude > 1.5 and endpoint_error < 0.3 * magnitude


def test_the_inverse_consistent_convex_step_is_closer_to_invertible():
    """convexAdam's ic=True: the convex step run both ways and made inverse-consistent; the forward field composed
    with the backward one is nearer the identity (|u_fwd(x) + u_bwd(x + u_fwd(x))|) than the two one-way fields
    are, on the phantom pair (2D) and a ball moved by a smooth shift (3D)."""
    p, feats = _phantom()
    ball_fixed, ball_moving, _, _ = _ball()
    pairs = {
        "2D": [torch.tensor(feats[k]).float()[None] for k in ("ed", "es")],
        "3D": [torch.tensor(v).float()[None, None] for v in (ball_fixed, ball_moving)],
    }
    for what, (fix, mov) in pairs.items():
        grid_sp, hw = (4, 4) if what == "2D" else (2, 2)
        one_way = convex_step(fix, mov, grid_sp, hw, ic=False)[0], convex_step(mov, fix, grid_sp, hw, ic=False)[0]
        fwd, bwd = convex_step(fix, mov, grid_sp, hw, ic=True)
        before, after = inconsistency(*one_way), inconsistency(fwd, bwd)
        print(f"{what}: inverse-consistency error {before:.3f} -> {after:.3f} coarse voxels")
        assert after < 0.5 * before and fwd.abs().mean() > 0.5 * one_way[0].abs().mean()  # not shrunk to 0


def test_the_foreground_mask_keeps_the_sector_and_the_pca_only_its_tokens():
    """DINO-Reg's mask on an echo frame: the heart (dark cavities included) inside, the corners beside the
    sector's apex (top) out; the PCA is fitted on (and gives values to) the foreground tokens only."""
    p, feats = _phantom()
    mask = foreground_mask(p["ed"])
    assert mask[p["ed_gt"] > 0].all() and not mask[:10, :10].any() and not mask[:10, -10:].any()
    grid = token_mask(mask, (16, 16))
    assert 0.2 < grid.mean() < mask.mean()  # tokens wholly inside the foreground: fewer than its pixels
    f, m = pca_maps(feats["ed"], feats["es"], 3, 0, masks=[token_mask(mask, (64, 64))] * 2)
    assert (f[:, ~token_mask(mask, (64, 64))] == 0).all() and f.abs().sum() > 0
    # a volume's slices are masked one at a time
    assert (foreground_mask(np.stack([p["ed"], p["es"]]))[0] == mask).all()


def test_mind_ssc_has_its_known_values_on_a_ramp():
    """MIND-SSC (convexAdam's MINDSSC, radius 1, dilation 2): on an intensity ramp along the first axis, the 8
    neighbour pairs that span that axis differ by d^2 and the 4 others by 0, so away from the border they read
    exp(-d^2 / (8 d^2 / 12)) = exp(-1.5) and exp(0) = 1. In 2D (4 channels), on the diagonal ramp x + y, two pairs
    differ by (2d)^2 and two by 0: exp(-4 d^2 / 2 d^2) = exp(-2) and 1. Unchanged by an affine change of
    intensities."""
    ramp = torch.arange(12, dtype=torch.float32)[:, None, None].expand(12, 12, 12)
    mind = mind_ssc(ramp)
    inner = mind[:, 4:-4, 4:-4, 4:-4].reshape(12, -1)
    values = sorted(float(v) for v in inner.mean(1))
    assert mind.shape == (12, 12, 12, 12) and float(inner.std(1).max()) < 1e-6
    assert values[:8] == pytest.approx([np.exp(-1.5)] * 8, abs=1e-5) and values[8:] == pytest.approx([1.0] * 4)
    flat = mind_ssc(ramp[:, :, 0] + ramp[:, :, 0].T)
    assert sorted(float(v) for v in flat[:, 4:-4, 4:-4].reshape(4, -1).mean(1)) == pytest.approx(
        [np.exp(-2.0)] * 2 + [1.0] * 2, abs=1e-5
    )
    img = torch.tensor(np.random.default_rng(0).normal(size=(10, 10, 10))).float()
    assert torch.allclose(mind_ssc(img), mind_ssc(3 * img + 7), atol=1e-5)


def _ball():
    """A ball (24^3) and its copy moved by a known smooth shift u: fixed(x) = moving(x + u(x))."""
    shape = (24, 24, 24)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    centre = np.array([11.5, 11.5, 11.5])[:, None, None, None]
    u = np.stack([2.0 * np.exp(-((g - centre) ** 2).sum(0) / (2 * 8.0**2)), np.zeros(shape), np.zeros(shape)])
    ball = ((g - centre) ** 2).sum(0) <= 6.0**2
    moving = ndimage.gaussian_filter(ball.astype(np.float64), 1.0)
    fixed = ndimage.map_coordinates(moving, g + u, order=1, mode="nearest")
    return fixed, moving, u, ball


def test_convex_adam_recovers_a_smooth_3d_deformation():
    """The same optimiser on volumes: a ball moved by a known smooth shift is brought back."""
    fixed, moving, u, ball = _ball()
    disp = convex_adam(torch.tensor(fixed)[None], torch.tensor(moving)[None], grid_sp=2, disp_hw=2, iterations=40)
    warped = warp(torch.tensor(moving)[None, None].float(), disp[None])[0, 0].numpy()
    assert np.abs(warped - fixed).mean() < 0.5 * np.abs(moving - fixed).mean()
    assert np.linalg.norm(disp.numpy() - u, axis=0)[ball].mean() < 0.5 * np.linalg.norm(u, axis=0)[ball].mean()


def _surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances of ``a``'s boundary pixels to ``b``'s boundary (the reference: scipy distance transforms)."""
    edge = lambda m: m ^ ndimage.binary_erosion(m)  # noqa: E731
    return ndimage.distance_transform_edt(~edge(b))[edge(a)]


def test_hd95_and_asd_match_a_distance_transform_reference_and_handle_empty_structures():
    fixed = np.zeros((1, 32, 32), np.int64)
    fixed[0, 8:20, 8:20] = 1  # a square
    fixed[0, 24:28, 4:10] = 3  # structure 3: in the fixed map only (the warped map misses it)
    warped = np.zeros_like(fixed)
    warped[0, 10:22, 9:23] = 1  # the square shifted and widened
    warped[0, 2:5, 25:29] = 2  # structure 2: spurious (absent from the fixed map); structure 4 in neither
    moving = np.zeros_like(fixed)
    out = registration_per_pair(warped, fixed, moving, 5, ["a", "b", "c", "d"])
    p, f = warped[0] == 1, fixed[0] == 1
    d_pf, d_fp = _surface_distances(p, f), _surface_distances(f, p)
    hd95 = max(np.percentile(d_pf, 95), np.percentile(d_fp, 95))
    asd = np.concatenate([d_pf, d_fp]).mean()
    assert out["hd95_a_px"][0] == pytest.approx(hd95, abs=1e-6)
    assert out["asd_a_px"][0] == pytest.approx(asd, abs=1e-6)
    diagonal = np.hypot(32, 32)  # a missed or a spurious structure: the field-of-view diagonal
    assert out["hd95_b_px"][0] == pytest.approx(diagonal) and out["asd_c_px"][0] == pytest.approx(diagonal)
    assert np.isnan(out["hd95_d_px"][0]) and np.isnan(out["asd_d_px"][0]) and np.isnan(out["dice_d"][0])
    assert np.isnan(out["dice_b"][0]) and out["dice_c"][0] == 0.0  # Dice on the structures the fixed map holds
    assert out["dice_a"][0] == pytest.approx(2 * (p & f).sum() / (p.sum() + f.sum()))
    assert out["hd95_px"][0] == pytest.approx(np.mean([hd95, diagonal, diagonal]))
    # the identity baseline: the empty moving map misses structures 1 and 3
    assert out["dice" + record.IDENTITY_SUFFIX][0] == 0.0
    assert out["asd_a_px" + record.IDENTITY_SUFFIX][0] == pytest.approx(diagonal)
    # with a spacing, distances are in mm
    mm = registration_per_pair(warped, fixed, moving, 5, ["a", "b", "c", "d"], spacing=(0.5, 0.5))
    assert mm["asd_a_mm"][0] == pytest.approx(asd * 0.5, abs=1e-6)


def test_the_registration_task_scores_pairs_beside_the_identity_transform():
    rng = np.random.default_rng(1)
    maps = []
    for _ in range(3):
        pair = echo_pair(rng, 32)
        maps += [pair["ed_gt"], pair["es_gt"]]
    target = np.stack(maps).astype(np.int64)
    ids = [f"p{k // 2}_{'ED' if k % 2 == 0 else 'ES'}" for k in range(6)]
    s = Scoring(ids, np.array(["p0", "p0", "p1", "p1", "p2", "p2"]), np.zeros((6, 0)), [], {1: "LV"}, 4, resamples=20)
    metrics, table = get_task("registration").score(target[0::2], target, s)  # a perfect registration
    assert metrics["test_dice"] == 1.0 and metrics["test_hd95_px"] == 0.0 and metrics["test_asd_px"] == 0.0
    assert metrics["test_dice_identity"] < 1.0 and metrics["test_asd_px_identity"] > 0
    assert list(table["sample_id"]) == ["p0_ED->p0_ES", "p1_ED->p1_ES", "p2_ED->p2_ES"]
    assert {"dice_LV", "dice_LV_identity", "hd95_LV_px"} <= set(table.columns)


def test_a_split_whose_pairs_join_two_patients_is_refused():
    from dinoscale.probes.registration import pairs

    split = SegSplit(np.zeros((4, 2, 2, 2)), np.zeros((4, 4, 4)), np.array(["a", "a", "b", "c"]))
    with pytest.raises(ValueError, match="pair 1 joins patients b and c"):
        pairs(split, "test")


def test_camus_adapter_reads_the_replica_as_ed_es_pairs_on_the_official_split(tmp_path):
    from dinoscale.data import prepare_dataset
    from dinoscale.data.readers import read_image
    from dinoscale.data.replicas import get_replica
    from dinoscale.spec import DatasetSpec

    spec = DatasetSpec(name="camus", root=str(tmp_path / "CAMUS_public"))
    get_replica("camus").write(tmp_path / "CAMUS_public", spec)
    ds = prepare_dataset(spec, tmp_path / "store")
    m = ds.manifest
    assert ds.task == "registration" and len(m) == 12 * 2 * 2 and ds.mask_labels[3] == "left atrium"
    assert m.groupby("split")["patient_id"].nunique().to_dict() == {"train": 8, "val": 2, "test": 2}
    assert list(m["sample_id"][:4]) == [
        "patient0001_2CH_ED",
        "patient0001_2CH_ES",
        "patient0001_4CH_ED",
        "patient0001_4CH_ES",
    ]
    units = ds.units("test")
    assert all(a == b for a, b in zip(units.patient_ids[0::2], units.patient_ids[1::2]))
    assert read_image(units.items[0]).shape == (128, 128)
    gt = np.asarray(pd.Series(units.masks).map(lambda x: read_image(x).max()))
    assert set(gt.astype(int)) == {3}


@pytest.mark.slow
def test_the_camus_spec_rehearses_end_to_end_with_the_identity_baseline(tmp_path, monkeypatch):
    """``dinoscale rehearse sweeps/camus.yaml --lean``: every cell finished with Dice, HD95 and ASD of the warped
    labels and the identity transform's beside them, the probe's constants in the protocol table."""
    from mlflow.tracking import MlflowClient

    from dinoscale.rehearse import rehearse

    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("DINOSCALE_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.chdir(tmp_path)
    r, out = rehearse(ROOT / "sweeps" / "camus.yaml", lean=True, quiet=True, project_dir=tmp_path, analyze=False)
    assert [row["cell"] for row in out.rows if row["state"] != "FINISHED"] == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name(r.spec.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    cells = [x for x in runs if x.data.tags.get(record.ROLE) == record.ROLE_CELL]
    assert len(cells) == len(out.plan.cells) == 4
    for run in cells:
        m = run.data.metrics
        for name in ("test_dice", "test_hd95_px", "test_asd_px", "test_dice_LV"):
            assert np.isfinite(m[name]) and np.isfinite(m[name + record.IDENTITY_SUFFIX])
    parent = next(x for x in runs if x.data.tags.get(record.ROLE) == record.ROLE_SWEEP)
    protocol = client.download_artifacts(parent.info.run_id, record.PROTOCOL, str(tmp_path))
    text = open(protocol).read()
    assert "ConvexAdam" in text and "identity transform" in text


def test_acdc_adapter_reads_the_replica_as_ed_es_volume_pairs(tmp_path):
    from dinoscale.data import prepare_dataset
    from dinoscale.data.replicas import get_replica
    from dinoscale.spec import DatasetSpec

    spec = DatasetSpec(name="acdc", root=str(tmp_path / "ACDC"), split={"val_fraction": 0.2})
    get_replica("acdc").write(tmp_path / "ACDC", spec)
    ds = prepare_dataset(spec, tmp_path / "store")
    m = ds.manifest
    assert ds.task == "registration" and ds.volumetric and ds.mask_labels == {1: "RV", 2: "myocardium", 3: "LV"}
    assert m.groupby("split")["patient_id"].nunique().to_dict() == {"train": 8, "val": 2, "test": 4}
    assert set(m.loc[m["split"] == "test", "patient_id"]) == {f"patient{i}" for i in range(101, 105)}
    ed_es = m["sample_id"].str.extract(r"frame(\d+)")[0].astype(int).to_numpy()
    assert (ed_es[0::2] == 1).all() and (ed_es[1::2] > 1).all()  # fixed ED (frame 1), then moving ES
    assert (m["patient_id"].to_numpy()[0::2] == m["patient_id"].to_numpy()[1::2]).all()
    # the probe's images (foreground mask, MIND-SSC): each volume on its label map's grid, slices first
    from dinoscale.data.masks import load_label_maps
    from dinoscale.sweep.inputs import ImageMaps

    units = ds.units("test")
    image, labels = ImageMaps(units.items, True)[1], load_label_maps(units.masks[1:2], units.n_slices[1:2], 4)[0]
    assert image.shape == labels.shape and image[labels == 3].mean() > 2 * image[labels == 0].mean()
    assert foreground_mask(image)[labels > 0].mean() > 0.9
    # a replicate's regrouped split (dinoscale.sweep.inputs.repartition) keeps each unit's image
    ims = ImageMaps(units.items, True)
    joined = ImageMaps.joined([ims, ImageMaps(units.items[::-1], True)], [1, len(ims)])
    assert joined.items == [units.items[1], units.items[-1]]
