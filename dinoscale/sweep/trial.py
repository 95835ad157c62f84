"""One cell = one trial: read cached features, fit the probe (selected on val), score test with a
patient-level bootstrap interval, and record it all in the cell's MLflow child run.

A trial reads only its resolved ``Cell`` (``dinoscale.sweep.cell``) and the dataset's units: the
plan has decided everything else. The probe's descriptor says what input it reads, the task's
descriptor how its output is scored. ``evaluate_cell`` is a plain function (testable without Ray);
``cell_trainable`` is what Ray Tune runs: it wraps it with the MLflow child run and ``tune.report``.
"""

from __future__ import annotations

import io
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from dinoscale import record
from dinoscale.data import SplitUnits
from dinoscale.errors import describe, user_error_of
from dinoscale.features import FeatureStore
from dinoscale.memory import PeakRSS
from dinoscale.probes import SegSplit, get_probe, run_probe
from dinoscale.sweep.cell import Cell
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


def _scoring(cell: Cell, ctx: SweepContext, n_classes: int | None = None) -> Scoring:
    test = ctx.splits["test"]
    b = cell.bootstrap
    return Scoring(
        test.sample_ids,
        test.patient_ids,
        test.labels,
        ctx.classes,
        ctx.mask_labels,
        n_classes,
        resamples=b["resamples"],
        level=b["level"],
        seed=b["seed"],
        spacing=label_spacing(test, bool(test.n_slices)) if get_task(cell.task).dense else None,
        groups=test.groups,
        macro_min_patients=b.get("macro_min_patients", 5),
        min_interval_units=b.get("min_interval_units", 10),
    )


def evaluate_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None = None, on_epoch=None) -> dict:
    if cell.trains_encoder:
        return evaluate_finetune_cell(cell, ctx, checkpoint_root, on_epoch)
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
    metrics, predictions = task.score(test_output, target, _scoring(cell, ctx, n_classes))
    metrics = {
        **metrics,
        **task.val_metrics(val_metric),
        **_axes_metrics(cell, ctx),
        **extra,
        **{f"selected_{k}": v for k, v in selected.items() if isinstance(v, (int, float))},
    }
    return {"metrics": metrics, "selected": selected, "predictions": predictions, "edges": {}}


class _LabelledImages(torch.utils.data.Dataset):
    def __init__(self, split: SplitUnits, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, i: int):
        return self.transform(self.split.items[i]), torch.as_tensor(self.split.labels[i], dtype=torch.float32)


def evaluate_finetune_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None, on_epoch=None) -> dict:
    """lora / full: train the encoder + a linear head on images (early-stopped on val), score test.

    Checkpoints go under ``<checkpoint_root>/<trial key>`` so a retried or resumed trial continues
    from its last epoch instead of restarting.
    """
    from pathlib import Path

    from dinoscale.data.preprocess import build_transform
    from dinoscale.models import load_backbone
    from dinoscale.train import FinetuneConfig, build_classifier, finetune, predict

    cfg = FinetuneConfig.from_spec(cell.strategy_config, seed=cell.seed)
    bb = load_backbone(cell.backbone.name, cell.backbone.weights, cell.backbone.weights_seed)
    model = build_classifier(bb.model, len(ctx.classes), cfg, num_prefix_tokens=bb.num_prefix_tokens)
    transform = build_transform(cell.resolution, bb.mean, bb.std, cell.interpolation, cell.window)
    rep_train, rep_val, _, _ = replicate_units(cell, ctx)
    train_ds, val_ds, test_ds = (_LabelledImages(u, transform) for u in (rep_train, rep_val, ctx.splits["test"]))
    ckpt = str(Path(checkpoint_root) / cell.trial_key) if checkpoint_root else None
    t0 = time.perf_counter()
    res = finetune(model, train_ds, val_ds, cfg, checkpoint_dir=ckpt, on_epoch=on_epoch)
    test_scores = predict(res.model, test_ds, batch_size=cfg.batch_size)
    n_trainable = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    extra = {
        "time_train_s": time.perf_counter() - t0,
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "trainable_params": n_trainable,
        "resumed_from_epoch": -1 if res.resumed_from_epoch is None else res.resumed_from_epoch,
        "n_train": len(rep_train.sample_ids),
        "n_val": len(rep_val.sample_ids),
    }
    selected = {"lr": cfg.lr, "best_epoch": res.best_epoch}
    return _scored(cell, ctx, test_scores, None, res.best_val, selected, extra)


