"""The trial stage's shared work, and the frozen cells.

What every trial shares: the sweep's context shipped to the workers (``SweepContext``), the cell's
replicate draw (``replicate_units``), scoring test as the task says with its patient-level interval
(``scored``), and the MLflow record of a cell's run (``run_tags``, ``log_cell_result``,
``record_failure``, ``cell_params``). A frozen cell is one trial: read cached features, fit the probe
(selected on val), score test, and record it all in the cell's child run (``evaluate_cell``,
``cell_trainable``). The search of a training strategy's cell (lora, full, ...) is
``dinoscale.sweep.finetune``; what Ray Tune runs for either is ``dinoscale.sweep.units``.

A trial reads only its resolved ``Cell`` (``dinoscale.sweep.cell``) and the dataset's units: the
plan has decided everything else. The probe's descriptor says what input it reads, the task's
descriptor how its output is scored. ``evaluate_cell`` is a plain function (testable without Ray);
``cell_trainable`` wraps it with the MLflow run and ``tune.report``.
"""

from __future__ import annotations

import io
import time
import traceback
from dataclasses import dataclass, field, replace

import numpy as np
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from dinoscale import pseudonym, record
from dinoscale.data import SplitUnits
from dinoscale.data.splits import replicate_indices
from dinoscale.data.volumes import native_pairs, native_predictions
from dinoscale.errors import describe, user_error_of
from dinoscale.features import FeatureStore
from dinoscale.memory import PeakRSS
from dinoscale.probes import SegSplit, get_probe, run_probe
from dinoscale.search import search_probe
from dinoscale.sweep.cell import Cell
from dinoscale.sweep.external import cut_outputs, external_metrics, with_external_rows
from dinoscale.sweep.inputs import label_spacing, probe_inputs, repartition
from dinoscale.tasks import Scoring, UndefinedMetric, get_task
from dinoscale.tracking import find_or_create_child, finished_child_metrics, log_batch, with_retries


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
    checkpoint_root: str | None = None  # training cells' checkpoints, keyed by trial key (on shared storage)
    mask_labels: dict[int, str] = field(default_factory=dict)  # segmentation: mask value -> structure
    sources: dict = field(default_factory=dict)  # split -> RowSources, for online features (PET channels)
    cell_runs: dict[str, str] = field(default_factory=dict)  # training cell id -> its MLflow run (opened first)
    schedule_state: str | None = None  # the early-stopping scheduler's rungs and stops (dinoscale.sweep.schedule)
    pseudonym_key: bytes | None = None  # identifiers in logged predictions are keyed hashes (dinoscale.pseudonym)
    externals: dict[str, SplitUnits] = field(default_factory=dict)  # external test set label -> its units
    external_classes: dict[str, list[str]] = field(default_factory=dict)  # label -> internal classes it maps onto


def _probe_inputs(cell: Cell, ctx: SweepContext, store: FeatureStore, split: str, probe_spec):
    """The probe's input for one split (``dinoscale.sweep.inputs``): views of the memory-mapped store, read
    a mini-batch at a time above the trial's memory budget, or online features."""
    return probe_inputs(cell, ctx.splits[split], store, split, probe_spec, ctx.sources.get(split))


def replicate_units(cell: Cell, ctx: SweepContext) -> tuple[SplitUnits, SplitUnits, np.ndarray, np.ndarray]:
    """The cell's replicate: its train and val units and their positions in the dataset's train + val units."""
    train, val = ctx.splits["train"], ctx.splits["val"]
    both = SplitUnits.concat(train, val)
    tr_idx, va_idx = replicate_indices(
        train.patient_ids, val.patient_ids, cell.replicate, train.folds, val.folds, labels=both.labels
    )
    return both.take(tr_idx), both.take(va_idx), tr_idx, va_idx


def scoring_of(cell: Cell, ctx: SweepContext, n_classes: int | None = None, split: str = "test") -> Scoring:
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
        macro_min_patients=b.get(record.MACRO_MIN_PATIENTS, 5),
        min_interval_units=b.get("min_interval_units", 10),
    )


