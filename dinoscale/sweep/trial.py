"""One cell = one trial: read cached features, fit the probe (selected on val), score test with a
patient-level bootstrap interval, and record it all in the cell's MLflow child run.

``evaluate_cell`` is a plain function (testable without Ray); ``cell_trainable`` is what Ray Tune
runs: it wraps it with the MLflow child run and ``tune.report``.
"""

from __future__ import annotations

import io
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dinoscale.features import FeatureStore
from dinoscale.metrics import auroc_per_class, patient_bootstrap
from dinoscale.probes import Split, run_probe
from dinoscale.spec import SweepSpec
from dinoscale.sweep.plan import TRAINING_STRATEGIES, Cell


@dataclass
class SplitLabels:
    sample_ids: list[str]
    patient_ids: np.ndarray
    labels: np.ndarray  # (n, C)
    paths: list[str] = field(default_factory=list)  # image files, for strategies that train the encoder


@dataclass
class SweepContext:
    """Everything a trial needs, shipped once to the workers (``tune.with_parameters``)."""

    spec_json: dict
    cells: dict[str, Cell]
    classes: list[str]
    splits: dict[str, SplitLabels]
    store_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    run_tags: dict[str, str] = field(default_factory=dict)  # provenance etc., copied to every child
    dataset_inputs: list = field(default_factory=list)  # split manifests as MLflow datasets
    checkpoint_root: str | None = None  # lora / full checkpoints, keyed by trial key (on shared storage)

    @property
    def spec(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec_json)


def _load_split(store: FeatureStore, digest: str, split: str, labels: SplitLabels) -> Split:
    fs = store.get(digest)
    if fs.sample_ids != labels.sample_ids:
        raise RuntimeError(f"feature set {digest} ({split}) lists other samples than the manifest; extract again")
    return Split(fs.features.astype(np.float32), labels.labels)


def evaluate_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None = None, on_epoch=None) -> dict:
    if cell.strategy in TRAINING_STRATEGIES:
        return evaluate_finetune_cell(cell, ctx, checkpoint_root, on_epoch)
    spec = ctx.spec
    store = FeatureStore(ctx.store_root)
    keys = dict(cell.feature_keys)
    t0 = time.perf_counter()
    train, val, test = (_load_split(store, keys[s], s, ctx.splits[s]) for s in ("train", "val", "test"))
    t_load = time.perf_counter() - t0
    probe_spec = next(p for p in spec.probes if p.kind == cell.probe)
    t1 = time.perf_counter()
    if spec.search.n_trials > 1:
        from dinoscale.search import search_probe

        result, _ = search_probe(probe_spec, train, val, test, n_trials=spec.search.n_trials, seed=spec.search.seed + cell.seed)
    else:
        result = run_probe(probe_spec, train, val, test, seed=cell.seed)
    t_probe = time.perf_counter() - t1
    extra = {"feature_dim": train.x.shape[1], "probe_candidates": result.candidates, "time_feature_load_s": t_load,
             "time_probe_s": t_probe, "search_trials": spec.search.n_trials}
    return _scored(cell, ctx, result.test_scores, result.val_metric, result.selected, extra)


def _scored(cell: Cell, ctx: SweepContext, test_scores: np.ndarray, val_metric: float, selected: dict, extra: dict) -> dict:
    """Test metrics with the patient-level interval, the mirrored axes, and per-sample predictions."""
    bs = ctx.spec.metrics.bootstrap
    test_labels = ctx.splits["test"]
    y = test_labels.labels
    ci = patient_bootstrap(y, test_scores, test_labels.patient_ids, resamples=bs.resamples, level=bs.level, seed=bs.seed)
    per_class = auroc_per_class(y, test_scores)
    metrics = {
        **ci.as_dict("test_macro_auroc"),
        "val_macro_auroc": val_metric,
        **{f"test_auroc_{c}": float(v) for c, v in zip(ctx.classes, per_class) if np.isfinite(v)},
        # numeric axes mirrored as metrics (MLflow sorts params as strings)
        "n_params": cell.backbone.n_params,
        "resolution": cell.resolution,
        "tokens_per_image": cell.backbone.tokens_per_image(cell.resolution),
        "gflops_per_image": cell.backbone.gflops_per_image(cell.resolution),  # the compute axis
        "seed": cell.seed,
        "n_train": len(ctx.splits["train"].labels), "n_val": len(ctx.splits["val"].labels), "n_test": len(y),
        "n_test_patients": len(set(test_labels.patient_ids)),
        "bootstrap_resamples_valid": ci.resamples,
        **extra,
        **{f"selected_{k}": v for k, v in selected.items() if isinstance(v, (int, float))},
    }
    predictions = pd.DataFrame({"sample_id": test_labels.sample_ids, "patient_id": test_labels.patient_ids})
    for j, c in enumerate(ctx.classes):
        predictions[f"label_{c}"] = y[:, j].astype(int)
        predictions[f"score_{c}"] = test_scores[:, j]
    return {"metrics": metrics, "selected": selected, "predictions": predictions}


class _LabelledImages(torch.utils.data.Dataset):
    def __init__(self, split: SplitLabels, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, i: int):
        return self.transform(self.split.paths[i]), torch.as_tensor(self.split.labels[i], dtype=torch.float32)


