"""``search_finetune``: the per-cell Optuna search for LoRA / full cells, on the demo-ladder backbone
(``dinov3-demo-xs``, random weights, 32 x 32 images, CPU; a few seconds per trial)."""

import copy
from collections import defaultdict

import numpy as np
import optuna
import pytest

from dinoscale.metrics import macro_auroc
from dinoscale.models import load_backbone
from dinoscale.search import finetune_space, search_finetune
from dinoscale.train import FinetuneConfig, build_classifier, predict
from test_train_strategies import _data  # the same two-label toy images

pytestmark = pytest.mark.slow  # several short fine-tuning trials per test: ~30 s for the file on 2 shared CPU cores


TRAIN, VAL = _data(24, 0), _data(12, 1)
_BACKBONE = []


@pytest.fixture(autouse=True, scope="module")
def _backbone():
    _BACKBONE.append(load_backbone("dinov3-demo-xs", "random", seed=0).model)
    yield
    _BACKBONE.clear()


def _make_model(cfg):
    """The backbone is loaded once and copied per trial, as a cell would; the head's and adapters' init
    come from torch's global generator, so the search must seed it for trials to be reproducible."""
    return build_classifier(copy.deepcopy(_BACKBONE[0]), 2, cfg)


def _search(n_trials, seed=0, epochs=2, storage_dir=None, space=None, on_epoch=None, strategy="lora"):
    cfg = FinetuneConfig(strategy, epochs=epochs, warmup_epochs=0, batch_size=8, patience=None)
    return search_finetune(
        _make_model,
        TRAIN,
        VAL,
        cfg,
        n_trials=n_trials,
        seed=seed,
        space=space,
        storage_dir=storage_dir,
        device="cpu",
        on_epoch=on_epoch,
    )


def _recorder():
    calls = defaultdict(list)  # trial number -> epochs it trained in this call

    def on_epoch(number, epoch, record):
        calls[number].append(epoch)

    return calls, on_epoch


def test_search_runs_the_budget_and_returns_the_best_completed_trial_reproducibly():
    calls, on_epoch = _recorder()
    best, study = _search(3, seed=0, on_epoch=on_epoch)
    assert len(study.trials) == 3 and study.n_complete + study.n_pruned == 3 and study.n_complete >= 2
    lrs = [t["params"]["lr"] for t in study.trials]
    assert len(set(lrs)) == 3 and all(1e-5 <= lr <= 1e-3 for lr in lrs)
    assert all(t["params"]["lora_rank"] in (4, 8, 16) for t in study.trials)
    assert sorted(calls) == [0, 1, 2]
    done = [t for t in study.trials if t["state"] == "COMPLETE"]
    top = max(done, key=lambda t: t["value"])
    assert study.best_value == top["value"] and study.best_trial == top["number"] and study.best_params == top["params"]
    assert all(0 <= t["value"] <= 1 for t in done)
    # the returned model holds the best trial's best-val weights
    assert best.best_val == pytest.approx(study.best_value)
    assert macro_auroc(VAL.tensors[1].numpy(), predict(best.model, VAL)) == pytest.approx(study.best_value, abs=1e-6)

    again, study2 = _search(3, seed=0)  # same seed, same process: same trials, same values
    assert [t["params"] for t in study2.trials] == [t["params"] for t in study.trials]
    assert [t["value"] for t in study2.trials] == pytest.approx([t["value"] for t in study.trials], abs=1e-6)
    assert [t["state"] for t in study2.trials] == [t["state"] for t in study.trials]
    np.testing.assert_allclose(predict(again.model, VAL), predict(best.model, VAL), atol=1e-5)

    _, other = _search(1, seed=1)  # the seed is used
    assert other.trials[0]["params"]["lr"] != lrs[0]


def test_median_pruner_stops_a_hopeless_trial_early():
    """Trials 0 and 1 learn (lr 2e-3..5e-3); trial 2 has lr 0, so its val metric stays at the init's,
    below both others after their first epoch: the median pruner must stop it at epoch 1 of 3."""

    def space(trial, cfg):
        out = finetune_space(trial, cfg)
        out["lr"] = trial.suggest_float("lr_good", 2e-3, 5e-3, log=True) * (0.0 if trial.number == 2 else 1.0)
        return out

    calls, on_epoch = _recorder()
    _, study = _search(3, epochs=3, space=space, on_epoch=on_epoch)
    states = [t["state"] for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"] and study.n_pruned == 1 and study.n_complete == 2
    assert calls[0] == calls[1] == [0, 1, 2] and calls[2] == [0, 1]  # stopped after epoch 1, not run to 3
    assert study.best_trial in (0, 1)


class _Crash(Exception):
    pass


def test_resumed_study_keeps_finished_trials_and_continues_an_interrupted_one(tmp_path):
    store = tmp_path / "study"

    def crash_in_trial_1(number, epoch, record):
        calls[number].append(epoch)
        if number == 1 and epoch == 1:
            raise _Crash  # the process dies after trial 1's epoch-1 checkpoint

    calls = defaultdict(list)
    with pytest.raises(_Crash):
        _search(2, epochs=3, storage_dir=store, on_epoch=crash_in_trial_1)
    assert dict(calls) == {0: [0, 1, 2], 1: [0, 1]}

    # retried: trial 0 is not rerun; trial 1 continues from its checkpoint, with its parameters
    calls, on_epoch = _recorder()
    _, study = _search(2, epochs=3, storage_dir=store, on_epoch=on_epoch)
    assert dict(calls) == {2: [2]}
    assert [t["state"] for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2]["params"] == study.trials[1]["params"] and study.n_complete == 2

    # a trial left RUNNING by a killed process is retried with its parameters too
    stale = optuna.load_study(study_name="cell", storage=f"sqlite:///{store.resolve() / 'optuna.db'}").ask()
    stale_params = finetune_space(stale, FinetuneConfig("lora"))
    calls, on_epoch = _recorder()
    _, study3 = _search(3, epochs=3, storage_dir=store, on_epoch=on_epoch)
    assert list(calls) == [4]  # one new trial for the larger budget: the retry of stale trial 3
    assert study3.trials[3]["state"] == "FAIL" and study3.trials[4]["params"] == stale_params
    assert study3.trials[0] == study.trials[0] and study3.trials[2] == study.trials[2]
    assert study3.n_complete + study3.n_pruned == 3

    # nothing left to do: no training, and the best trial's weights come back from its checkpoint
    calls, on_epoch = _recorder()
    best, study4 = _search(3, epochs=3, storage_dir=store, on_epoch=on_epoch)
    assert not calls and study4.trials == study3.trials
    assert best.best_val == pytest.approx(study4.best_value)
    assert macro_auroc(VAL.tensors[1].numpy(), predict(best.model, VAL)) == pytest.approx(study4.best_value, abs=1e-6)
