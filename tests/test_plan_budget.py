"""The plan as a budget: every paper spec plans real work from its dataset's published size, and the plan says
it in the units a lab signs off (wall-clock on a named cluster, GPU-hours, dollars, bytes)."""

from pathlib import Path

import pytest

from dinoscale.spec import load_spec
from dinoscale.sweep.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
PAPER_SPECS = sorted(p for p in (ROOT / "sweeps").glob("*.yaml") if load_spec(p).profile == "paper")


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSCALE_DATA", str(tmp_path / "no-data-here"))
    return tmp_path


@pytest.mark.parametrize("path", PAPER_SPECS, ids=lambda p: p.stem)
def test_no_paper_spec_plans_zero_work(path, no_data):
    plan = build_plan(load_spec(path), no_data)
    assert plan.dataset is None and plan.published is not None, "no published size: the plan would count nothing"
    assert plan.forward_passes() > 0 and plan.estimated_gflops() > 0
    assert sum(f.nbytes for f in plan.feature_sets if not f.online) > 0


def test_medmnist_sizes_are_the_published_counts_at_each_size(no_data):
    from dinoscale.data import published_size

    assert published_size("medmnist", "pneumoniamnist_224").units == 5_856
    assert published_size("medmnist", "chestmnist").pixels == (28, 28)
    vol = published_size("medmnist", "organmnist3d_64")
    assert (vol.units, vol.unit, vol.per_unit) == (1_742, "volume", 64)
    assert "MedMNIST" in vol.source
    plan = build_plan(load_spec(ROOT / "sweeps/medmnist-3d.yaml"), no_data)
    assert plan.forward_passes() == 1_742 * 64 * 3  # 3 backbones x 1 resolution, every slice of every volume
