"""The plan: cells, feature sets, cache status, trial keys - before anything runs."""

from pathlib import Path

from typer.testing import CliRunner

from conftest import tiny_spec_dict
from dinoscale.cli import app
from dinoscale.features import FeatureStore
from dinoscale.spec import load_spec, parse_spec
from dinoscale.sweep.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]


def test_grid_feature_sets_and_trial_keys(tmp_path, tiny_spec):
    plan = build_plan(tiny_spec, tmp_path)
    assert len(plan.cells) == 2 * 2 * 2
    assert len(plan.feature_sets) == 2 * 2 * 3 and len(plan.missing) == 12
    assert len({c.trial_key for c in plan.cells}) == len(plan.cells)
    # probes of one backbone x resolution share its feature sets
    lin, knn = (
        next(c for c in plan.cells if c.probe == p and c.resolution == 32 and c.backbone.name == "dinov3-demo-xs")
        for p in ("linear", "knn")
    )
    assert lin.feature_keys == knn.feature_keys
    assert plan.estimated_gflops() > 0
    # the same spec plans the same keys; a changed probe setting changes only that probe's trial keys
    again = build_plan(parse_spec(tiny_spec_dict(tmp_path)), tmp_path)
    assert [c.trial_key for c in again.cells] == [c.trial_key for c in plan.cells]
    raw = tiny_spec_dict(tmp_path)
    raw["probes"][1]["ks"] = [5]
    changed = build_plan(parse_spec(raw), tmp_path)
    for a, b in zip(plan.cells, changed.cells):
        assert (a.trial_key == b.trial_key) == (a.probe == "linear")


def test_cache_status_follows_the_store(tmp_path, tiny_spec):
    import numpy as np

    plan = build_plan(tiny_spec, tmp_path)
    fs = plan.missing[0]
    FeatureStore(plan.storage / "features").put(
        fs.key, np.zeros((fs.n_images, 4)), [str(i) for i in range(fs.n_images)]
    )
    replanned = build_plan(tiny_spec, tmp_path)
    assert len(replanned.missing) == 11
    assert [f for f in replanned.feature_sets if f.cached][0].key == fs.key


def test_paper_profile_plans_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSCALE_DATA", str(tmp_path / "no-data-here"))
    plan = build_plan(load_spec(ROOT / "sweeps/xray.yaml"), tmp_path)
    assert len(plan.cells) == 3 * 4 * 2 * 3
    assert plan.dataset is None and "Data_Entry_2017.csv" in plan.dataset_error
    assert {f.backbone.n_params for f in plan.feature_sets} == {21_586_944, 85_641_216, 303_079_424}
    # without data the cost comes from NIH-14's published size (112,120 images), labelled as such
    vitl_512 = 2 * 303_079_424 * (5 + 32 * 32) * 112_120 / 1e9
    assert vitl_512 < plan.estimated_gflops() < 12 * vitl_512


def test_cli_plan_prints_the_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DINOSCALE_DATA", raising=False)
    res = CliRunner().invoke(app, ["plan", str(ROOT / "sweeps/xray.yaml")])
    assert res.exit_code == 0, res.output
    assert "72 cells" in res.output and "Data not available" in res.output
    assert "from the published dataset size" in res.output and "GPU-h" in res.output and "spot" in res.output
    assert "DINOSCALE_DATA not set" in res.output
    assert "dinov3-vitl16" in res.output


def test_any_timm_model_by_name_with_measured_facts(tmp_path):
    import pytest

    raw = tiny_spec_dict(tmp_path, backbones=[{"name": "timm:vit_small_patch14_dinov2"}], resolutions=[56])
    plan = build_plan(parse_spec(raw), tmp_path)
    bb = plan.cells[0].backbone
    assert bb.n_params > 20e6 and bb.patch_size == 14 and bb.num_prefix_tokens == 1
    assert plan.feature_sets[0].tokens_per_image == 1 + 16
    assert plan.feature_sets[0].gflops > 0
    # CLS features from a CNN (no CLS token) fail at plan time, before anything runs
    raw = tiny_spec_dict(tmp_path, backbones=[{"name": "timm:convnext_atto"}], features={"tokens": "cls"})
    with pytest.raises(Exception, match="(?i)cls"):
        build_plan(parse_spec(raw), tmp_path)


def test_cells_run_cheapest_first_one_replicate_before_the_next(tmp_path):
    """A sweep stopped halfway has whole curves (issue 28): every seed-0 cell before any seed-1 cell, frozen before
    the training strategies, the smaller forward pass first; `resources.cell_order: grid` keeps the spec's order."""

    d = tiny_spec_dict(tmp_path, seeds=[0, 1])
    cells = build_plan(parse_spec(d), tmp_path).cells
    seeds = [c.seed for c in cells]
    assert seeds == sorted(seeds)
    first = [c.gflops_per_image for c in cells if c.seed == 0]
    assert first == sorted(first) and first[0] < first[-1]
    d["resources"] = {**d.get("resources", {}), "cell_order": "grid"}
    grid = build_plan(parse_spec(d), tmp_path).cells
    assert [c.seed for c in grid[:4]] == [0, 0, 1, 1]  # backbone, resolution, strategy, seed, probe
    assert sorted(c.id for c in grid) == sorted(c.id for c in cells)
