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
    """One split as the metric sees it: one entry per unit scored (an image, a volume or a slide)."""

    sample_ids: list[str]
    patient_ids: np.ndarray
    labels: np.ndarray  # (n, C); (n, 0) for segmentation tasks
    paths: list[str] = field(default_factory=list)  # image files, for strategies that train the encoder
    members: list[list[str]] | None = None  # MIL: the feature rows (tiles) of each slide
    n_slices: list[int] | None = None  # volumes: slices per volume (feature rows '<id>#<k>')
    mask_paths: list[str] | None = None  # segmentation: label map of each image / volume

    def row_groups(self, view: str) -> list[list[str]]:
        """The feature-store row ids that make up each unit, for a feature set of ``view``."""
        from dinoscale.sweep.extraction import slice_row_ids

        if view == "slices":
            return [slice_row_ids([sid], [n]) for sid, n in zip(self.sample_ids, self.n_slices)]
        if self.members is not None:
            return self.members
        return [[sid] for sid in self.sample_ids]


def split_labels(ds, split: str) -> SplitLabels:
    """The units of a prepared dataset's split: rows of the manifest, or slides (bags of tile rows)."""
    from dinoscale.sweep.extraction import volume_paths

    df = ds.split(split)
    ids = df["sample_id"].astype(str)
    if ds.task == "mil":
        df = df.assign(bag_id=df["bag_id"].astype(str), sample_id=ids)
        mixed = df.groupby("bag_id")[ds.classes].nunique().gt(1).any(axis=1)
        if mixed.any():
            raise ValueError(f"slide(s) {list(mixed.index[mixed])[:5]} have tiles with different slide labels")
        first = df.drop_duplicates("bag_id")  # slides in order of first appearance
        members = df.groupby("bag_id", sort=False)["sample_id"].apply(list)
        return SplitLabels(first["bag_id"].tolist(), first["patient_id"].astype(str).to_numpy(),
                           first[ds.classes].to_numpy(dtype="float32"), [], members=members.loc[first["bag_id"]].tolist())
    return SplitLabels(
        ids.tolist(), df["patient_id"].astype(str).to_numpy(),
        df[ds.classes].to_numpy(dtype="float32") if ds.classes else np.zeros((len(df), 0), np.float32),
        df["path"].tolist(),
        n_slices=df["n_slices"].astype(int).tolist() if "n_slices" in df.columns else None,
        mask_paths=(volume_paths(df, "path", "mask_key") if "mask_key" in df.columns
                    else df["mask_path"].tolist() if "mask_path" in df.columns else None),
    )


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
    task: str = "multilabel"  # the dataset's task (dinoscale.data.TASKS): decides the probe inputs and the headline
    mask_labels: dict[int, str] = field(default_factory=dict)  # segmentation: mask value -> structure

    @property
    def spec(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec_json)


def _load_rows(store: FeatureStore, digest: str, split: str, groups: list[list[str]]) -> list[np.ndarray]:
    """The cached rows of each unit (in unit order), checked against what the manifest lists."""
    fs = store.get(digest)
    index = {sid: i for i, sid in enumerate(fs.sample_ids)}
    wanted = [sid for g in groups for sid in g]
    if len(index) != len(fs.sample_ids) or len(wanted) != len(index) or any(sid not in index for sid in wanted):
        raise RuntimeError(f"feature set {digest} ({split}) lists other samples than the manifest; extract again")
    x = fs.features
    return [x[[index[sid] for sid in g]] for g in groups]


def _probe_inputs(cell: Cell, ctx: SweepContext, store: FeatureStore, split: str, view: str):
    """The probe's input for one split: ``Split`` (one feature row per unit), ``BagSplit`` (rows grouped
    per volume / slide) or ``SegSplit`` (slice grids stacked per volume + label maps)."""
    from dinoscale.probes import BagSplit, SegSplit
    from dinoscale.sweep.plan import BAG_PROBES, DENSE_PROBES

    labels = ctx.splits[split]
    rows = _load_rows(store, dict(cell.feature_keys)[split], split, labels.row_groups(view))
    if cell.probe in DENSE_PROBES:
        from dinoscale.data.masks import load_label_maps

        x = _stack(rows, labels, "feature maps")
        if view == "images":
            x = x[:, 0]  # (n, D, h, w): one 2D image per unit
        n_classes = _probe_spec(cell, ctx.spec).n_classes if cell.probe == "segmentation" else None
        y = load_label_maps(labels.mask_paths, labels.n_slices if view == "slices" else None, n_classes)
        return SegSplit(x.astype(np.float32), y, labels.patient_ids)
    if cell.probe in BAG_PROBES:
        return BagSplit([r.astype(np.float32) for r in rows], labels.labels)
    return Split(np.concatenate(rows).astype(np.float32), labels.labels)


def _probe_spec(cell: Cell, spec: SweepSpec):
    return next(p for p in spec.probes if p.kind == cell.probe)


def _stack(rows: list[np.ndarray], labels: SplitLabels, what: str) -> np.ndarray:
    shapes = {r.shape for r in rows}
    if len(shapes) > 1:
        first = rows[0].shape
        odd = next(i for i, r in enumerate(rows) if r.shape != first)
        raise ValueError(f"{what}: volume {labels.sample_ids[odd]} has shape {rows[odd].shape}, {labels.sample_ids[0]} "
                         f"{first}; segmentation cells stack volumes, so every volume needs the same number of slices "
                         "(resample or crop the volumes to one shape)")
    return np.stack(rows)


