"""The search of a training strategy's cell (lora, full, or any registered strategy, ``dinoscale.strategies``).

Each configuration of the cell (decided by the plan, ``dinoscale.search``) is one trial that trains the
encoder under the task's head and reports its val metric every epoch (the scheduler may stop it,
``dinoscale.sweep.schedule``), recorded in a configuration run under the cell's run. Once they have all
ended, ``finalize_finetune_cell`` selects the configuration with the best val metric, scores test with it,
and records the cell. ``train_configuration`` and ``select_configuration`` are plain functions (testable
without Ray; ``evaluate_finetune_cell`` runs a whole search in one process); ``configuration_trainable`` is
what Ray Tune runs for a configuration. What every trial shares (context, scoring, the cell's record) is
``dinoscale.sweep.trial``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from dinoscale import record
from dinoscale.models import load_backbone
from dinoscale.search import searched_names
from dinoscale.sweep.cell import Cell
from dinoscale.sweep.schedule import read_state, stopped_at
from dinoscale.sweep.trial import (
    SweepContext,
    cell_params,
    log_cell_result,
    record_failure,
    replicate_units,
    run_tags,
    scored,
    scoring_of,
)
from dinoscale.tasks import get_task
from dinoscale.tracking import children, find_child, find_or_create_child, log_batch, with_retries
from dinoscale.train import (
    FinetuneConfig,
    build_model,
    checkpoint_summary,
    compact_checkpoint,
    evaluate,
    finetune,
)
from dinoscale.train.data import unit_samples
from dinoscale.train.heads import dense_classes, objective_for
from dinoscale.train.loop import load_best_weights


@dataclass
class FinetuneInputs:
    """What every configuration of a training cell trains and is scored on."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    volumetric: bool
    n_out: int  # classes (classification heads) or classes incl. background (segmentation)
    n_classes: int | None  # segmentation: classes incl. background; None: classification
    out_size: tuple[int, ...] | None  # segmentation: the label maps' size

    def model(self, cell: Cell, cfg):
        """A fresh backbone (its seeded init or its weights file) prepared for ``cfg`` under the cell's head."""
        bb = load_backbone(cell.backbone.name, cell.backbone.weights, cell.backbone.weights_seed)
        return build_model(
            bb.model,
            cfg,
            cell.finetune_head,
            self.n_out,
            self.volumetric,
            bb.patch_size,
            bb.num_prefix_tokens,
            self.out_size,
        )

    def objective(self, cell: Cell):
        return objective_for(cell.finetune_head, get_task(cell.task).headline.name)


def finetune_inputs(cell: Cell, ctx: SweepContext) -> FinetuneInputs:
    n_classes = dense_classes(cell.finetune_head)
    rep_train, rep_val, _, _ = replicate_units(cell, ctx)  # the replicate's train / val draw; test is fixed
    train, val, test = (
        unit_samples(units, cell.recipe, n_classes) for units in (rep_train, rep_val, ctx.splits["test"])
    )
    out_size = tuple(train.read_target(0).shape) if n_classes is not None else None
    volumetric = rep_train.n_slices is not None
    return FinetuneInputs(train, val, test, volumetric, n_classes or len(ctx.classes), n_classes, out_size)


def configuration_dir(checkpoint_root: str | None, cell: Cell, k: int) -> str | None:
    """Where configuration ``k`` of a training cell checkpoints (on shared storage, keyed by trial key)."""
    return str(Path(checkpoint_root) / cell.trial_key / f"c{k}") if checkpoint_root else None


def configuration_key(cell: Cell, k: int) -> str:
    """The MLflow key of configuration ``k``'s run under its cell's run."""
    return f"{cell.trial_key}-c{k}"


def train_configuration(
    cell: Cell, k: int, ctx: SweepContext, checkpoint_root: str | None = None, on_epoch=None, inputs=None
):
    """Train configuration ``k`` of a training cell (resuming from its checkpoint); a FinetuneResult."""
    inputs = inputs or finetune_inputs(cell, ctx)
    cfg = FinetuneConfig.of(cell.configurations[k], seed=cell.seed)
    return finetune(
        inputs.model(cell, cfg),
        inputs.train,
        inputs.val,
        cfg,
        checkpoint_dir=configuration_dir(checkpoint_root, cell, k),
        on_epoch=on_epoch,
        objective=inputs.objective(cell),
    )


