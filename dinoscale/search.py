"""Per-cell hyper-parameter search: an Optuna study inside one cell.

Every cell gets the same budget (``n_trials``) so scaling curves compare like with like. TPE is
seeded; LoRA / full trials report their val metric every epoch and a MedianPruner stops hopeless
ones. Selection is on val only; the caller scores the returned best configuration on test.

- ``search_probe(spec, train, val, test, n_trials, seed)``: frozen probes on cached features. Each
  trial overrides some of the probe spec's fields (the search space its module declares in its
  ``ProbeDef``); the probe still does its own vectorised grid (e.g. all lr x wd heads) inside a trial.
- ``search_finetune(make_model, train, val, base_cfg, n_trials, seed, storage_dir)``: LoRA / full.
  With ``storage_dir`` the study lives in SQLite there and every trial checkpoints, so a retried
  Ray trial continues the study instead of restarting it: finished (complete or pruned) trials are
  kept, and a trial that was interrupted (failed, or left running by a killed process) is run again
  with its parameters from its last epoch checkpoint. One process at a time per ``storage_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinoscale.probes.registry import SpaceFn  # (optuna.Trial, base spec/config) -> field overrides


def finetune_space(trial, cfg) -> dict:
    out = {
        "lr": trial.suggest_float("lr", 1e-5, 1e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True),
    }
    if cfg.strategy == "lora":
        out["lora_rank"] = trial.suggest_categorical("lora_rank", [4, 8, 16])
    else:
        out["layer_decay"] = trial.suggest_float("layer_decay", 0.5, 0.95)
    return out


@dataclass
class StudyResult:
    best_params: dict
    best_value: float
    best_trial: int
    n_complete: int
    n_pruned: int
    trials: list[dict] = field(default_factory=list)  # number, state, value, params


def _summary(study) -> StudyResult:
    import optuna

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


def _requeue_interrupted(study) -> None:
    """Queue one retry of each interrupted trial (FAIL, or RUNNING left by a process that died: only one
    process uses a study at a time) with its parameters, unless a retry is already queued or finished.
    The retry carries ``resumes_trial`` (the first trial of the chain), which names its checkpoint."""
    import optuna

    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)
    root = {t.number: t.user_attrs.get("resumes_trial", t.number) for t in study.trials}
    handled = {root[t.number] for t in study.trials if t.state != states.FAIL}  # queued, or finished
    for t in study.get_trials(deepcopy=False, states=(states.FAIL,)):  # oldest first; latest params win
        if root[t.number] not in handled:
            handled.add(root[t.number])
            last = [u for u in study.trials if root[u.number] == root[t.number]][-1]
            study.enqueue_trial(dict(last.params), user_attrs={"resumes_trial": root[t.number]})


def run_study(
    objective: Callable[[Any], tuple[float, Any]],
    n_trials: int,
    seed: int = 0,
    pruner=None,
    storage: str | None = None,
    study_name: str = "cell",
    retry_interrupted: bool = False,
) -> tuple[StudyResult, Any]:
    """Maximise ``objective(trial) -> (val_metric, payload)``; returns the summary and the payload of the
    best trial run in this process (None when the best finished in an earlier, interrupted process).
    With ``storage``, finished trials count towards ``n_trials`` and are not rerun; with
    ``retry_interrupted`` too, interrupted trials are queued again first (``_requeue_interrupted``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, n_trials // 2)))
    study = optuna.create_study(
        direction="maximize",
        sampler=sampler,
        pruner=pruner or optuna.pruners.NopPruner(),
        storage=storage,
        study_name=study_name,
        load_if_exists=storage is not None,
    )
    if retry_interrupted and storage is not None:
        _requeue_interrupted(study)
    best: dict = {"value": -np.inf, "payload": None, "number": -1}

    def wrapped(trial):
        value, payload = objective(trial)
        if np.isfinite(value) and value > best["value"]:
            best.update(value=value, payload=payload, number=trial.number)
        return float(value) if np.isfinite(value) else float("-inf")

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = n_trials - sum(t.state in finished for t in study.trials)
    if remaining > 0:
        study.optimize(wrapped, n_trials=remaining)
    summary = _summary(study)
    return summary, best["payload"] if best["number"] == summary.best_trial else None


def search_probe(spec, train, val, test, n_trials: int = 10, seed: int = 0, space: SpaceFn | None = None):
    """Returns ``(ProbeResult of the best val configuration, StudyResult)``; the result's ``selected``
    merges the study's parameters with the probe's own inner choice."""
    from dinoscale.probes import get_probe, run_probe

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


def search_finetune(
    make_model: Callable[[Any], Any],
    train,
    val,
    base_cfg,
    n_trials: int = 8,
    seed: int = 0,
    space: SpaceFn | None = None,
    storage_dir: str | Path | None = None,
    device=None,
    n_startup_trials: int = 2,
    n_warmup_epochs: int = 1,
    on_epoch=None,
):
    """LoRA / full search with median pruning on the per-epoch val metric.

    ``make_model(cfg) -> ImageClassifier`` (e.g. ``lambda c: build_classifier(load_backbone(...).model, C, c)``).
    Returns ``(FinetuneResult of the best trial, with its best-val weights loaded; StudyResult)``.
    ``on_epoch(trial_number, epoch, record)`` is called after every epoch (e.g. to report to Tune)."""
    import optuna
    import torch

    from dinoscale.train import finetune

    space = space or finetune_space
    storage = None
    if storage_dir is not None:
        Path(storage_dir).mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{Path(storage_dir).resolve() / 'optuna.db'}"

    def cfg_of(params_or_trial) -> Any:
        return dataclasses.replace(base_cfg, **space(params_or_trial, base_cfg))

    def checkpoint(number: int, user_attrs: dict) -> Path | None:  # a retried trial continues its first try's
        return (
            Path(storage_dir) / f"trial_{user_attrs.get('resumes_trial', number)}" if storage_dir is not None else None
        )

    def model_for(cfg):
        torch.manual_seed(cfg.seed)  # head / adapter init: the same for every trial, whatever ran before
        return make_model(cfg)

    def run(trial, cfg):
        ckpt = checkpoint(trial.number, trial.user_attrs)

        def report(epoch, record):
            if on_epoch is not None:
                on_epoch(trial.number, epoch, record)
            trial.report(record["val_metric"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        res = finetune(model_for(cfg), train, val, cfg, checkpoint_dir=ckpt, on_epoch=report, device=device)
        return res.best_val, res

    pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_epochs)
    summary, best = run_study(lambda t: run(t, cfg_of(t)), n_trials, seed, pruner, storage, retry_interrupted=True)
    if best is None and summary.best_trial >= 0:  # best finished before an interruption: reload it
        cfg = cfg_of(optuna.trial.FixedTrial(summary.best_params))
        ckpt = checkpoint(summary.best_trial, summary.trials[summary.best_trial]["user_attrs"])
        best = finetune(model_for(cfg), train, val, cfg, checkpoint_dir=ckpt, device=device)
    return best, summary