def evaluate_cell(cell: Cell, ctx: SweepContext, checkpoint_root: str | None = None, on_epoch=None) -> dict:
    if cell.strategy in TRAINING_STRATEGIES:
        return evaluate_finetune_cell(cell, ctx, checkpoint_root, on_epoch)
    from dinoscale.sweep.plan import feature_view

    spec = ctx.spec
    store = FeatureStore(ctx.store_root)
    view = feature_view(ctx.splits["train"].n_slices is not None, cell.probe)
    t0 = time.perf_counter()
    train, val, test = (_probe_inputs(cell, ctx, store, s, view) for s in ("train", "val", "test"))
    t_load = time.perf_counter() - t0
    probe_spec = _probe_spec(cell, spec)
    t1 = time.perf_counter()
    if spec.search.n_trials > 1:
        from dinoscale.search import search_probe

        result, _ = search_probe(probe_spec, train, val, test, n_trials=spec.search.n_trials, seed=spec.search.seed + cell.seed)
    else:
        result = run_probe(probe_spec, train, val, test, seed=cell.seed)
    t_probe = time.perf_counter() - t1
    dim = train.x[0].shape[-1] if isinstance(train.x, list) else train.x.shape[-3 if train.x.ndim >= 4 else 1]
    extra = {"feature_dim": dim, "probe_candidates": result.candidates, "time_feature_load_s": t_load,
             "time_probe_s": t_probe, "search_trials": spec.search.n_trials}
    if ctx.task in ("segmentation", "instance_segmentation"):
        return _scored_dense(cell, ctx, result.test_scores, test.y, result.val_metric, result.selected, extra)
    return _scored(cell, ctx, result.test_scores, result.val_metric, result.selected, extra)


def _axes(cell: Cell, ctx: SweepContext) -> dict:
    """Numeric sweep axes mirrored as metrics (MLflow sorts params as strings), and the split sizes."""
    test = ctx.splits["test"]
    return {
        "n_params": cell.backbone.n_params,
        "resolution": cell.resolution,
        "tokens_per_image": cell.backbone.tokens_per_image(cell.resolution),
        "gflops_per_image": cell.backbone.gflops_per_image(cell.resolution),  # the compute axis
        "seed": cell.seed,
        "n_train": len(ctx.splits["train"].sample_ids), "n_val": len(ctx.splits["val"].sample_ids), "n_test": len(test.sample_ids),
        "n_test_patients": len(set(test.patient_ids)),
    }


def _selected_metrics(selected: dict) -> dict:
    return {f"selected_{k}": v for k, v in selected.items() if isinstance(v, (int, float))}


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
        **_axes(cell, ctx),
        "bootstrap_resamples_valid": ci.resamples,
        **extra,
        **_selected_metrics(selected),
    }
    predictions = pd.DataFrame({"sample_id": test_labels.sample_ids, "patient_id": test_labels.patient_ids})
    for j, c in enumerate(ctx.classes):
        predictions[f"label_{c}"] = y[:, j].astype(int)
        predictions[f"score_{c}"] = test_scores[:, j]
    return {"metrics": metrics, "selected": selected, "predictions": predictions}


def _scored_dense(cell: Cell, ctx: SweepContext, pred: np.ndarray, target: np.ndarray, val_metric: float, selected: dict,
                  extra: dict) -> dict:
    """Segmentation (Dice, per class, HD95) or EM instances (VOI, ARAND): per-volume values, their means
    with patient-level intervals, and the per-volume table as the run's predictions."""
    from dinoscale.headline import headline_for_task
    from dinoscale.metrics import instance_per_volume, segmentation_per_volume, summarise_per_volume

    bs = ctx.spec.metrics.bootstrap
    test = ctx.splits["test"]
    head = headline_for_task(ctx.task)
    if ctx.task == "segmentation":
        n_classes = _probe_spec(cell, ctx.spec).n_classes
        names = [ctx.mask_labels.get(c, str(c)) for c in range(1, n_classes)]
        values = segmentation_per_volume(pred, target, n_classes, names)
    else:
        values = instance_per_volume(pred, target)
    metrics = {
        **summarise_per_volume(values, test.patient_ids, bs.resamples, bs.level, bs.seed),
        head.val: val_metric if head.goal == "max" else -val_metric,  # probes maximise: VOI is selected as -VOI
        **_axes(cell, ctx),
        "n_test_volumes_scored": int(np.isfinite(values[head.name]).sum()),
        **extra,
        **_selected_metrics(selected),
    }
    if head.test not in metrics:
        raise RuntimeError(f"no test volume has a defined {head.name} (every volume empty in both prediction and mask)")
    predictions = pd.DataFrame({"sample_id": test.sample_ids, "patient_id": test.patient_ids, **values})
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
    from dinoscale.sweep.plan import volume_window

    transform = build_transform(cell.resolution, bb.mean, bb.std, spec.features.interpolation, volume_window(spec))
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

    from dinoscale.headline import headline_for_task
    from dinoscale.tracking import finished_child_metrics, find_or_create_child, log_batch, with_retries

    t_start = time.perf_counter()
    cell = ctx.cells[config["cell"]]
    client = MlflowClient(ctx.tracking_uri)
    headline = headline_for_task(ctx.task)
    done = with_retries(finished_child_metrics, client, ctx.experiment_id, ctx.parent_run_id, cell.trial_key, headline.test)
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