def select_configuration(
    cell: Cell, ctx: SweepContext, outcomes: list[dict], checkpoint_root: str | None, inputs=None, trained=None
) -> dict:
    """The configuration with the best val metric among those that trained (complete or stopped early;
    ties: the lowest index), restored to its best epoch's weights, scored once on test with the task's
    patient-level interval (and its val metric with one). ``outcomes``: one dict per configuration
    (``k``, ``state``, ``best``, ``epochs``); ``trained``: {k: model} already in memory (else read back
    from the configuration's checkpoint)."""
    eligible = [o for o in outcomes if o["state"] in (record.CONFIG_COMPLETE, record.CONFIG_STOPPED)]
    eligible = [o for o in eligible if o["best"] is not None and np.isfinite(o["best"])]
    if not eligible:
        states = ", ".join(f"c{o['k']}: {o['state']}" for o in outcomes)
        raise RuntimeError(f"no configuration of cell {cell.id} trained to a finite val metric ({states})")
    chosen = max(eligible, key=lambda o: (o["best"], -o["k"]))
    k = chosen["k"]
    inputs = inputs or finetune_inputs(cell, ctx)
    cfg = FinetuneConfig.of(cell.configurations[k], seed=cell.seed)
    model = (trained or {}).get(k)
    if model is None:
        model = inputs.model(cell, cfg)
        load_best_weights(model, configuration_dir(checkpoint_root, cell, k))
    objective = inputs.objective(cell)
    batch = cfg.micro
    val_out, val_y = evaluate(model, inputs.val, objective, batch, amp=cfg.amp, num_workers=cfg.num_workers)
    test_out, test_y = evaluate(model, inputs.test, objective, batch, amp=cfg.amp, num_workers=cfg.num_workers)
    val_metric = float(objective.val_metric(val_y, val_out))
    task = get_task(cell.task)
    dense = inputs.n_classes is not None
    val_scored, _ = task.score(val_out, val_y if dense else None, scoring_of(cell, ctx, inputs.n_classes, "val"))
    h = task.headline
    val_interval = {
        h.val + record.CI_LOW: val_scored.get(h.test + record.CI_LOW),
        h.val + record.CI_HIGH: val_scored.get(h.test + record.CI_HIGH),
    }
    counts = {s: sum(o["state"] == s for o in outcomes) for s in record.CONFIGURATION_STATES}
    epochs = cell.configurations[0]["epochs"]
    extra = {
        **val_interval,
        record.SEARCH_CONFIGURATIONS: len(cell.configurations),
        record.CONFIGURATIONS_COMPLETE: counts[record.CONFIG_COMPLETE],
        record.CONFIGURATIONS_STOPPED: counts[record.CONFIG_STOPPED],
        record.CONFIGURATIONS_FAILED: len(outcomes) - counts[record.CONFIG_COMPLETE] - counts[record.CONFIG_STOPPED],
        record.CONFIGURATION_EPOCHS: sum(int(o.get("epochs") or 0) for o in outcomes),
        record.CONFIGURATION_EPOCHS_BUDGET: len(cell.configurations) * epochs,
        record.BEST_EPOCH: chosen.get(record.BEST_EPOCH, -1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "search_trials": len(cell.configurations),
    }
    chosen_cfg = cell.configurations[k]
    selected = {"configuration": k, **{n: chosen_cfg[n] for n in searched_names(cell.strategy)}}
    out = scored(cell, ctx, test_out, test_y if dense else None, val_metric, selected, extra, inputs.n_classes)
    out["configuration"] = k
    return out


def evaluate_finetune_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None = None) -> dict:
    """A training cell's whole search in this process, without Ray and without early stopping: every
    configuration trains to its end (or its own patience), then the best on val is scored on test."""
    inputs = finetune_inputs(cell, ctx)
    outcomes, trained = [], {}
    t0 = time.perf_counter()
    for k in range(len(cell.configurations)):
        res = train_configuration(cell, k, ctx, checkpoint_root, inputs=inputs)
        trained[k] = res.model
        outcomes.append(
            {
                "k": k,
                "state": record.CONFIG_COMPLETE,
                "best": res.best_val,
                "epochs": res.epochs_run,
                record.BEST_EPOCH: res.best_epoch + 1,
            }
        )
    out = select_configuration(cell, ctx, outcomes, checkpoint_root, inputs, trained)
    out["metrics"]["time_train_s"] = time.perf_counter() - t0
    return out


