"""The strategy registry (``dinoscale.strategies``): each adaptation strategy declared in one place, and a
strategy written in one file swept end to end (spec, plan, Ray Tune, MLflow, report)."""

import sys
from pathlib import Path

import pytest

from conftest import tiny_spec_dict
from dinoscale import record
from dinoscale.search import finetune_configurations, searched_names
from dinoscale.spec import SpecError, parse_spec
from dinoscale.strategies import get_strategy, registry, strategy_kinds, training_kinds

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_strategies_are_registered_and_their_search_space_is_read_from_their_spec():
    assert strategy_kinds() == ["frozen", "full", "lora"] and training_kinds() == ["full", "lora"]
    assert not get_strategy("frozen").trains_encoder
    # what the search samples and how: the scale comes from each space field's type, the record's name from
    # the strategy (the lora_ prefix its FinetuneConfig fields and MLflow params have always carried)
    assert get_strategy("lora").space() == {
        "lr": ("lr", "log"),
        "weight_decay": ("weight_decay", "log"),
        "warmup_epochs": ("warmup_epochs", "linear"),
        "rank": ("lora_rank", "choice"),
        "alpha": ("lora_alpha", "choice"),
        "dropout": ("lora_dropout", "linear"),
    }
    assert searched_names("full") == ["lr", "weight_decay", "layer_decay", "warmup_epochs"]


def test_the_spec_takes_its_strategy_list_and_settings_from_the_registry(tmp_path):
    spec = parse_spec(tiny_spec_dict(tmp_path, strategies=["frozen", "lora"], finetuning={"lora": {"rank": 4}}))
    assert spec.finetuning.of("lora").rank == 4 and spec.finetuning.of("full").lr == 1e-4  # defaults filled in
    with pytest.raises(SpecError, match=r"strategies.0: unknown strategy 'lorra' \(did you mean 'lora'\?\)"):
        parse_spec(tiny_spec_dict(tmp_path, strategies=["lorra"]))
    with pytest.raises(SpecError, match=r"finetuning.fulll: unknown strategy 'fulll' \(did you mean 'full'\?\)"):
        parse_spec(tiny_spec_dict(tmp_path, finetuning={"fulll": {}}))


def test_a_strategy_missing_what_the_loop_reads_is_refused_at_registration():
    from typing import Literal

    from pydantic import Field

    from dinoscale.strategies import LogRange, SearchSpaceBase, StrategyDef, StrategySpecBase, register_strategy

    class Space(SearchSpaceBase):
        lr: LogRange = (1e-3, 1e-2)

    class Spec(StrategySpecBase):
        kind: Literal["half"] = "half"
        space: Space = Field(default_factory=Space)

    with pytest.raises(TypeError, match=r"lacks \['epochs', 'batch_size', 'grad_checkpointing', 'budget'\]"):
        register_strategy(StrategyDef("half", Spec, prepare=lambda backbone, cfg: backbone))
    assert "half" not in registry._STRATEGIES


# A throw-away strategy: train the last ``blocks`` transformer blocks (and the final norm) under the head.
# Its own setting (``blocks``) is searched as a choice; everything else is the registry's.
THROWAWAY_STRATEGY = """
from typing import Literal

from pydantic import Field

from dinoscale.strategies import IntChoices, LogRange, SearchSpaceBase, StrategyDef, TrainingSpecBase, register_strategy


class LastKSpace(SearchSpaceBase):
    lr: LogRange = (1e-3, 1e-2)
    blocks: IntChoices = Field(default_factory=lambda: [1, 2])


class LastKSpec(TrainingSpecBase):
    kind: Literal["lastk"] = "lastk"
    blocks: int = Field(1, ge=1, description="the last blocks trained")
    space: LastKSpace = Field(default_factory=LastKSpace)


def prepare(backbone, cfg):
    n = len(backbone.blocks)
    trained = tuple(f"blocks.{i}." for i in range(n - cfg.options["blocks"], n)) + ("norm.",)
    for name, p in backbone.named_parameters():
        p.requires_grad = name.startswith(trained)
    return backbone


def trained_params(spec, facts):
    return max([spec.blocks, *spec.space.blocks]) * facts.n_params // facts.n_blocks


register_strategy(StrategyDef("lastk", LastKSpec, prepare=prepare, trained_params=trained_params))
"""


