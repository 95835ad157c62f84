"""The trial stage's work: frozen cells and the configurations of lora / full cells.

A frozen cell is one trial: read cached features, fit the probe (selected on val), score test with a
patient-level bootstrap interval, and record it all in the cell's MLflow child run. A lora / full cell
is a search: each of its configurations is one trial that trains the encoder under the task's head and
reports its val metric every epoch (the scheduler may stop it, ``dinoscale.sweep.schedule``), recorded
in a configuration run under the cell's run; once they have all ended, ``finalize_finetune_cell``
selects the configuration with the best val metric, scores test with it, and records the cell.

A trial reads only its resolved ``Cell`` (``dinoscale.sweep.cell``) and the dataset's units: the
plan has decided everything else. The probe's descriptor says what input it reads, the task's
descriptor how its output is scored. ``evaluate_cell``, ``train_configuration`` and
``select_configuration`` are plain functions (testable without Ray); ``unit_trainable`` is what Ray
Tune runs: it wraps them with the MLflow runs and ``tune.report``.
"""

from __future__ import annotations

import io
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from dinoscale import pseudonym, record
from dinoscale.data import SplitUnits
from dinoscale.errors import describe, user_error_of
from dinoscale.features import FeatureStore
from dinoscale.memory import PeakRSS
from dinoscale.probes import SegSplit, get_probe, run_probe
from dinoscale.sweep.cell import Cell, parse_unit
from dinoscale.sweep.inputs import label_spacing, probe_inputs, repartition
from dinoscale.tasks import Scoring, get_task


@dataclass
class SweepContext:
    """What every trial of a sweep shares, shipped once to the workers (``tune.with_parameters``)."""

    cells: dict[str, Cell]
    classes: list[str]
    splits: dict[str, SplitUnits]  # the dataset's units per split (dinoscale.data.PreparedDataset.units)
    store_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    run_tags: dict[str, str] = field(default_factory=dict)  # provenance etc., copied to every child
    dataset_inputs: list = field(default_factory=list)  # split manifests as MLflow datasets
    checkpoint_root: str | None = None  # lora / full checkpoints, keyed by trial key (on shared storage)
    mask_labels: dict[int, str] = field(default_factory=dict)  # segmentation: mask value -> structure
    sources: dict = field(default_factory=dict)  # split -> RowSources, for online features (PET channels)
    cell_runs: dict[str, str] = field(default_factory=dict)  # lora / full cell id -> its MLflow run (opened first)
    schedule_state: str | None = None  # the early-stopping scheduler's rungs and stops (dinoscale.sweep.schedule)
    pseudonym_key: bytes | None = None  # identifiers in logged predictions are keyed hashes (dinoscale.pseudonym)


def _probe_inputs(cell: Cell, ctx: SweepContext, store: FeatureStore, split: str, probe_spec):
    """The probe's input for one split (``dinoscale.sweep.inputs``): views of the memory-mapped store, read
    a mini-batch at a time above the trial's memory budget, or online features."""
    return probe_inputs(cell, ctx.splits[split], store, split, probe_spec, ctx.sources.get(split))


def replicate_units(cell: Cell, ctx: SweepContext) -> tuple[SplitUnits, SplitUnits, np.ndarray, np.ndarray]:
    """The cell's replicate: its train and val units and their positions in the dataset's train + val units."""
    from dinoscale.data.splits import replicate_indices

    train, val = ctx.splits["train"], ctx.splits["val"]
    tr_idx, va_idx = replicate_indices(train.patient_ids, val.patient_ids, cell.replicate, train.folds, val.folds)
    both = SplitUnits.concat(train, val)
    return both.take(tr_idx), both.take(va_idx), tr_idx, va_idx


def _scoring(cell: Cell, ctx: SweepContext, n_classes: int | None = None, split: str = "test") -> Scoring:
    """How ``split``'s outputs are scored: test is fixed; val is the cell's replicate draw."""
    units = replicate_units(cell, ctx)[1] if split == "val" else ctx.splits[split]
    b = cell.bootstrap
    return Scoring(
        units.sample_ids,
        units.patient_ids,
        units.labels,
        ctx.classes,
        ctx.mask_labels,
        n_classes,
        resamples=b["resamples"],
        level=b["level"],
        seed=b["seed"],
        spacing=label_spacing(units, bool(units.n_slices)) if get_task(cell.task).dense else None,
        groups=units.groups,
        macro_min_patients=b.get("macro_min_patients", 5),
        min_interval_units=b.get("min_interval_units", 10),
    )