def evaluate_cell(cell: Cell, ctx: SweepContext) -> dict:
    """A frozen cell: its probe fitted on cached features (searched on val when ``search.n_trials > 1``), test
    scored. A training cell's search is ``dinoscale.sweep.finetune.evaluate_finetune_cell``."""
    if cell.trains_encoder:
        raise TypeError(f"{cell.id} trains the encoder: its search is dinoscale.sweep.finetune.evaluate_finetune_cell")
    probe_spec = get_probe(cell.probe).spec.model_validate(cell.probe_config)
    store = FeatureStore(ctx.store_root)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        train, val, test = (_probe_inputs(cell, ctx, store, s, probe_spec) for s in ("train", "val", "test"))
        rep_train, rep_val, tr_idx, va_idx = replicate_units(cell, ctx)
        if cell.replicate.get("mode", "dataset") != "dataset" or cell.replicate.get("train"):
            train, val = repartition(train, val, tr_idx, va_idx)
        test, sizes = with_external_rows(
            cell, ctx.externals, ctx.external_classes, ctx.classes, store, test, probe_spec
        )
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        n_trials = cell.search.get("n_trials", 1)
        if n_trials > 1:
            result, _ = search_probe(
                probe_spec, train, val, test, n_trials=n_trials, seed=cell.search.get("seed", 0) + cell.seed
            )
        else:
            result = run_probe(probe_spec, train, val, test, seed=cell.seed)
        t_probe = time.perf_counter() - t1
        test_scores, ext_scores = cut_outputs(result.test_scores, sizes)
        dim = train.x[0].shape[-1] if isinstance(train.x, list) else train.x.shape[-3 if train.x.ndim >= 4 else 1]
        target = test.y if isinstance(test, SegSplit) else None
        out = scored(
            cell,
            ctx,
            test_scores,
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
            val_scores=result.val_scores,
        )
    out["edges"] = {k: (result.selected.get(k), where) for k, where in result.edges.items()}
    out["metrics"].update(_memory_metrics(cell, peak))
    ext = (ctx.externals, ctx.external_classes, ctx.classes, ext_scores, cell.bootstrap)
    out["metrics"].update(external_metrics(ctx.splits["test"], test_scores, *ext))
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
        record.TOKENS_PER_IMAGE: cell.backbone.tokens_per_image(cell.resolution),
        record.GFLOPS_PER_IMAGE: cell.gflops_per_image,  # the compute axis
        "n_train": len(ctx.splits["train"].sample_ids),
        "n_val": len(ctx.splits["val"].sample_ids),
        "n_test": len(test.sample_ids),
        "n_test_patients": len(set(test.patient_ids)),
        # the label-efficiency axis' x: the patients the cell's replicate trained on (its subset, if any)
        record.N_TRAIN_PATIENTS: len(set(replicate_units(cell, ctx)[0].patient_ids)),
    }


def scored(
    cell: Cell,
    ctx: SweepContext,
    test_output: np.ndarray,
    target,
    val_metric: float,
    selected: dict,
    extra: dict,
    n_classes: int | None = None,
    val_scores: np.ndarray | None = None,
) -> dict:
    """Test metrics as the task scores them (with their patient-level interval), the val metric (with its
    interval over the val patients where the probe gives its val outputs), the mirrored axes and the per-unit
    predictions table."""
    task = get_task(cell.task)
    scoring = scoring_of(cell, ctx, n_classes)
    test = ctx.splits["test"]
    grid = test.volume.grid if test.volume is not None else None
    if task.dense and target is not None and grid is not None and test.native is not None:
        # volumes on a common grid: predictions mapped back to each volume's native grid and scored against
        # its native label map with its native spacing (metrics in mm on the data as published)
        to_native = native_pairs if task.paired else native_predictions
        test_output, target, spacing = to_native(test_output, test.masks, test.native, grid)
        scoring = replace(scoring, spacing=spacing)
    metrics, predictions = task.score(test_output, target, scoring)
    metrics = {
        **metrics,
        **task.val_metrics(val_metric),
        **val_interval(cell, ctx, val_scores, n_classes),
        **_axes_metrics(cell, ctx),
        **extra,
        **{f"selected_{k}": v for k, v in selected.items() if isinstance(v, (int, float))},
    }
    return {"metrics": metrics, "selected": selected, "predictions": predictions, "edges": {}}


