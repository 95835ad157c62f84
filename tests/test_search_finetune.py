"""The configurations a lora / full cell searches (``dinoscale.search.finetune_configurations``)."""

import math

import numpy as np
import pytest

from dinoscale.search import finetune_configurations, searched_names
from dinoscale.spec import FullStrategySpec, LoraStrategySpec, SpecError, parse_spec
from dinoscale.train import FinetuneConfig


def _lora(**kw):
    return LoraStrategySpec(**kw).model_dump(mode="json")


def test_configuration_zero_is_the_stated_values_and_the_rest_cover_the_space():
    spec = _lora(lr=2e-3, rank=8, alpha=16, dropout=0.05, epochs=7)
    configs = finetune_configurations(spec, 9, seed=0)
    assert len(configs) == 9
    first = configs[0]
    assert (first["lr"], first["lora_rank"], first["lora_alpha"], first["lora_dropout"]) == (2e-3, 8, 16, 0.05)
    for c in configs:  # every configuration is a valid FinetuneConfig with the fixed settings kept
        cfg = FinetuneConfig(**c)
        assert cfg.strategy == "lora" and cfg.epochs == 7 and cfg.lora_targets == ("qkv", "proj")
    space = spec["space"]
    lrs = np.array([c["lr"] for c in configs[1:]])
    assert ((space["lr"][0] <= lrs) & (lrs <= space["lr"][1])).all()
    # Latin hypercube: the 8 sampled log-learning-rates fall one per eighth of the log range
    u = (np.log(lrs) - math.log(space["lr"][0])) / (math.log(space["lr"][1]) - math.log(space["lr"][0]))
    assert sorted(np.floor(u * 8).astype(int)) == list(range(8))
    assert {c["lora_rank"] for c in configs[1:]} == set(space["rank"])  # every choice drawn
    assert {c["lora_alpha"] for c in configs[1:]} <= set(space["alpha"])
    assert len({c["lr"] for c in configs}) == 9


def test_the_same_spec_budget_and_seed_give_the_same_configurations():
    spec = FullStrategySpec().model_dump(mode="json")
    a, b = finetune_configurations(spec, 5, seed=3), finetune_configurations(spec, 5, seed=3)
    assert a == b
    assert finetune_configurations(spec, 5, seed=4)[1:] != a[1:]  # the seed is used
    assert finetune_configurations(spec, 1, seed=3) == a[:1]  # budget 1: the stated values only
    assert {k for c in a[1:] for k in c if c[k] != a[0][k]} <= set(searched_names("full"))


def test_a_range_with_low_equal_high_fixes_a_hyper_parameter():
    spec = _lora(space={"lr": [5e-4, 5e-4], "rank": [4]})
    configs = finetune_configurations(spec, 4, seed=0)
    assert [c["lr"] for c in configs[1:]] == pytest.approx([5e-4] * 3)
    assert [c["lora_rank"] for c in configs[1:]] == [4, 4, 4]


@pytest.mark.parametrize(
    "finetuning, where",
    [
        ({"lora": {"space": {"lr": [1e-3, 1e-4]}}}, "finetuning.lora.space.lr"),
        ({"full": {"space": {"weight_decay": [0, 0.1]}}}, "finetuning.full.space.weight_decay"),
        ({"lora": {"space": {"rnak": [4]}}}, "finetuning.lora.space.rnak: unknown key 'rnak' (did you mean 'rank'?)"),
        ({"lora": {"budget": 0}}, "finetuning.lora.budget"),
        ({"early_stopping": {"reduction_factor": 1}}, "finetuning.early_stopping.reduction_factor"),
    ],
)
def test_bad_search_settings_name_their_field(tmp_path, finetuning, where):
    from conftest import tiny_spec_dict

    with pytest.raises(SpecError) as e:
        parse_spec(tiny_spec_dict(tmp_path, strategies=["lora"], finetuning=finetuning))
    assert where in str(e.value)