def evaluate_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None = None) -> dict:
    if cell.trains_encoder:
        return evaluate_finetune_cell(cell, ctx, checkpoint_root)
    probe_spec = get_probe(cell.probe).spec.model_validate(cell.probe_config)
    store = FeatureStore(ctx.store_root)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        train, val, test = (_probe_inputs(cell, ctx, store, s, probe_spec) for s in ("train", "val", "test"))
        rep_train, rep_val, tr_idx, va_idx = replicate_units(cell, ctx)
        if cell.replicate.get("mode", "dataset") != "dataset":
            train, val = repartition(train, val, tr_idx, va_idx)
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        n_trials = cell.search.get("n_trials", 1)
        if n_trials > 1:
            from dinoscale.search import search_probe

            result, _ = search_probe(
                probe_spec, train, val, test, n_trials=n_trials, seed=cell.search.get("seed", 0) + cell.seed
            )
        else:
            result = run_probe(probe_spec, train, val, test, seed=cell.seed)
        t_probe = time.perf_counter() - t1
        dim = train.x[0].shape[-1] if isinstance(train.x, list) else train.x.shape[-3 if train.x.ndim >= 4 else 1]
        target = test.y if isinstance(test, SegSplit) else None
        out = _scored(
            cell,
            ctx,
            result.test_scores,
            target,
            result.val_metric,
            result.selected,
            {
                "feature_dim": dim,
                "probe_candidates": result.candidates,
                "time_feature_load_s": t_load,
                "time_probe_s": t_probe,
                "search_trials": n_trials,
                "features_online": int(cell.online),
                "n_train": len(rep_train.sample_ids),
                "n_val": len(rep_val.sample_ids),
                "selection_on_edge": int(bool(result.edges)),
            },
            getattr(probe_spec, "n_classes", None),
        )
    out["edges"] = {k: (result.selected.get(k), where) for k, where in result.edges.items()}
    out["metrics"].update(_memory_metrics(cell, peak))
    return out


def edge_text(edges: dict) -> str:
    """'lr=1 (top of its grid)' for the tag and the warnings."""
    return ", ".join(f"{k}={v:g} ({where} of its grid)" for k, (v, where) in edges.items())


def _memory_metrics(cell: Cell, peak: PeakRSS) -> dict:
    """The trial's measured peak resident memory next to the plan's prediction (dinoscale.record names)."""
    out = {record.TRIAL_PEAK_RSS_MB: peak.bytes / 2**20}
    if "predicted_peak_bytes" in cell.memory:
        out[record.TRIAL_PEAK_RSS_PREDICTED_MB] = cell.memory["predicted_peak_bytes"] / 2**20
    return out


def _axes_metrics(cell: Cell, ctx: SweepContext) -> dict:
    """Numeric sweep axes mirrored as metrics (MLflow sorts params as strings), and the split sizes."""
    test = ctx.splits["test"]
    return {
        **{name: cell.axes[name] for name in record.NUMERIC_AXES if name in cell.axes},
        "tokens_per_image": cell.backbone.tokens_per_image(cell.resolution),
        "gflops_per_image": cell.gflops_per_image,  # the compute axis
        "n_train": len(ctx.splits["train"].sample_ids),
        "n_val": len(ctx.splits["val"].sample_ids),
        "n_test": len(test.sample_ids),
        "n_test_patients": len(set(test.patient_ids)),
    }