def val_interval(cell: Cell, ctx: SweepContext, val_scores: np.ndarray | None, n_classes: int | None) -> dict:
    """The headline's val metric interval (``<val metric>_ci_low / _ci_high``): the chosen configuration's val
    outputs scored as test is, resampling the val patients of the cell's replicate. Empty for dense tasks (their
    val is the training objective's) and probes that do not give val outputs."""
    task = get_task(cell.task)
    if val_scores is None or task.dense:
        return {}
    try:
        val_scored, _ = task.score(val_scores, None, scoring_of(cell, ctx, n_classes, "val"))
    except UndefinedMetric:  # a val split too small for the metric (no class with both kinds of patient)
        return {}
    h = task.headline
    bounds = zip(record.ci_names(h.val), record.ci_names(h.test))
    return {name: val_scored[of] for name, of in bounds if val_scored.get(of) is not None}


def interval_note(metrics: dict, cell: Cell) -> str:
    units = int(metrics.get("interval_units", 0))
    need = cell.bootstrap.get("min_interval_units", 10)
    return f"no interval: {units} test unit(s) (patients), fewer than {need}"


def cell_params(cell: Cell) -> dict:
    """What a cell's run logs as params: its id, its grid axes and its protocol constants."""
    return {"cell": cell.id, **cell.axes, **cell.params}


def run_tags(cell: Cell, ctx: SweepContext) -> dict:
    """The tags of every run of a cell: the sweep's, the cell, its weights and recipe, where Ray runs it."""
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
    t_start = time.perf_counter()
    client = MlflowClient(ctx.tracking_uri)
    headline = get_task(cell.task).headline
    done = with_retries(
        finished_child_metrics, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, headline.test
    )
    if done is not None:
        tune.report({**done, "cell": cell.id, "reused_record": 1, "time_own_work_s": time.perf_counter() - t_start})
        return
    tags = {**run_tags(cell, ctx), record.FEATURE_KEYS: ",".join(f"{s}:{d}" for s, d in cell.feature_keys)}
    if cell.external_keys:
        tags[record.EXTERNAL_DIGEST] = ",".join(f"{label}:{d}" for label, d in cell.external_keys)
    run_id = with_retries(
        find_or_create_child, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, cell.id, tags
    )
    previous = client.get_run(run_id).data.tags.get(record.EVALUATIONS, "0")
    tags[record.EVALUATIONS] = str(int(previous) + 1)
    with_retries(log_batch, client, run_id, tags=tags)
    if ctx.dataset_inputs and previous == "0":
        with_retries(client.log_inputs, run_id, datasets=ctx.dataset_inputs)
    try:
        out = evaluate_cell(cell, ctx)
        log_cell_result(client, run_id, cell, out, ctx.pseudonym_key)
    except BaseException as e:
        record_failure(client, run_id, e)
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


def log_cell_result(client, run_id: str, cell: Cell, out: dict, pseudonym_key: bytes | None = None) -> None:
    """A cell's result in its run: params, metrics, selected values (tags), the predictions table; FINISHED."""
    headline = get_task(cell.task).headline
    tags = {f"{record.SELECTED_PREFIX}{k}": v for k, v in out["selected"].items()}
    if out.get("edges"):
        tags[record.SELECTION_EDGE] = edge_text(out["edges"])
    if headline.test in out["metrics"] and headline.test + record.CI_LOW not in out["metrics"]:
        tags[record.INTERVAL] = interval_note(out["metrics"], cell)
    with_retries(log_batch, client, run_id, params=cell_params(cell), metrics=out["metrics"], tags=tags)
    buf = io.StringIO()
    pseudonym.pseudonymize_frame(out["predictions"], pseudonym_key).to_csv(buf, index=False)
    client.log_text(run_id, buf.getvalue(), record.PREDICTIONS)
    with_retries(client.set_terminated, run_id, "FINISHED")


def record_failure(client, run_id: str, error: BaseException | None = None) -> None:
    """The traceback as an artifact; the error tag: a user error's message, else the traceback's last line."""
    tb = traceback.format_exc()
    user = user_error_of(error) if error is not None else None
    why = describe(user) if user is not None else tb.strip().splitlines()[-1]
    client.log_text(run_id, tb, record.TRACEBACK)
    with_retries(client.set_tag, run_id, record.ERROR, why[:5000])
    with_retries(client.set_terminated, run_id, "FAILED")