def evaluate_finetune_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None, on_epoch=None) -> dict:
    """lora / full: train the encoder + a linear head on images (early-stopped on val), score test.

    Checkpoints go under ``<checkpoint_root>/<trial key>`` so a retried or resumed trial continues
    from its last epoch instead of restarting.
    """
    from dinoscale.data.preprocess import build_transform
    from dinoscale.models import load_backbone
    from dinoscale.train import FinetuneConfig, build_classifier, finetune, predict

    spec = ctx.spec
    strategy_spec = getattr(spec.finetuning, cell.strategy)
    cfg = FinetuneConfig.from_spec(strategy_spec, seed=cell.seed)
    bb = load_backbone(cell.backbone.name, cell.backbone.weights, cell.backbone.weights_seed)
    model = build_classifier(bb.model, len(ctx.classes), cfg, num_prefix_tokens=bb.num_prefix_tokens)
    transform = build_transform(cell.resolution, bb.mean, bb.std, spec.features.interpolation)
    train_ds, val_ds, test_ds = (_LabelledImages(ctx.splits[s], transform) for s in ("train", "val", "test"))
    ckpt = str(Path(checkpoint_root) / cell.trial_key) if checkpoint_root else None
    t0 = time.perf_counter()
    res = finetune(model, train_ds, val_ds, cfg, checkpoint_dir=ckpt, on_epoch=on_epoch)
    test_scores = predict(res.model, test_ds, batch_size=cfg.batch_size)
    n_trainable = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    extra = {"time_train_s": time.perf_counter() - t0, "epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
             "trainable_params": n_trainable, "resumed_from_epoch": -1 if res.resumed_from_epoch is None else res.resumed_from_epoch}
    selected = {"lr": cfg.lr, "best_epoch": res.best_epoch}
    return _scored(cell, ctx, test_scores, res.best_val, selected, extra)


def cell_params(cell: Cell, spec: SweepSpec) -> dict:
    if cell.strategy in TRAINING_STRATEGIES:
        probe = getattr(spec.finetuning, cell.strategy)
        prefix = cell.strategy
    else:
        probe = next(p for p in spec.probes if p.kind == cell.probe)
        prefix = "probe"
    params = {
        "cell": cell.id, "dataset": spec.dataset.name, "modality": spec.modality, "backbone": cell.backbone.name,
        "backbone_arch": cell.backbone.arch_id, "weights": cell.backbone.weights, "n_params": cell.backbone.n_params,
        "resolution": cell.resolution, "probe": cell.probe, "strategy": cell.strategy, "seed": cell.seed,
        "gflops_per_image": round(cell.backbone.gflops_per_image(cell.resolution), 4),
        "tokens": spec.features.tokens, "interpolation": spec.features.interpolation, "feature_dtype": spec.features.dtype,
        "bootstrap_resamples": spec.metrics.bootstrap.resamples, "bootstrap_level": spec.metrics.bootstrap.level,
    }
    params.update({f"{prefix}.{k}": v for k, v in probe.model_dump().items() if k != "kind"})
    return params


def cell_trainable(config: dict, ctx: SweepContext) -> None:
    """The Ray Tune function trainable for one cell.

    The MLflow record is checked first: a cell whose child run already FINISHED under this parent
    (a resumed sweep, a retry after its node died) reports the recorded metrics instead of redoing
    the work. Every evaluation increments the run's ``dinoscale.evaluations`` tag.
    """
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from dinoscale.tracking import finished_child_metrics, find_or_create_child, log_batch, with_retries

    t_start = time.perf_counter()
    cell = ctx.cells[config["cell"]]
    client = MlflowClient(ctx.tracking_uri)
    done = with_retries(finished_child_metrics, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, "test_macro_auroc")
    if done is not None:
        tune.report({**done, "cell": cell.id, "reused_record": 1, "time_own_work_s": time.perf_counter() - t_start})
        return
    trial_ctx = tune.get_context()
    tags = {
        **ctx.run_tags,
        "dinoscale.cell": cell.id,
        "weights.kind": cell.backbone.weights_kind,
        "weights.digest": cell.backbone.weights_digest,
        "ray.trial_id": trial_ctx.get_trial_id() or "",
        "ray.node_id": ray.get_runtime_context().get_node_id(),
        "features.keys": ",".join(f"{s}:{d}" for s, d in cell.feature_keys),
    }
    run_id = with_retries(find_or_create_child, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, cell.id, tags)
    previous = client.get_run(run_id).data.tags.get("dinoscale.evaluations", "0")
    tags["dinoscale.evaluations"] = str(int(previous) + 1)
    with_retries(log_batch, client, run_id, tags=tags)
    if ctx.dataset_inputs and previous == "0":
        with_retries(client.log_inputs, run_id, datasets=ctx.dataset_inputs)
    def report_epoch(epoch: int, record: dict) -> None:  # lora / full: intermediate val metric for the scheduler
        tune.report({"epoch": epoch, "val_macro_auroc": record.get("val_metric", float("nan")), "cell": cell.id})

    try:
        out = evaluate_cell(cell, ctx, checkpoint_root=ctx.checkpoint_root, on_epoch=report_epoch)
        with_retries(log_batch, client, run_id, params=cell_params(cell, ctx.spec), metrics=out["metrics"],
                     tags={f"selected.{k}": v for k, v in out["selected"].items()})
        buf = io.StringIO()
        out["predictions"].to_csv(buf, index=False)
        client.log_text(run_id, buf.getvalue(), "predictions/test.csv")
        with_retries(client.set_terminated, run_id, "FINISHED")
    except BaseException:
        tb = traceback.format_exc()
        try:
            client.log_text(run_id, tb, "error/traceback.txt")
            with_retries(client.set_tag, run_id, "dinoscale.error", tb.strip().splitlines()[-1][:500])
            with_retries(client.set_terminated, run_id, "FAILED")
        finally:
            raise
    tune.report({**out["metrics"], "mlflow_run_id": run_id, "cell": cell.id, "reused_record": 0,
                 "time_own_work_s": time.perf_counter() - t_start})