def _scored(
    cell: Cell,
    ctx: SweepContext,
    test_output: np.ndarray,
    target,
    val_metric: float,
    selected: dict,
    extra: dict,
    n_classes: int | None = None,
) -> dict:
    """Test metrics as the task scores them (with their patient-level interval), the val metric, the mirrored
    axes and the per-unit predictions table."""
    task = get_task(cell.task)
    scoring = _scoring(cell, ctx, n_classes)
    test = ctx.splits["test"]
    grid = test.volume.grid if test.volume is not None else None
    if task.dense and target is not None and grid is not None and test.native is not None:
        # volumes on a common grid: predictions mapped back to each volume's native grid and scored against
        # its native label map with its native spacing (metrics in mm on the data as published)
        from dataclasses import replace

        from dinoscale.data.volumes import native_predictions

        test_output, target, spacing = native_predictions(test_output, test.masks, test.native, grid)
        scoring = replace(scoring, spacing=spacing)
    metrics, predictions = task.score(test_output, target, scoring)
    metrics = {
        **metrics,
        **task.val_metrics(val_metric),
        **_axes_metrics(cell, ctx),
        **extra,
        **{f"selected_{k}": v for k, v in selected.items() if isinstance(v, (int, float))},
    }
    return {"metrics": metrics, "selected": selected, "predictions": predictions, "edges": {}}


# ---------------------------------------------------------------- lora / full: configurations and selection


@dataclass
class FinetuneInputs:
    """What every configuration of a lora / full cell trains and is scored on."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    volumetric: bool
    n_out: int  # classes (classification heads) or classes incl. background (segmentation)
    n_classes: int | None  # segmentation: classes incl. background; None: classification
    out_size: tuple[int, ...] | None  # segmentation: the label maps' size

    def model(self, cell: Cell, cfg):
        """A fresh backbone (its seeded init or its weights file) prepared for ``cfg`` under the cell's head."""
        from dinoscale.models import load_backbone
        from dinoscale.train import build_model

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
        from dinoscale.train.objective import for_head

        return for_head(cell.finetune_head)


def finetune_inputs(cell: Cell, ctx: SweepContext) -> FinetuneInputs:
    from dinoscale.train.data import unit_samples

    head = cell.finetune_head
    n_classes = int(head["n_classes"]) if head["probe"] == "segmentation" else None
    rep_train, rep_val, _, _ = replicate_units(cell, ctx)  # the replicate's train / val draw; test is fixed
    train, val, test = (
        unit_samples(units, cell.recipe, n_classes) for units in (rep_train, rep_val, ctx.splits["test"])
    )
    out_size = tuple(train.read_target(0).shape) if n_classes is not None else None
    volumetric = rep_train.n_slices is not None
    return FinetuneInputs(train, val, test, volumetric, n_classes or len(ctx.classes), n_classes, out_size)


def configuration_dir(checkpoint_root: str | None, cell: Cell, k: int) -> str | None:
    """Where configuration ``k`` of a lora / full cell checkpoints (on shared storage, keyed by trial key)."""
    from pathlib import Path

    return str(Path(checkpoint_root) / cell.trial_key / f"c{k}") if checkpoint_root else None


def configuration_key(cell: Cell, k: int) -> str:
    """The MLflow key of configuration ``k``'s run under its cell's run."""
    return f"{cell.trial_key}-c{k}"


def train_configuration(
    cell: Cell, k: int, ctx: SweepContext, checkpoint_root: str | None = None, on_epoch=None, inputs=None
):
    """Train configuration ``k`` of a lora / full cell (resuming from its checkpoint); a FinetuneResult."""
    from dinoscale.train import FinetuneConfig, finetune

    inputs = inputs or finetune_inputs(cell, ctx)
    cfg = FinetuneConfig(**cell.configurations[k], seed=cell.seed)
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
    from dinoscale.search import searched_names
    from dinoscale.train import FinetuneConfig, evaluate
    from dinoscale.train.loop import load_best_weights

    eligible = [o for o in outcomes if o["state"] in (record.CONFIG_COMPLETE, record.CONFIG_STOPPED)]
    eligible = [o for o in eligible if o["best"] is not None and np.isfinite(o["best"])]
    if not eligible:
        states = ", ".join(f"c{o['k']}: {o['state']}" for o in outcomes)
        raise RuntimeError(f"no configuration of cell {cell.id} trained to a finite val metric ({states})")
    chosen = max(eligible, key=lambda o: (o["best"], -o["k"]))
    k = chosen["k"]
    inputs = inputs or finetune_inputs(cell, ctx)
    cfg = FinetuneConfig(**cell.configurations[k], seed=cell.seed)
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
    val_scored, _ = task.score(val_out, val_y if dense else None, _scoring(cell, ctx, inputs.n_classes, "val"))
    h = task.headline
    val_interval = {
        f"{h.val}_ci_low": val_scored.get(f"{h.test}_ci_low"),
        f"{h.val}_ci_high": val_scored.get(f"{h.test}_ci_high"),
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
        record.BEST_EPOCH: chosen.get("best_epoch", -1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "search_trials": len(cell.configurations),
    }
    chosen_cfg = cell.configurations[k]
    selected = {"configuration": k, **{n: chosen_cfg[n] for n in searched_names(cell.strategy)}}
    out = _scored(cell, ctx, test_out, test_y if dense else None, val_metric, selected, extra, inputs.n_classes)
    out["configuration"] = k
    return out


def evaluate_finetune_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None = None) -> dict:
    """A lora / full cell's whole search in this process, without Ray and without early stopping: every
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
                "best_epoch": res.best_epoch + 1,
            }
        )
    out = select_configuration(cell, ctx, outcomes, checkpoint_root, inputs, trained)
    out["metrics"]["time_train_s"] = time.perf_counter() - t0
    return out


def interval_note(metrics: dict, cell: Cell) -> str:
    units = int(metrics.get("interval_units", 0))
    need = cell.bootstrap.get("min_interval_units", 10)
    return f"no interval: {units} test unit(s) (patients), fewer than {need}"


def cell_params(cell: Cell) -> dict:
    """What a cell's run logs as params: its id, its grid axes and its protocol constants."""
    return {"cell": cell.id, **cell.axes, **cell.params}


