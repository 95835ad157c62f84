"""A cell's work as a plain function (no Ray): extraction once, then probes on cached features."""

import pytest

from conftest import tiny_spec_dict
from dinoscale.spec import parse_spec
from dinoscale.sweep.extraction import plan_jobs, run_job
from dinoscale.sweep.plan import build_plan
from dinoscale.sweep.trial import SweepContext, evaluate_cell


def _context(spec, plan):
    ds = plan.dataset
    splits = {s: ds.units(s) for s in ("train", "val", "test")}
    return SweepContext(
        {c.id: c for c in plan.cells},
        ds.classes,
        splits,
        str(plan.storage / "features"),
        tracking_uri="",
        experiment_id="",
        parent_run_id="",
    )


@pytest.fixture
def extracted(tmp_path):
    raw = tiny_spec_dict(tmp_path, resolutions=[32], backbones=[{"name": "dinov3-demo-xs", "weights": "random"}])
    raw["search"] = {"n_trials": 3, "seed": 0}
    spec = parse_spec(raw)
    plan = build_plan(spec, tmp_path)
    for job in plan_jobs(plan):
        run_job(job, str(plan.storage / "features"))
    return spec, build_plan(spec, tmp_path)


def test_extraction_fills_the_store_then_cells_only_read_it(extracted):
    spec, plan = extracted
    assert plan.missing == []  # 3 splits extracted once, shared by both probes
    ctx = _context(spec, plan)
    outs = {c.probe: evaluate_cell(c, ctx) for c in plan.cells}
    for out in outs.values():
        m = out["metrics"]
        assert m["test_macro_auroc_ci_low"] <= m["test_macro_auroc"] <= m["test_macro_auroc_ci_high"]
        assert m["search_trials"] == 3 and m["feature_dim"] == 2 * 96
        assert len(out["predictions"]) == m["n_test"]
        assert set(out["predictions"].patient_id) <= set(ctx.splits["test"].patient_ids)
    # the Optuna budget searched the probe's space on top of its own grid
    assert {"epochs", "batch_size", "lr", "weight_decay"} <= set(outs["linear"]["selected"])
    assert {"temperature", "k"} <= set(outs["knn"]["selected"])


def test_search_is_seeded(extracted):
    spec, plan = extracted
    ctx = _context(spec, plan)
    cell = next(c for c in plan.cells if c.probe == "knn")
    assert evaluate_cell(cell, ctx)["selected"] == evaluate_cell(cell, ctx)["selected"]