def interval_note(metrics: dict, cell: Cell) -> str:
    units = int(metrics.get("interval_units", 0))
    need = cell.bootstrap.get("min_interval_units", 10)
    return f"no interval: {units} test unit(s) (patients), fewer than {need}"


def cell_params(cell: Cell) -> dict:
    """What a cell's run logs as params: its id, its grid axes and its protocol constants."""
    return {"cell": cell.id, **cell.axes, **cell.params}


def cell_trainable(config: dict, ctx: SweepContext) -> None:
    """The Ray Tune function trainable for one cell.

    The MLflow record is checked first: a cell whose child run already FINISHED under this parent
    (a resumed sweep, a retry after its node died) reports the recorded metrics instead of redoing
    the work. Every evaluation increments the run's ``dinoscale.evaluations`` tag.
    """
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from dinoscale.tracking import find_or_create_child, finished_child_metrics, log_batch, with_retries

    t_start = time.perf_counter()
    cell = ctx.cells[config["cell"]]
    client = MlflowClient(ctx.tracking_uri)
    headline = get_task(cell.task).headline
    done = with_retries(
        finished_child_metrics, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, headline.test
    )
    if done is not None:
        tune.report({**done, "cell": cell.id, "reused_record": 1, "time_own_work_s": time.perf_counter() - t_start})
        return
    trial_ctx = tune.get_context()
    tags = {
        **ctx.run_tags,
        record.CELL: cell.id,
        record.WEIGHTS_KIND: cell.backbone.weights_kind,
        record.WEIGHTS_DIGEST: cell.backbone.weights_digest,
        record.RAY_TRIAL_ID: trial_ctx.get_trial_id() or "",
        record.RAY_NODE_ID: ray.get_runtime_context().get_node_id(),
        record.FEATURE_KEYS: ",".join(f"{s}:{d}" for s, d in cell.feature_keys),
    }
    run_id = with_retries(
        find_or_create_child, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, cell.id, tags
    )
    previous = client.get_run(run_id).data.tags.get(record.EVALUATIONS, "0")
    tags[record.EVALUATIONS] = str(int(previous) + 1)
    with_retries(log_batch, client, run_id, tags=tags)
    if ctx.dataset_inputs and previous == "0":
        with_retries(client.log_inputs, run_id, datasets=ctx.dataset_inputs)

    def report_epoch(epoch: int, rec: dict) -> None:  # lora / full: intermediate val metric for the scheduler
        tune.report({"epoch": epoch, headline.val: rec.get("val_metric", float("nan")), "cell": cell.id})

    try:
        out = evaluate_cell(cell, ctx, checkpoint_root=ctx.checkpoint_root, on_epoch=report_epoch)
        tags = {f"{record.SELECTED_PREFIX}{k}": v for k, v in out["selected"].items()}
        if out.get("edges"):
            tags[record.SELECTION_EDGE] = edge_text(out["edges"])
        headline_ci = f"{headline.test}_ci_low"
        if headline.test in out["metrics"] and headline_ci not in out["metrics"]:
            tags[record.INTERVAL] = interval_note(out["metrics"], cell)
        with_retries(log_batch, client, run_id, params=cell_params(cell), metrics=out["metrics"], tags=tags)
        buf = io.StringIO()
        out["predictions"].to_csv(buf, index=False)
        client.log_text(run_id, buf.getvalue(), record.PREDICTIONS)
        with_retries(client.set_terminated, run_id, "FINISHED")
    except BaseException as e:
        tb = traceback.format_exc()
        user = user_error_of(e)  # a user error is recorded as its message; anything else as its last line
        why = describe(user) if user is not None else tb.strip().splitlines()[-1]
        try:
            client.log_text(run_id, tb, record.TRACEBACK)
            with_retries(client.set_tag, run_id, record.ERROR, why[:5000])
            with_retries(client.set_terminated, run_id, "FAILED")
        finally:
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