def unit_trainable(config: dict, ctx: SweepContext) -> None:
    """The Ray Tune function trainable of the trial stage: a frozen cell, or one configuration of a lora /
    full cell (``config['unit']``, see ``dinoscale.sweep.cell.unit_id``)."""
    cell_id, k = parse_unit(config["unit"])
    if k is None:
        cell_trainable(ctx.cells[cell_id], ctx)
    else:
        configuration_trainable(ctx.cells[cell_id], k, ctx)


def _run_tags(cell: Cell, ctx: SweepContext) -> dict:
    import ray
    from ray import tune

    return {
        **ctx.run_tags,
        record.CELL: cell.id,
        record.WEIGHTS_KIND: cell.backbone.weights_kind,
        record.WEIGHTS_DIGEST: cell.backbone.weights_digest,
        **({record.RECIPE_DIGEST: cell.recipe.digest} if cell.recipe is not None else {}),
        record.RAY_TRIAL_ID: tune.get_context().get_trial_id() or "",
        record.RAY_NODE_ID: ray.get_runtime_context().get_node_id(),
    }


def cell_trainable(cell: Cell, ctx: SweepContext) -> None:
    """One frozen cell as a Ray Tune trial.

    The MLflow record is checked first: a cell whose child run already FINISHED under this parent
    (a resumed sweep, a retry after its node died) reports the recorded metrics instead of redoing
    the work. Every evaluation increments the run's ``dinoscale.evaluations`` tag.
    """
    from mlflow.tracking import MlflowClient
    from ray import tune

    from dinoscale.tracking import find_or_create_child, finished_child_metrics, log_batch, with_retries

    t_start = time.perf_counter()
    client = MlflowClient(ctx.tracking_uri)
    headline = get_task(cell.task).headline
    done = with_retries(
        finished_child_metrics, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, headline.test
    )
    if done is not None:
        tune.report({**done, "cell": cell.id, "reused_record": 1, "time_own_work_s": time.perf_counter() - t_start})
        return
    tags = {**_run_tags(cell, ctx), record.FEATURE_KEYS: ",".join(f"{s}:{d}" for s, d in cell.feature_keys)}
    run_id = with_retries(
        find_or_create_child, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, cell.id, tags
    )
    previous = client.get_run(run_id).data.tags.get(record.EVALUATIONS, "0")
    tags[record.EVALUATIONS] = str(int(previous) + 1)
    with_retries(log_batch, client, run_id, tags=tags)
    if ctx.dataset_inputs and previous == "0":
        with_retries(client.log_inputs, run_id, datasets=ctx.dataset_inputs)
    try:
        out = evaluate_cell(cell, ctx, checkpoint_root=ctx.checkpoint_root)
        _log_cell_result(client, run_id, cell, out, ctx.pseudonym_key)
    except BaseException as e:
        _record_failure(client, run_id, e)
        raise
    tune.report(
        {
            **out["metrics"],
            **({"selection_edge": edge_text(out["edges"])} if out.get("edges") else {}),
            "mlflow_run_id": run_id,
            "cell": cell.id,
            "reused_record": 0,
            "time_own_work_s": time.perf_counter() - t_start,
        }
    )


