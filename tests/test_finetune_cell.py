"""A lora / full cell as plain functions, without Ray or MLflow: its search, selection on val and test scoring."""

import pytest

from conftest import tiny_spec_dict
from dinoscale.spec import parse_spec
from dinoscale.sweep.finetune import configuration_dir, evaluate_finetune_cell
from dinoscale.sweep.plan import build_plan
from dinoscale.sweep.trial import SweepContext
from dinoscale.train import checkpoint_summary


def test_a_lora_cell_selects_its_best_configuration_on_val_and_scores_test(tmp_path):
    raw = tiny_spec_dict(
        tmp_path,
        strategies=["lora"],
        resolutions=[32],
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        probes=[{"kind": "linear"}],
        search={"n_trials": 2},
    )
    raw["finetuning"] = {"lora": {"epochs": 1, "batch_size": 16, "rank": 4}}
    plan = build_plan(parse_spec(raw), tmp_path, require_data=True)
    (cell,) = plan.cells
    ds = plan.dataset
    ctx = SweepContext(
        cells={cell.id: cell},
        classes=ds.classes,
        splits={s: ds.units(s) for s in ("train", "val", "test")},
        store_root=str(tmp_path / "features"),
        tracking_uri="",
        experiment_id="",
        parent_run_id="",
    )
    root = str(tmp_path / "checkpoints")
    out = evaluate_finetune_cell(cell, ctx, checkpoint_root=root)
    best = {k: checkpoint_summary(configuration_dir(root, cell, k))["best_val"] for k in range(2)}
    chosen = out["selected"]["configuration"]
    assert best[chosen] == max(best.values())
    m = out["metrics"]
    assert m["val_macro_auroc"] == pytest.approx(best[chosen], abs=1e-6)  # rescored from its best weights
    assert m["test_macro_auroc_ci_low"] <= m["test_macro_auroc"] <= m["test_macro_auroc_ci_high"]
    assert m["search_configurations"] == 2 and m["configuration_epochs"] == 2
    assert out["selected"]["lr"] == cell.configurations[chosen]["lr"]
    assert len(out["predictions"]) == len(ds.units("test").sample_ids)
