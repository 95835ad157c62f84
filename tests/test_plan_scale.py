"""A plan that knows bytes and counts the right units: forward passes in slices, tiles and sections from the
published sizes (no data needed), bytes on disk and peak memory per feature set, and a sweep refused when a
task cannot fit the memory of a node."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_spec_dict
from dinoscale.cli import app
from dinoscale.spec import load_spec, parse_spec
from dinoscale.sweep.plan import NotRunnableError, build_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSCALE_DATA", str(tmp_path / "no-data-here"))
    return tmp_path


def _per_set(plan):
    """Forward passes of one backbone x resolution (all splits of one view)."""
    n_sets = len({(f.backbone.name, f.resolution, f.view) for f in plan.feature_sets})
    return plan.forward_passes() / n_sets


def test_volumes_slides_and_blocks_are_counted_in_slices_tiles_and_sections(no_data):
    ct = build_plan(load_spec(ROOT / "sweeps/ct.yaml"), no_data)
    assert ct.dataset is None and ct.published.units == 50_188
    assert _per_set(ct) == pytest.approx(50_188 * 300, rel=1e-3)  # not 50,188 images
    wsi = build_plan(load_spec(ROOT / "sweeps/wsi.yaml"), no_data)
    assert _per_set(wsi) == pytest.approx(399 * 8_000, rel=1e-3)
    raw = load_spec(ROOT / "sweeps/wsi.yaml").model_dump(mode="json")
    raw["dataset"]["tile_mpp"] = 0.25  # 40x: four times the tiles
    assert _per_set(build_plan(parse_spec(raw), no_data)) == pytest.approx(4 * 399 * 8_000, rel=1e-3)
    mri = build_plan(load_spec(ROOT / "sweeps/mri.yaml"), no_data)
    assert _per_set(mri) == pytest.approx(484 * 155, rel=1e-3) and mri.forward_passes() > 0
    em = build_plan(load_spec(ROOT / "sweeps/em.yaml"), no_data)
    assert _per_set(em) == pytest.approx(3 * 125, rel=1e-2)


def test_bytes_on_disk_follow_the_token_set_and_the_grid(no_data):
    mri = build_plan(load_spec(ROOT / "sweeps/mri.yaml"), no_data)
    vitl_448 = [f for f in mri.feature_sets if f.backbone.name == "dinov3-vitl16" and f.resolution == 448]
    # MSD BrainTumour: 484 volumes x 155 slices x a 28 x 28 grid x 1,024 dims in float16
    assert sum(f.nbytes for f in vitl_448) == pytest.approx(484 * 155 * 28 * 28 * 1024 * 2, rel=2e-3)
    assert sum(f.n_shards for f in vitl_448) > 3  # cut into shards of at most 2 GiB
    xray = build_plan(load_spec(ROOT / "sweeps/xray.yaml"), no_data)
    vits = [f for f in xray.feature_sets if f.backbone.name == "dinov3-vits16" and f.resolution == 224]
    assert sum(f.nbytes for f in vits) == pytest.approx(112_120 * 2 * 384 * 2, rel=2e-3)  # CLS + mean patch


def test_cli_plan_shows_bytes_memory_and_the_right_units(no_data, monkeypatch):
    monkeypatch.chdir(no_data)
    res = CliRunner().invoke(app, ["plan", str(ROOT / "sweeps/mri.yaml")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "k slices" in res.output and "484 volumes x ~155 slices" in res.output
    assert "on disk" in res.output and "extraction task RAM" in res.output and "GiB" in res.output
    assert "nnU-Net" in res.output  # the source of the typical sizes


def test_with_data_the_plan_predicts_the_bytes_the_store_will_hold(tmp_path):
    from dinoscale.features import FeatureStore
    from dinoscale.sweep.extraction import plan_jobs, run_job

    raw = tiny_spec_dict(tmp_path, resolutions=[32], backbones=[{"name": "dinov3-demo-xs", "weights": "random"}])
    plan = build_plan(parse_spec(raw), tmp_path)
    store = FeatureStore(plan.storage / "features")
    for job in plan_jobs(plan):
        run_job(job, str(plan.storage / "features"))
    for f in plan.feature_sets:
        assert store.nbytes(f.key.digest) == f.nbytes


def test_a_sweep_whose_trial_cannot_fit_a_node_is_refused_before_anything_runs(tmp_path, ray_local):
    from dinoscale.sweep.runner import run_sweep

    raw = tiny_spec_dict(tmp_path, resolutions=[32], backbones=[{"name": "dinov3-demo-xs", "weights": "random"}])
    raw["resources"] = {"node_memory_gb": 0.5}
    with pytest.raises(
        NotRunnableError,
        match=r"(?s)resources.node_memory_gb.*cell dinov3-demo-xs_r32_linear_frozen_s0: a trial needs ~[\d.]+ (GiB|MiB)",
    ):
        run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True)
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "store" / "features").exists()
    # the dry run says the same without refusing to show the plan
    spec_file = tmp_path / "spec.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["plan", str(spec_file)], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "would not fit" in out.output and "a sweep would be refused" in out.output