def _configuration_params(cell: Cell, k: int) -> dict:
    cfg = cell.configurations[k]
    return {"configuration": k, **{n: (list(v) if isinstance(v, (list, tuple)) else v) for n, v in cfg.items()}}


def _searched_metrics(cell: Cell, k: int) -> dict:
    cfg = cell.configurations[k]
    return {n: float(cfg[n]) for n in searched_names(cell.strategy)}


def configuration_trainable(cell: Cell, k: int, ctx: SweepContext) -> None:
    """Configuration ``k`` of a training cell as a Ray Tune trial, recorded in its own run under the
    cell's run. After every epoch it logs its val metric (step = epoch) and reports it to Tune; when the
    scheduler stops it, Tune ends this thread at that report (``SystemExit``), the run is marked
    ``stopped`` with the epochs it reached, and its GPU memory is released. A configuration already
    recorded complete or stopped (a resumed sweep) is not trained again."""
    client = MlflowClient(ctx.tracking_uri)
    unit = {"cell": cell.id, "configuration": k}
    run_id = _configuration_run(client, ctx, cell, k, unit)
    if run_id is None:
        return
    stopped = stopped_at(ctx.schedule_state, cell.id, k)
    if stopped is not None:  # stopped by the scheduler before an interruption: recorded now, not trained again
        record_stopped_configuration(client, ctx, cell, k, stopped, run_id)
        return
    try:
        res = train_configuration(cell, k, ctx, ctx.checkpoint_root, _epoch_reporter(client, run_id, cell, unit))
    except SystemExit:  # Tune ended the trial at a report: the scheduler stopped it (recorded by the driver,
        _release_memory()  # record_stopped_configuration), or the experiment is ending (resumable)
        raise
    except BaseException as e:
        with_retries(client.set_tag, run_id, record.CONFIGURATION_STATE, record.CONFIG_FAILED)
        record_failure(client, run_id, e)
        raise
    ckpt_dir = configuration_dir(ctx.checkpoint_root, cell, k)
    if ckpt_dir is not None:
        compact_checkpoint(ckpt_dir, res.stopped_early)
    final = {
        record.BEST_SELECTION_VALUE: res.best_val,
        record.BEST_EPOCH: res.best_epoch + 1,
        record.EPOCHS_RUN: res.epochs_run,
        record.OOM_BACKOFFS: res.oom_backoffs,
        record.MICRO_BATCH_SIZE: res.micro_batch_size,
    }
    with_retries(log_batch, client, run_id, metrics=final, tags={record.CONFIGURATION_STATE: record.CONFIG_COMPLETE})
    with_retries(client.set_terminated, run_id, "FINISHED")
    del res
    _release_memory()


