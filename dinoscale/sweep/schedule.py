"""Early stopping of lora / full configurations: asynchronous successive halving (ASHA) inside each cell.

Every configuration of a cell's search is its own Ray Tune trial holding a whole GPU; it reports its
val metric after every epoch (``record.EPOCH``, ``record.SELECTION_VALUE``). Rungs sit at
``grace_epochs * reduction_factor**k`` epochs, below the cell's last epoch. When a configuration
reaches a rung, it is compared with the configurations *of its own cell* that reached that rung
before it: below the top 1/``reduction_factor`` of them (the ``1 - 1/reduction_factor`` percentile)
it is stopped. Ray Tune then ends the trial's training thread at that report and frees its
resources at once for the next pending trial, of this cell or another. The first configurations to
reach a rung are never stopped (nothing to compare with): the asynchronous variant trades a few
extra epochs for never waiting on stragglers (Li et al., "A System for Massively Parallel
Hyperparameter Tuning", MLSys 2020).

The decision rule is Ray Tune's ``AsyncHyperBandScheduler`` with one bracket and
``stop_last_trials=False`` (tests/test_schedule.py checks it decision for decision). It is written out
here because Ray's scheduler compares every trial of an experiment with every other, while a sweep's
trial stage holds many cells (a ViT-S at 64 px must not be stopped for losing to a ViT-L at 512 px),
and because Ray does not save a scheduler's state with the experiment: this one keeps its rungs and
its stop decisions in a JSON file on the sweep's storage, written before a stop is acted on, so a
resumed sweep continues with the same rungs and a stopped configuration is never trained again.
Frozen cells' trials pass through unscheduled (FIFO).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from dinoscale import record
from dinoscale.sweep.cell import parse_unit

_FLOOR = -1e30  # a non-finite val metric (diverged, undefined) ranks below everything, without NaN percentiles


def rungs(max_epochs: int, grace_epochs: int, reduction_factor: float) -> list[int]:
    """Epoch counts at which configurations are compared, ascending, all below ``max_epochs``."""
    out, k = [], 0
    while True:
        r = math.ceil(grace_epochs * reduction_factor**k - 1e-9)
        if r >= max_epochs:
            return out
        if not out or r > out[-1]:
            out.append(r)
        k += 1


class CellSuccessiveHalving(FIFOScheduler):
    """ASHA per cell over Ray Tune trials whose config names a ``unit`` (``dinoscale.sweep.cell.unit_id``).

    ``max_epochs``: each lora / full cell's epochs per configuration; ``state_path``: the JSON file of
    rungs and stops (None: in memory only); ``enabled=False``: every configuration runs to its end."""

    def __init__(
        self,
        max_epochs: dict[str, int],
        grace_epochs: int = 1,
        reduction_factor: float = 3.0,
        state_path: str | None = None,
        enabled: bool = True,
    ):
        super().__init__()
        self.max_epochs = dict(max_epochs)
        self.grace_epochs, self.reduction_factor = int(grace_epochs), float(reduction_factor)
        self.state_path, self.enabled = state_path, enabled
        self._state: dict | None = None  # {"rungs": {cell: {rung: {k: value}}}, "stopped": {unit: epoch}}

    # Tune pickles its scheduler with the experiment (tuner.pkl): the rungs are not part of that copy, a
    # restored scheduler reads them back from ``state_path``.
    def __getstate__(self):
        return {**self.__dict__, "_state": None}

    # ---------------------------------------------------------------- Tune hooks

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        cell, k = parse_unit(trial.config.get("unit", ""))
        if k is None or not self.enabled or record.EPOCH not in result or record.SELECTION_VALUE not in result:
            return TrialScheduler.CONTINUE
        return self.decide(cell, k, int(result[record.EPOCH]), result[record.SELECTION_VALUE])

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        cell, k = parse_unit(trial.config.get("unit", ""))
        if k is None or not self.enabled or not result or record.EPOCH not in result:
            return
        if record.SELECTION_VALUE in result:  # as Ray's ASHA: a finished trial's last value counts at its rung
            self.decide(cell, k, int(result[record.EPOCH]), result[record.SELECTION_VALUE], record_only=True)

    # ---------------------------------------------------------------- the rule

    def decide(self, cell: str, k: int, epoch: int, value, record_only: bool = False) -> str:
        """CONTINUE or STOP for configuration ``k`` of ``cell`` after ``epoch`` epochs at val ``value``."""
        state = self._load()
        if str(k) in state["stopped"].get(cell, {}):
            return TrialScheduler.STOP
        value = float(value) if value is not None and np.isfinite(value) else _FLOOR
        cell_rungs = state["rungs"].setdefault(cell, {})
        action = TrialScheduler.CONTINUE
        for rung in reversed(rungs(self.max_epochs[cell], self.grace_epochs, self.reduction_factor)):
            if epoch < rung:
                continue
            recorded = cell_rungs.setdefault(str(rung), {})
            if str(k) in recorded:  # decided at this rung already (a later epoch, or a resumed trial)
                break
            if recorded and not record_only:
                cutoff = np.percentile(list(recorded.values()), (1 - 1 / self.reduction_factor) * 100)
                if value < cutoff:
                    action = TrialScheduler.STOP
            recorded[str(k)] = value
            break
        if action == TrialScheduler.STOP:
            state["stopped"].setdefault(cell, {})[str(k)] = epoch
        self._save()
        return action

    def stopped_at(self, cell: str, k: int) -> int | None:
        """The epoch count at which configuration ``k`` of ``cell`` was stopped, or None."""
        return self._load()["stopped"].get(cell, {}).get(str(k))

    # ---------------------------------------------------------------- state on disk

    def _load(self) -> dict:
        if self._state is None:
            self._state = read_state(self.state_path)
        return self._state

    def _save(self) -> None:
        if self.state_path is None:
            return
        path = Path(self.state_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self._state, indent=1, sort_keys=True))
        os.replace(tmp, path)  # a trial reading it sees the old or the new state, never half of one


def read_state(state_path: str | None) -> dict:
    """The scheduler's rungs and stops as last written (empty when there is no file yet)."""
    if state_path is not None and Path(state_path).is_file():
        state = json.loads(Path(state_path).read_text())
        return {"rungs": state.get("rungs", {}), "stopped": state.get("stopped", {})}
    return {"rungs": {}, "stopped": {}}


def stopped_at(state_path: str | None, cell: str, k: int) -> int | None:
    """Read by a configuration's trial when Tune ends it: was it stopped by the scheduler, after how many epochs?"""
    return read_state(state_path)["stopped"].get(cell, {}).get(str(k))