def _log_cell_result(client, run_id: str, cell: Cell, out: dict, pseudonym_key: bytes | None = None) -> None:
    from dinoscale.tracking import log_batch, with_retries

    headline = get_task(cell.task).headline
    tags = {f"{record.SELECTED_PREFIX}{k}": v for k, v in out["selected"].items()}
    if out.get("edges"):
        tags[record.SELECTION_EDGE] = edge_text(out["edges"])
    if headline.test in out["metrics"] and f"{headline.test}_ci_low" not in out["metrics"]:
        tags[record.INTERVAL] = interval_note(out["metrics"], cell)
    with_retries(log_batch, client, run_id, params=cell_params(cell), metrics=out["metrics"], tags=tags)
    buf = io.StringIO()
    pseudonym.pseudonymize_frame(out["predictions"], pseudonym_key).to_csv(buf, index=False)
    client.log_text(run_id, buf.getvalue(), record.PREDICTIONS)
    with_retries(client.set_terminated, run_id, "FINISHED")


def _record_failure(client, run_id: str, error: BaseException | None = None) -> None:
    """The traceback as an artifact; the error tag: a user error's message, else the traceback's last line."""
    from dinoscale.tracking import with_retries

    tb = traceback.format_exc()
    user = user_error_of(error) if error is not None else None
    why = describe(user) if user is not None else tb.strip().splitlines()[-1]
    client.log_text(run_id, tb, record.TRACEBACK)
    with_retries(client.set_tag, run_id, record.ERROR, why[:5000])
    with_retries(client.set_terminated, run_id, "FAILED")


def _configuration_params(cell: Cell, k: int) -> dict:
    cfg = cell.configurations[k]
    return {"configuration": k, **{n: (list(v) if isinstance(v, (list, tuple)) else v) for n, v in cfg.items()}}


def _searched_metrics(cell: Cell, k: int) -> dict:
    from dinoscale.search import searched_names

    cfg = cell.configurations[k]
    return {n: float(cfg[n]) for n in searched_names(cell.strategy)}