def _expected_trainable(blocks: int, n_out: int) -> int:
    """Parameters of the last ``blocks`` blocks, the final norm and a linear head on CLS ⊕ mean patch."""
    from dinoscale.models import load_backbone

    model = load_backbone("dinov3-demo-xs", "random", 0).model
    n = len(model.blocks)
    trained = tuple(f"blocks.{i}." for i in range(n - blocks, n)) + ("norm.",)
    own = sum(p.numel() for name, p in model.named_parameters() if name.startswith(trained))
    return own + 2 * model.num_features * n_out + n_out


@pytest.mark.slow
def test_a_strategy_added_from_one_file_runs_in_a_sweep(tmp_path, monkeypatch):
    """The whole cost of a new strategy: one module (found through DINOSCALE_PLUGINS here; inside the package,
    by being in dinoscale/strategies/). The spec validates it and its settings, the plan samples its space and
    sizes its memory, Ray Tune trains its configurations, MLflow records them, the analysis reports the cell."""
    import ray
    from mlflow.tracking import MlflowClient

    from dinoscale.sweep.plan import build_plan
    from dinoscale.sweep.runner import run_sweep

    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "throwaway_lastk.py").write_text(THROWAWAY_STRATEGY)
    # Ray workers inherit the driver's environment: both variables reach the trials that import the strategy
    monkeypatch.setenv("PYTHONPATH", f"{plugin_dir}:{ROOT}")
    monkeypatch.setenv("DINOSCALE_PLUGINS", "throwaway_lastk")
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setattr(registry, "_LOADED", False)  # discover again, now with the plugin
    ray.shutdown()  # a fresh embedded Ray, started with the variables above
    raw = tiny_spec_dict(
        tmp_path,
        strategies=["lastk"],
        probes=[{"kind": "linear"}],
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32],
        finetuning={"lastk": {"epochs": 2, "batch_size": 16, "budget": 2, "warmup_epochs": 0, "patience": None}},
    )
    try:
        spec = parse_spec(raw)
        configs = finetune_configurations(spec.finetuning.of("lastk").model_dump(mode="json"), 2, 0)
        n_out = len(build_plan(spec, tmp_path, require_data=True).dataset.classes)
        out = run_sweep(spec, project_dir=tmp_path, quiet=True)
    finally:
        ray.shutdown()
        monkeypatch.undo()
        registry._STRATEGIES.pop("lastk", None)
        sys.modules.pop("throwaway_lastk", None)
    assert configs[0]["blocks"] == 1 and configs[1]["blocks"] in (1, 2)  # its own setting, searched
    (row,) = out.rows
    assert (row["strategy"], row["probe"], row["state"]) == ("lastk", "linear", "FINISHED")
    assert 0 <= row["metric_ci_low"] <= row["metric"] <= row["metric_ci_high"] <= 1
    run = MlflowClient(out.tracking_uri).get_run(row["mlflow_run_id"])
    assert run.data.params["strategy"] == "lastk" and run.data.params["lastk.space.blocks"] == "[1, 2]"
    assert run.data.metrics["search_configurations"] == 2
    # the selected configuration trained exactly what its strategy's prepare made trainable
    chosen = configs[int(run.data.tags[record.SELECTED_CONFIGURATION])]
    assert run.data.metrics["trainable_params"] == _expected_trainable(chosen["blocks"], n_out)
    assert (out.report_dir / "report.md").is_file()


def test_a_strategy_that_trains_no_head_of_the_task_is_refused_before_anything_runs(tmp_path):
    from typing import Literal

    from pydantic import Field

    from dinoscale.strategies import LogRange, SearchSpaceBase, StrategyDef, TrainingSpecBase, register_strategy
    from dinoscale.sweep.plan import NotRunnableError, build_plan, check_runnable

    class Space(SearchSpaceBase):
        lr: LogRange = (1e-3, 1e-2)

    class Spec(TrainingSpecBase):
        kind: Literal["segonly"] = "segonly"
        space: Space = Field(default_factory=Space)

    register_strategy(StrategyDef("segonly", Spec, prepare=lambda backbone, cfg: backbone, heads=("segmentation",)))
    try:
        raw = tiny_spec_dict(
            tmp_path,
            strategies=["segonly"],
            backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
            resolutions=[32],
        )
        plan = build_plan(parse_spec(raw), tmp_path, require_data=True)
        assert plan.cells == []
        with pytest.raises(
            NotRunnableError, match=r"strategies \['segonly'\] train under heads \[\['segmentation'\]\]"
        ):
            check_runnable(plan)
    finally:
        registry._STRATEGIES.pop("segonly", None)
