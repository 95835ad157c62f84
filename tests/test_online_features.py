"""Online features: a patch-grid probe whose cache would be absurd runs the frozen backbone inside the head's
training loop; the plan chooses it over a budget (or the spec forces it) and nothing is extracted for it."""

import numpy as np
import pytest

from dinoscale.spec import parse_spec
from dinoscale.sweep.plan import build_plan


def _raw(tmp, **features):
    return {
        "name": "mri-online",
        "modality": "mri",
        "profile": "demo",
        "dataset": {
            "name": "phantom-mri",
            "phantom": {"seed": 0, "n_patients": 12, "images_per_patient": [1, 1], "image_size": 64, "depth": 8},
            "split": {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0},
        },
        "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
        "resolutions": [64],
        "probes": [{"kind": "segmentation", "head": "conv", "n_classes": 4, "steps": 6, "batch_size": 2, "crop": 32}],
        "features": {"tokens": "patch_grid", "dtype": "float16", "batch_size": 8, **features},
        "metrics": {"bootstrap": {"resamples": 50}},
        "tracking": {"uri": f"sqlite:///{tmp}/mlruns.db"},
        "storage": {"path": f"{tmp}/store"},
        "ray": {"num_cpus": 2},
    }


def _context(plan):
    from dinoscale.sweep.trial import SweepContext

    ds = plan.dataset
    return SweepContext(
        {c.id: c for c in plan.cells},
        ds.classes,
        {s: ds.units(s) for s in ("train", "val", "test")},
        str(plan.storage / "features"),
        "",
        "",
        "",
        mask_labels=dict(ds.mask_labels),
        sources={s: ds.sources(s) for s in ("train", "val", "test")},
    )


def test_the_plan_chooses_online_features_over_the_cache_budget(tmp_path):
    cached = build_plan(parse_spec(_raw(tmp_path)), tmp_path)
    grid_bytes = sum(f.nbytes for f in cached.feature_sets)
    assert len(cached.missing) == 3 and not any(c.online for c in cached.cells)
    over = build_plan(parse_spec(_raw(tmp_path, cache_budget_gb=grid_bytes / 2 / 2**30)), tmp_path)
    assert over.missing == [] and all(f.online for f in over.feature_sets)
    assert all(c.online and c.feature_keys == () for c in over.cells)
    assert over.cells[0].trial_key != cached.cells[0].trial_key  # online results are recorded apart
    under = build_plan(parse_spec(_raw(tmp_path, cache_budget_gb=grid_bytes * 2 / 2**30)), tmp_path)
    assert len(under.missing) == 3
    forced = build_plan(parse_spec(_raw(tmp_path, online=True)), tmp_path)
    assert forced.missing == [] and forced.cells[0].trial_key == over.cells[0].trial_key


def test_online_features_score_like_cached_ones(tmp_path):
    from dinoscale.features import FeatureStore
    from dinoscale.sweep.extraction import plan_jobs, run_job
    from dinoscale.sweep.trial import evaluate_cell

    cached = build_plan(parse_spec(_raw(tmp_path)), tmp_path)
    for job in plan_jobs(cached):
        run_job(job, str(cached.storage / "features"))
    a = evaluate_cell(cached.cells[0], _context(cached))["metrics"]

    online = build_plan(parse_spec(_raw(tmp_path, online=True)), tmp_path)
    n_entries = len(FeatureStore(online.storage / "features").entries())
    b = evaluate_cell(online.cells[0], _context(online))["metrics"]
    assert len(FeatureStore(online.storage / "features").entries()) == n_entries  # nothing was cached
    assert b["features_online"] == 1 and a["features_online"] == 0
    # the same forward passes, rounded to the store's dtype: the same training and the same test Dice
    assert b["val_dice"] == pytest.approx(a["val_dice"], abs=1e-6)
    assert b["test_dice"] == pytest.approx(a["test_dice"], abs=1e-6)
    assert np.isfinite(b["test_dice"])


@pytest.mark.slow
def test_an_online_sweep_extracts_nothing_and_finishes(tmp_path, ray_local):
    from dinoscale.features import FeatureStore
    from dinoscale.sweep.runner import run_sweep

    out = run_sweep(parse_spec(_raw(tmp_path, online=True)), project_dir=tmp_path, quiet=True, analyze=False)
    assert [r["state"] for r in out.rows] == ["FINISHED"]
    assert out.extraction.feature_sets_extracted == 0 and out.extraction.images == 0
    assert FeatureStore(tmp_path / "store" / "features").entries() == []