def _configuration_run(client, ctx: SweepContext, cell: Cell, k: int, unit: dict) -> str | None:
    """The run of configuration ``k`` under its cell's run, its params and searched values logged on its first
    evaluation; None when it is already recorded complete or stopped (reported to Tune as reused)."""
    parent = ctx.cell_runs[cell.id]
    key = configuration_key(cell, k)
    existing = with_retries(find_child, client, ctx.experiment_id, parent, key)
    if existing is not None and existing.data.tags.get(record.CONFIGURATION_STATE) in (
        record.CONFIG_COMPLETE,
        record.CONFIG_STOPPED,
    ):
        m = existing.data.metrics
        tune.report({**unit, record.EPOCH: m.get(record.EPOCHS_RUN, 0), "reused_record": 1})
        return None
    tags = {**run_tags(cell, ctx), record.CONFIGURATION: str(k), record.CONFIGURATION_STATE: record.CONFIG_RUNNING}
    run_id = with_retries(
        find_or_create_child, client, ctx.experiment_id, parent, key, f"{cell.id}@c{k}", tags, record.ROLE_CONFIGURATION
    )
    previous = client.get_run(run_id).data.tags.get(record.EVALUATIONS, "0")
    tags[record.EVALUATIONS] = str(int(previous) + 1)
    first = previous == "0"
    with_retries(
        log_batch,
        client,
        run_id,
        params=_configuration_params(cell, k) if first else None,
        metrics=_searched_metrics(cell, k) if first else None,  # MLflow sorts params as text
        tags=tags,
    )
    return run_id


def _epoch_reporter(client, run_id: str, cell: Cell, unit: dict):
    """What a configuration does after each epoch: log its val metric (step = epoch) and report it to Tune."""
    task = get_task(cell.task)

    def on_epoch(epoch: int, rec: dict) -> None:
        value = rec["val_metric"]
        metrics = {
            record.EPOCH: epoch + 1,
            record.SELECTION_VALUE: value,
            **task.val_metrics(value),
            record.TRAIN_LOSS: rec[record.TRAIN_LOSS],
            record.SCHEDULED_LR: rec["lr"],
            record.MICRO_BATCH_SIZE: rec[record.MICRO_BATCH_SIZE],
        }
        with_retries(log_batch, client, run_id, metrics=metrics, step=epoch + 1)
        tune.report({**unit, **metrics})  # the scheduler decides here; a stop ends this thread (SystemExit)

    return on_epoch


def record_stopped_configuration(client, ctx: SweepContext, cell: Cell, k: int, epochs: int, run_id: str | None = None):
    """Mark configuration ``k`` of ``cell`` stopped by the scheduler after ``epochs`` epochs: its run's state,
    the epochs it reached, its best val so far (from its checkpoint, which is compacted to its best
    weights) and status KILLED. Idempotent. Called by the driver when Tune ends the trial (the trial's
    process may be gone by then), and by the selection for a stop an interrupted driver did not record."""
    if run_id is None:
        run = with_retries(find_child, client, ctx.experiment_id, ctx.cell_runs[cell.id], configuration_key(cell, k))
        if run is None or run.data.tags.get(record.CONFIGURATION_STATE) == record.CONFIG_STOPPED:
            return
        run_id = run.info.run_id
    ckpt_dir = configuration_dir(ctx.checkpoint_root, cell, k)
    summary = checkpoint_summary(ckpt_dir) if ckpt_dir else None
    metrics = {record.EPOCHS_RUN: epochs}
    if summary is not None:
        metrics.update(
            {record.BEST_SELECTION_VALUE: summary["best_val"], record.BEST_EPOCH: summary[record.BEST_EPOCH] + 1}
        )
        compact_checkpoint(ckpt_dir)
    tags = {record.CONFIGURATION_STATE: record.CONFIG_STOPPED, record.STOPPED_AT_EPOCH: str(epochs)}
    with_retries(log_batch, client, run_id, metrics=metrics, tags=tags)
    with_retries(client.set_terminated, run_id, "KILLED")