def configuration_trainable(cell: Cell, k: int, ctx: SweepContext) -> None:
    """Configuration ``k`` of a lora / full cell as a Ray Tune trial, recorded in its own run under the
    cell's run. After every epoch it logs its val metric (step = epoch) and reports it to Tune; when the
    scheduler stops it, Tune ends this thread at that report (``SystemExit``), the run is marked
    ``stopped`` with the epochs it reached, and its GPU memory is released. A configuration already
    recorded complete or stopped (a resumed sweep) is not trained again."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from dinoscale.sweep.schedule import stopped_at
    from dinoscale.tracking import find_child, find_or_create_child, log_batch, with_retries

    client = MlflowClient(ctx.tracking_uri)
    task = get_task(cell.task)
    unit = {"cell": cell.id, "configuration": k}
    parent = ctx.cell_runs[cell.id]
    key = configuration_key(cell, k)
    ckpt_dir = configuration_dir(ctx.checkpoint_root, cell, k)
    existing = with_retries(find_child, client, ctx.experiment_id, parent, key)
    if existing is not None and existing.data.tags.get(record.CONFIGURATION_STATE) in (
        record.CONFIG_COMPLETE,
        record.CONFIG_STOPPED,
    ):
        m = existing.data.metrics
        tune.report({**unit, record.EPOCH: m.get(record.EPOCHS_RUN, 0), "reused_record": 1})
        return
    tags = {**_run_tags(cell, ctx), record.CONFIGURATION: str(k), record.CONFIGURATION_STATE: record.CONFIG_RUNNING}
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
    stopped = stopped_at(ctx.schedule_state, cell.id, k)
    if stopped is not None:  # stopped by the scheduler before an interruption: recorded now, not trained again
        record_stopped_configuration(client, ctx, cell, k, stopped, run_id)
        return

    def on_epoch(epoch: int, rec: dict) -> None:
        value = rec["val_metric"]
        metrics = {
            record.EPOCH: epoch + 1,
            record.SELECTION_VALUE: value,
            **task.val_metrics(value),
            record.TRAIN_LOSS: rec["train_loss"],
            record.SCHEDULED_LR: rec["lr"],
            record.MICRO_BATCH_SIZE: rec["micro_batch_size"],
        }
        with_retries(log_batch, client, run_id, metrics=metrics, step=epoch + 1)
        tune.report({**unit, **metrics})  # the scheduler decides here; a stop ends this thread (SystemExit)

    try:
        res = train_configuration(cell, k, ctx, ctx.checkpoint_root, on_epoch)
    except SystemExit:  # Tune ended the trial at a report: the scheduler stopped it (recorded by the driver,
        _release_memory()  # record_stopped_configuration), or the experiment is ending (resumable)
        raise
    except BaseException as e:
        with_retries(client.set_tag, run_id, record.CONFIGURATION_STATE, record.CONFIG_FAILED)
        _record_failure(client, run_id, e)
        raise
    from dinoscale.train import compact_checkpoint

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


def record_stopped_configuration(client, ctx: SweepContext, cell: Cell, k: int, epochs: int, run_id: str | None = None):
    """Mark configuration ``k`` of ``cell`` stopped by the scheduler after ``epochs`` epochs: its run's state,
    the epochs it reached, its best val so far (from its checkpoint, which is compacted to its best
    weights) and status KILLED. Idempotent. Called by the driver when Tune ends the trial (the trial's
    process may be gone by then), and by the selection for a stop an interrupted driver did not record."""
    from dinoscale.tracking import find_child, log_batch, with_retries
    from dinoscale.train import checkpoint_summary, compact_checkpoint

    if run_id is None:
        run = with_retries(find_child, client, ctx.experiment_id, ctx.cell_runs[cell.id], configuration_key(cell, k))
        if run is None or run.data.tags.get(record.CONFIGURATION_STATE) == record.CONFIG_STOPPED:
            return
        run_id = run.info.run_id
    ckpt_dir = configuration_dir(ctx.checkpoint_root, cell, k)
    summary = checkpoint_summary(ckpt_dir) if ckpt_dir else None
    metrics = {record.EPOCHS_RUN: epochs}
    if summary is not None:
        metrics.update({record.BEST_SELECTION_VALUE: summary["best_val"], record.BEST_EPOCH: summary["best_epoch"] + 1})
        compact_checkpoint(ckpt_dir)
    tags = {record.CONFIGURATION_STATE: record.CONFIG_STOPPED, record.STOPPED_AT_EPOCH: str(epochs)}
    with_retries(log_batch, client, run_id, metrics=metrics, tags=tags)
    with_retries(client.set_terminated, run_id, "KILLED")


def _release_memory() -> None:
    """Free what this trial held on the GPU now, not when the actor is reused or ends."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def configuration_outcomes(client, ctx: SweepContext, cell: Cell) -> list[dict]:
    """One dict per configuration of a lora / full cell, from its run (``state`` failed when it has none)."""
    from dinoscale.tracking import children, with_retries

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
                "best_epoch": int(m.get(record.BEST_EPOCH, 0)),
                "stopped_at_epoch": r.data.tags.get(record.STOPPED_AT_EPOCH, ""),
                "run_id": r.info.run_id,
            }
        )
    return out


def open_finetune_cell_runs(cells: list[Cell], ctx: SweepContext, client) -> dict[str, str]:
    """The run of each lora / full cell, opened by the driver before its configurations start (they are its
    children); found again by trial key on resume, and left FINISHED where it already is."""
    from dinoscale.tracking import find_child, find_or_create_child, log_batch, with_retries

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
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from dinoscale.tracking import log_batch, with_retries

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
    from dinoscale.sweep.schedule import read_state

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
        _log_cell_result(client, run_id, cell, out, ctx.pseudonym_key)
    except BaseException as e:
        _record_failure(client, run_id, e)
        raise
    return {
        **out["metrics"],
        "mlflow_run_id": run_id,
        "cell": cell.id,
        "reused_record": 0,
        "time_own_work_s": time.perf_counter() - t_start,
    }
