"""Early stopping of lora / full configurations: ASHA inside each cell (``dinoscale.sweep.schedule``)."""

import pickle
from types import SimpleNamespace

import numpy as np
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from dinoscale import record
from dinoscale.sweep.cell import unit_id
from dinoscale.sweep.schedule import CellSuccessiveHalving, read_state, rungs

CONT, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _trial(cell: str, k: int):
    """What the scheduler reads of a Tune trial: its id and its config."""
    return SimpleNamespace(trial_id=f"{cell}-{k}", config={"unit": unit_id(cell, k)})


def _result(epoch: int, value: float) -> dict:
    return {record.EPOCH: epoch, record.SELECTION_VALUE: value}


def test_rungs_sit_below_the_last_epoch():
    assert rungs(10, 1, 3) == [1, 3, 9]
    assert rungs(9, 1, 3) == [1, 3]  # a rung at the last epoch would only relabel finished runs as stopped
    assert rungs(8, 2, 2) == [2, 4]
    assert rungs(1, 1, 2) == []


def test_decisions_match_rays_asha_within_one_cell():
    """Random asynchronous results of 12 configurations (random epochs reached, random arrival order):
    every decision equals Ray Tune's AsyncHyperBandScheduler with one bracket and stop_last_trials=False."""
    rng = np.random.default_rng(0)
    for rf, grace, max_t in ((2, 1, 8), (3, 1, 12), (4, 2, 20)):
        ours = CellSuccessiveHalving({"c": max_t}, grace, rf)
        ray = AsyncHyperBandScheduler(
            time_attr=record.EPOCH,
            metric=record.SELECTION_VALUE,
            mode="max",
            max_t=max_t,
            grace_period=grace,
            reduction_factor=rf,
            brackets=1,
            stop_last_trials=False,
        )
        trials = [_trial("c", k) for k in range(12)]
        for t in trials:
            ray.on_trial_add(None, t)
        epoch = {t.trial_id: 0 for t in trials}
        live = list(trials)
        decisions = 0
        while live:
            t = live[rng.integers(len(live))]
            epoch[t.trial_id] += 1
            res = _result(epoch[t.trial_id], float(rng.normal()))
            a, b = ours.on_trial_result(None, t, res), ray.on_trial_result(None, t, res)
            if epoch[t.trial_id] < max_t:  # Ray's own rung at max_t is left out on purpose (see test above)
                assert a == b, (rf, t.trial_id, res)
                decisions += 1
            if a == STOP or epoch[t.trial_id] >= max_t:
                live.remove(t)
        assert decisions >= 20
        assert sum(1 for v in ours._load()["stopped"].get("c", {}).values()) > 0  # it did stop some


def test_cells_are_compared_only_with_themselves_and_frozen_cells_pass_through():
    s = CellSuccessiveHalving({"weak": 6, "strong": 6}, grace_epochs=1, reduction_factor=2)
    assert s.on_trial_result(None, _trial("strong", 0), _result(1, 0.95)) == CONT
    # the weak cell's first configuration is not compared with the strong cell's
    assert s.on_trial_result(None, _trial("weak", 0), _result(1, 0.55)) == CONT
    assert s.on_trial_result(None, _trial("weak", 1), _result(1, 0.50)) == STOP
    assert s.on_trial_result(None, _trial("weak", 2), _result(1, 0.60)) == CONT
    frozen = SimpleNamespace(trial_id="f", config={"unit": "some_frozen_cell"})
    assert s.on_trial_result(None, frozen, _result(1, -1.0)) == CONT
    assert s.stopped_at("weak", 1) == 1 and s.stopped_at("weak", 0) is None
    # a non-finite val metric ranks below everything
    assert s.on_trial_result(None, _trial("weak", 3), _result(1, float("nan"))) == STOP


def test_state_survives_the_driver_and_a_pickled_copy_reads_it_back(tmp_path):
    path = str(tmp_path / "schedule.json")
    a = CellSuccessiveHalving({"c": 6}, 1, 2, state_path=path)
    assert a.on_trial_result(None, _trial("c", 0), _result(1, 0.8)) == CONT
    assert a.on_trial_result(None, _trial("c", 1), _result(1, 0.7)) == STOP
    copy = pickle.loads(pickle.dumps(a))  # as Tune keeps it in tuner.pkl; the rungs come from the file
    assert copy._state is None
    assert copy.stopped_at("c", 1) == 1
    # configuration 2 is compared with the rung recorded before the "restart"
    assert copy.on_trial_result(None, _trial("c", 2), _result(1, 0.6)) == STOP
    # a stopped configuration that reports again (a retried trial) is stopped again
    assert copy.on_trial_result(None, _trial("c", 1), _result(2, 0.99)) == STOP
    # a result of configuration 0 at a later epoch of the same rung changes nothing
    assert copy.on_trial_result(None, _trial("c", 0), _result(1, 0.1)) == CONT
    fresh = CellSuccessiveHalving({"c": 6}, 1, 2, state_path=path)
    assert read_state(path)["stopped"] == {"c": {"1": 1, "2": 1}} == fresh._load()["stopped"]


def test_disabled_lets_every_configuration_run_to_its_end():
    s = CellSuccessiveHalving({"c": 6}, 1, 2, enabled=False)
    for k, v in enumerate([0.9, 0.1, 0.0]):
        assert s.on_trial_result(None, _trial("c", k), _result(1, v)) == CONT
