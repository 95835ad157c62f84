"""Per-cell hyper-parameter search: every cell of a strategy gets the same budget, selection on val only.

- Frozen probes on cached features, ``search_probe(spec, train, val, test, n_trials, seed)``: an Optuna
  study inside the cell's trial (seeded TPE). Each trial overrides some of the probe spec's fields (the
  search space its module declares in its ``ProbeDef``); the probe still does its own vectorised grid
  (e.g. all lr x wd heads) inside a trial.
- LoRA / full (any training strategy), ``finetune_configurations(strategy_spec, budget, seed)``: the
  configurations a cell searches, decided by the plan before anything runs. Configuration 0 is the spec's
  stated values; the others are a Latin hypercube sample of the strategy's ``space``, declared once in its
  spec class (``dinoscale.strategies.<kind>``: each field's type says log-uniform, uniform or a choice).
  Each configuration is its own Ray Tune trial (a whole GPU), stopped early by asynchronous successive
  halving inside its cell (``dinoscale.sweep.schedule``). Why not an Optuna study with a pruner inside
  one trial per cell: its configurations would run one after another on the cell's one GPU, a pruned
  configuration would free that GPU only for the next configuration of the same cell, and idle GPUs
  of the cluster could not take the cell's other configurations. Random sampling is ASHA's usual
  partner (Li et al., 2020): configurations do not depend on each other's results, so they run in
  any order or in parallel, a resumed search continues the same list, and every cell of a strategy
  (at one seed) tries the same configurations, so cells differ by their axes, not by their luck.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import qmc

from dinoscale.probes import get_probe, run_probe
from dinoscale.probes.registry import SpaceFn  # (optuna.Trial, base spec/config) -> field overrides
from dinoscale.strategies.registry import NOT_CONFIGURATION, get_strategy


def stated_configuration(strategy_spec: dict) -> dict:
    """The strategy spec's stated values as ``FinetuneConfig`` keyword arguments (configuration 0), named as
    its strategy says (``StrategyDef.config_names``)."""
    names = get_strategy(strategy_spec["kind"]).config_names
    out = {"strategy": strategy_spec["kind"]}
    for k, v in strategy_spec.items():
        if k not in NOT_CONFIGURATION:
            out[names.get(k, k)] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def finetune_configurations(strategy_spec: dict, budget: int, seed: int) -> list[dict]:
    """``budget`` configurations (``FinetuneConfig`` keyword arguments) for one cell: the stated values,
    then ``budget - 1`` points of a Latin hypercube over the searched hyper-parameters (scipy's, seeded:
    each range is cut into ``budget - 1`` strata and every stratum is sampled once). ``strategy_spec``:
    a dumped strategy spec (``finetuning.<kind>``); what is searched and how is its ``space``, the scale
    of each field read from its type (``dinoscale.strategies.registry``). The same (spec, budget, seed)
    give the same list."""
    base = stated_configuration(strategy_spec)
    searched = get_strategy(strategy_spec["kind"]).space()
    space = strategy_spec["space"]
    out = [dict(base)]
    n = budget - 1
    if n <= 0:
        return out
    names = list(searched)
    u = qmc.LatinHypercube(d=len(names), seed=np.random.default_rng(seed)).random(n)
    for row in u:
        cfg = dict(base)
        for j, name in enumerate(names):
            target, scale = searched[name]
            cfg[target] = _draw(space[name], scale, float(row[j]))
        out.append(cfg)
    return out


def _draw(domain, scale: str, u: float):
    if scale == "choice":
        return domain[min(int(u * len(domain)), len(domain) - 1)]
    low, high = float(domain[0]), float(domain[1])
    if scale == "log":
        return float(np.exp(np.log(low) + u * (np.log(high) - np.log(low))))
    return float(low + u * (high - low))


def searched_names(strategy: str) -> list[str]:
    """The ``FinetuneConfig`` fields a strategy's search varies (logged as ``selected.<name>``)."""
    return get_strategy(strategy).searched_names()


@dataclass
class StudyResult:
    best_params: dict
    best_value: float
    best_trial: int
    n_complete: int
    n_pruned: int
    trials: list[dict] = field(default_factory=list)  # number, state, value, params


def _summary(study) -> StudyResult:
    import optuna  # lazy: optuna takes over a second to import; frozen cells with n_trials > 1 only

    states = [t.state for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value) if done else None
    return StudyResult(
        best_params=dict(best.params) if best else {},
        best_value=float(best.value) if best else float("nan"),
        best_trial=best.number if best else -1,
        n_complete=len(done),
        n_pruned=sum(s == optuna.trial.TrialState.PRUNED for s in states),
        trials=[
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": dict(t.params),
                "user_attrs": dict(t.user_attrs),
            }
            for t in study.trials
        ],
    )


def run_study(objective: Callable[[Any], tuple[float, Any]], n_trials: int, seed: int = 0) -> tuple[StudyResult, Any]:
    """Maximise ``objective(trial) -> (val_metric, payload)`` with seeded TPE; returns the summary and the
    payload of the best trial."""
    import optuna  # lazy: as above

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, n_trials // 2)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    best: dict = {"value": -np.inf, "payload": None, "number": -1}

    def wrapped(trial):
        value, payload = objective(trial)
        if np.isfinite(value) and value > best["value"]:
            best.update(value=value, payload=payload, number=trial.number)
        return float(value) if np.isfinite(value) else float("-inf")

    study.optimize(wrapped, n_trials=n_trials)
    summary = _summary(study)
    return summary, best["payload"] if best["number"] == summary.best_trial else None


def search_probe(spec, train, val, test, n_trials: int = 10, seed: int = 0, space: SpaceFn | None = None):
    """Returns ``(ProbeResult of the best val configuration, StudyResult)``; the result's ``selected``
    merges the study's parameters with the probe's own inner choice."""
    space = space or get_probe(spec.kind).space
    if space is None:
        raise ValueError(f"probe '{spec.kind}' declares no search space; use search.n_trials: 1 (its own grid)")

    def objective(trial):
        trial_spec = spec.model_copy(update=space(trial, spec))
        trial_spec = type(spec).model_validate(trial_spec.model_dump())  # re-validate the overrides
        res = run_probe(trial_spec, train, val, test, seed=seed)
        return res.val_metric, res

    summary, result = run_study(objective, n_trials, seed)
    result.selected = {**summary.best_params, **result.selected}
    result.extra["search_trials"] = n_trials
    return result, summary
