"""The plan's GPU-memory estimate of a training trial (``dinoscale.train.memory``) and what it decides."""

import pytest
import torch

from conftest import tiny_spec_dict
from dinoscale.models import load_backbone
from dinoscale.spec import parse_spec
from dinoscale.strategies import get_strategy
from dinoscale.sweep.plan import NotRunnableError, build_plan, check_runnable
from dinoscale.train.lora import apply_lora
from dinoscale.train.memory import GIB, activation_facts, estimate_bytes, fit_in_memory, strategy_facts


def _saved_bytes_per_image(name: str, res: int, strategy: str) -> float:
    """What autograd really keeps for backward on the CPU: batch of 2 minus batch of 1 (weights cancel)."""
    model = load_backbone(name, "random", 0).model
    if strategy == "lora":
        model = apply_lora(model, 4)
    model.train()

    def saved(batch: int) -> int:
        storages = {}

        def pack(t):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.forward_features(torch.randn(batch, 3, res, res))
        return sum(storages.values())

    return saved(2) - saved(1)


@pytest.mark.parametrize("strategy", ["full", "lora"])
@pytest.mark.parametrize("name, res", [("dinov3-demo-xs", 64), ("dinov3-demo-s", 128)])
def test_activation_bytes_measured_on_the_meta_device_match_a_real_forward(name, res, strategy):
    estimate = strategy_facts(get_strategy(strategy).spec(), name, res)[0].bytes_per_image  # lora: qkv, proj
    assert estimate == pytest.approx(_saved_bytes_per_image(name, res, strategy), rel=0.05)


def test_checkpointing_then_micro_batches_are_chosen_before_giving_up():
    facts = activation_facts("dinov3-vitb16", 512)  # every weight gets gradients (full)

    def est(micro, ckpt):
        return estimate_bytes(facts, micro, 1, ckpt, trainable=facts.n_params)

    plain, ckpt = est(64, False), est(64, True)
    assert ckpt < plain and est(32, True) < ckpt
    assert fit_in_memory(est, 64, plain + 1) == fit_in_memory(est, 64, 1e15)  # fits as asked
    m = fit_in_memory(est, 64, (plain + ckpt) / 2)
    assert (m.grad_checkpointing, m.micro_batch_size, m.fits) == (True, 64, True)
    m = fit_in_memory(est, 64, est(16, True) + 1)
    assert (m.grad_checkpointing, m.micro_batch_size, m.fits) == (True, 16, True)
    assert not fit_in_memory(est, 64, est(1, True) - 1).fits
    # a volume of 40 slices costs 40 images of activations
    assert estimate_bytes(facts, 2, 40) - estimate_bytes(facts, 2, 1) == pytest.approx(
        2 * 39 * facts.bytes_per_image * 0.5 * 1.15
    )


def test_the_plan_fits_training_trials_into_the_stated_gpu_memory(tmp_path):
    def plan(gib):
        raw = tiny_spec_dict(
            tmp_path,
            strategies=["lora", "full"],
            resolutions=[64],
            backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
            resources={"gpu_memory_gib": gib},
        )
        raw["search"] = {"n_trials": 3}
        return build_plan(parse_spec(raw), tmp_path)

    roomy = plan(80)
    for c in roomy.cells:
        assert len(c.configurations) == 3 and c.params["search.budget"] == 3
        assert all(not cfg["grad_checkpointing"] and cfg["micro_batch_size"] == 32 for cfg in c.configurations)
    full = next(c for c in roomy.cells if c.strategy == "full")
    need = full.params["train.est_gpu_gib"]
    assert 1.0 < need < 1.2  # 1 GiB of CUDA context + a tiny model
    decisions = []  # as the GPU shrinks: checkpointing first, then smaller micro-batches, then refused
    for frac in (1.01, 0.8, 0.7, 0.6, 0.5, 0.45):
        budget = 1.0 + (need - 1.0) * frac
        c = next(c for c in plan(budget).cells if c.strategy == "full")
        cfg = c.configurations[0]
        fits = c.params["train.fits_gpu_memory"]
        assert not fits or c.params["train.est_gpu_gib"] <= budget + 1e-3
        decisions.append((cfg["grad_checkpointing"], cfg["micro_batch_size"], fits))
    assert decisions[0] == (False, 32, True)
    assert (True, 32, True) in decisions and any(ck and m < 32 and ok for ck, m, ok in decisions)
    micro = [m for _, m, ok in decisions if ok]
    assert micro == sorted(micro, reverse=True)
    with pytest.raises(NotRunnableError, match=r"do not fit in resources.gpu_memory_gib = 0.5 even one sample"):
        check_runnable(plan(0.5))
    assert GIB == 2**30