def _release_memory() -> None:
    """Free what this trial held on the GPU now, not when the actor is reused or ends."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def configuration_outcomes(client, ctx: SweepContext, cell: Cell) -> list[dict]:
    """One dict per configuration of a training cell, from its run (``state`` failed when it has none)."""
    runs = {
        r.data.tags.get(record.TRIAL_KEY): r
        for r in with_retries(children, client, ctx.experiment_id, ctx.cell_runs[cell.id], record.ROLE_CONFIGURATION)
    }
    out = []
    for k in range(len(cell.configurations)):
        r = runs.get(configuration_key(cell, k))
        if r is None:
            out.append({"k": k, "state": record.CONFIG_FAILED, "best": None, "epochs": 0, "run_id": None})
            continue
        m, state = r.data.metrics, r.data.tags.get(record.CONFIGURATION_STATE, record.CONFIG_FAILED)
        out.append(
            {
                "k": k,
                "state": state,
                "best": m.get(record.BEST_SELECTION_VALUE),
                "epochs": int(m.get(record.EPOCHS_RUN, m.get(record.EPOCH, 0))),
                record.BEST_EPOCH: int(m.get(record.BEST_EPOCH, 0)),
                "stopped_at_epoch": r.data.tags.get(record.STOPPED_AT_EPOCH, ""),
                "run_id": r.info.run_id,
            }
        )
    return out


def open_finetune_cell_runs(cells: list[Cell], ctx: SweepContext, client) -> dict[str, str]:
    """The run of each training cell, opened by the driver before its configurations start (they are its
    children); found again by trial key on resume, and left FINISHED where it already is."""
    runs = {}
    for cell in cells:
        existing = with_retries(find_child, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key)
        if existing is not None and existing.info.status == "FINISHED":
            runs[cell.id] = existing.info.run_id
            continue
        tags = {
            **ctx.run_tags,
            record.CELL: cell.id,
            record.WEIGHTS_KIND: cell.backbone.weights_kind,
            record.WEIGHTS_DIGEST: cell.backbone.weights_digest,
        }
        run_id = with_retries(
            find_or_create_child, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, cell.id, tags
        )
        if existing is None:
            with_retries(log_batch, client, run_id, params=cell_params(cell))
            if ctx.dataset_inputs:
                with_retries(client.log_inputs, run_id, datasets=ctx.dataset_inputs)
        runs[cell.id] = run_id
    return runs


def finalize_finetune_cell(cell_id: str, ctx: SweepContext) -> dict:
    """After its configurations have all ended: select on val, score test, record the cell's run (its
    selected configuration, test metrics with intervals, the search table). Run as a Ray task (a GPU where
    the cluster has them) by the runner; a cell already recorded FINISHED returns its record."""
    t_start = time.perf_counter()
    cell = ctx.cells[cell_id]
    client = MlflowClient(ctx.tracking_uri)
    run_id = ctx.cell_runs[cell.id]
    headline = get_task(cell.task).headline
    run = client.get_run(run_id)
    if run.info.status == "FINISHED" and headline.test in run.data.metrics:
        return {
            **run.data.metrics,
            "mlflow_run_id": run_id,
            "cell": cell.id,
            "reused_record": 1,
            "time_own_work_s": time.perf_counter() - t_start,
        }
    previous = run.data.tags.get(record.EVALUATIONS, "0")
    with_retries(client.set_tag, run_id, record.EVALUATIONS, str(int(previous) + 1))
    for k, epochs in read_state(ctx.schedule_state)["stopped"].get(cell.id, {}).items():
        record_stopped_configuration(client, ctx, cell, int(k), epochs)  # stops an interrupted driver left unrecorded
    outcomes = configuration_outcomes(client, ctx, cell)
    table = pd.DataFrame(
        [
            {
                **{k: v for k, v in o.items() if k != "run_id"},
                **_configuration_params(cell, o["k"]),
                "run_id": o["run_id"],
            }
            for o in outcomes
        ]
    )
    client.log_text(run_id, table.to_csv(index=False), record.SEARCH_TABLE)
    try:
        out = select_configuration(cell, ctx, outcomes, ctx.checkpoint_root)
        chosen = next(o for o in outcomes if o["k"] == out["configuration"])
        with_retries(
            log_batch,
            client,
            run_id,
            tags={record.SELECTED_CONFIGURATION: str(chosen["k"]), record.SELECTED_RUN: chosen["run_id"] or ""},
        )
        log_cell_result(client, run_id, cell, out, ctx.pseudonym_key)
    except BaseException as e:
        record_failure(client, run_id, e)
        raise
    return {
        **out["metrics"],
        "mlflow_run_id": run_id,
        "cell": cell.id,
        "reused_record": 0,
        "time_own_work_s": time.perf_counter() - t_start,
    }
