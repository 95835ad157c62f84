"""Run a sweep: plan -> MLflow parent run -> extraction stage (Ray tasks) -> trials (Ray Tune)
-> summary -> analysis attached to the parent run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import tune

from dinoscale.spec import SweepSpec
from dinoscale.sweep.display import console, print_banner, print_plan, print_summary, provenance_lines
from dinoscale.sweep.plan import Plan, build_plan
from dinoscale.tracking import (
    DEMO_NOTE, ROLE, SWEEP_ID, default_artifact_location, ensure_experiment, git_commit, log_batch, resolve_tracking_uri,
)


@dataclass
class SweepOutcome:
    plan: Plan
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    rows: list[dict]
    extraction: object
    wall_seconds: float
    report_dir: Path | None


def _init_ray(spec: SweepSpec, address: str | None) -> None:
    import ray

    address = address or spec.ray.address
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        import dinoscale

        # Ship the project to the workers of an existing cluster.
        ray.init(address=address, runtime_env={"py_modules": [str(Path(dinoscale.__file__).parent)]}, log_to_driver=False)
    else:
        ray.init(num_cpus=spec.ray.num_cpus, include_dashboard=False, log_to_driver=False)


def provenance_tags(plan: Plan) -> dict[str, str]:
    spec = plan.spec
    ds = plan.dataset
    tags = dict(ds.provenance) if ds else {}
    for split in ("train", "val", "test"):
        tags[f"data.manifest_digest.{split}"] = ds.manifest_digest(split)
    kinds = sorted({b.weights_kind for b in {c.backbone for c in plan.cells}})
    demo = spec.is_demo or ds.is_phantom or "random" in kinds
    tags.update({
        "dinoscale.profile": spec.profile,
        "dinoscale.modality": spec.modality,
        "dinoscale.demo": str(demo).lower(),
        "weights.kinds": ",".join(kinds),
    })
    if demo:
        tags["dinoscale.note"] = DEMO_NOTE
    return tags


def run_sweep(spec: SweepSpec, project_dir: Path | None = None, address: str | None = None,
              analyze: bool = True, quiet: bool = False) -> SweepOutcome:
    import ray
    from mlflow.tracking import MlflowClient

    from dinoscale.sweep.extraction import run_extraction_stage
    from dinoscale.sweep.trial import SplitLabels, SweepContext, cell_trainable

    t0 = time.perf_counter()
    project_dir = (project_dir or Path.cwd()).resolve()
    plan = build_plan(spec, project_dir, require_data=True)
    if not quiet:
        print_banner(plan)
        print_plan(plan)

    tracking_uri = resolve_tracking_uri(spec.tracking.uri, project_dir)
    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(client, spec.experiment_name, spec.tracking.artifact_location or default_artifact_location(tracking_uri))
    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = provenance_tags(plan)
    parent = client.create_run(exp_id, run_name=sweep_id, tags={
        **tags, SWEEP_ID: sweep_id, ROLE: "sweep", "dinoscale.spec_digest": spec.digest(),
        "mlflow.source.git.commit": git_commit(project_dir),
    })
    parent_id = parent.info.run_id
    client.log_text(parent_id, spec.resolved_yaml(), "spec/resolved.yaml")
    log_batch(client, parent_id, params={
        "sweep": spec.name, "dataset": spec.dataset.name, "backbones": ",".join(b.name for b in spec.backbones),
        "resolutions": ",".join(map(str, spec.resolutions)), "probes": ",".join(p.kind for p in spec.probes),
        "strategies": ",".join(spec.strategies), "seeds": ",".join(map(str, spec.seeds)), "cells": len(plan.cells),
    })
    if not quiet:
        console.print(f"MLflow: experiment '{spec.experiment_name}', parent run {parent_id} ({tracking_uri})")

    try:
        _init_ray(spec, address)
        # -- extraction stage: every missing feature set exactly once
        if not quiet:
            console.print(f"[bold]Extraction stage:[/bold] {len(plan.missing)} feature set(s) to extract, "
                          f"{len(plan.feature_sets) - len(plan.missing)} cached")
        on_done = None if quiet else (lambda r: console.print(
            f"  extracted {r['job']}: {r['images']} images in {r['forward_seconds']:.1f}s on {r['device']}"))
        res = spec.resources
        extraction = run_extraction_stage(plan, plan.storage / "features", res.cpus_per_extraction, res.gpus_per_extraction, on_done)
        log_batch(client, parent_id, metrics={
            "extraction_feature_sets_extracted": extraction.feature_sets_extracted,
            "extraction_feature_sets_cached": extraction.feature_sets_cached,
            "extraction_images_forwarded": extraction.images,
            "extraction_forward_seconds": extraction.forward_seconds,
            "extraction_wall_seconds": extraction.wall_seconds,
        })
        if not quiet:
            console.print(f"  {extraction.feature_sets_extracted} extracted, {extraction.feature_sets_cached} cached, "
                          f"{extraction.images} image forward passes, {extraction.wall_seconds:.1f}s wall")

        # -- trial stage: one Ray Tune trial per cell
        ds = plan.dataset
        ctx = SweepContext(
            spec_json=spec.model_dump(mode="json"),
            cells={c.id: c for c in plan.cells},
            classes=ds.classes,
            splits={s: SplitLabels(ds.split(s)["sample_id"].astype(str).tolist(), ds.split(s)["patient_id"].astype(str).to_numpy(),
                                   ds.labels(s)) for s in ("train", "val", "test")},
            store_root=str(plan.storage / "features"),
            tracking_uri=tracking_uri,
            experiment_id=exp_id,
            parent_run_id=parent_id,
            run_tags={**tags, SWEEP_ID: sweep_id},
        )
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        resources = {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial if has_gpu else 0}
        trainable = tune.with_resources(tune.with_parameters(cell_trainable, ctx=ctx), resources)
        t_trials = time.perf_counter()
        if not quiet:
            console.print(f"[bold]Trial stage:[/bold] {len(plan.cells)} trials on Ray Tune ({resources})")
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search([c.id for c in plan.cells])},
            tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent_trials, reuse_actors=True),
            run_config=tune.RunConfig(
                name=sweep_id,
                storage_path=str(plan.storage / "tune"),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=0,
                callbacks=[] if quiet else [_ProgressCallback(len(plan.cells))],
            ),
        )
        grid = tuner.fit()
        trials_seconds = time.perf_counter() - t_trials
        rows = _collect_rows(plan, grid)
        n_failed = sum(r["state"] != "FINISHED" for r in rows)
        log_batch(client, parent_id, metrics={
            "trials_total": len(rows), "trials_failed": n_failed, "trials_wall_seconds": trials_seconds,
            "sweep_wall_seconds": time.perf_counter() - t0,
            **_best_metrics(rows),
        })
        if not quiet:
            print_summary(rows, f"{spec.name}: test macro AUROC with patient-level {int(spec.metrics.bootstrap.level * 100)}% bootstrap CI"
                          + (" - DEMO (phantom data / random weights)" if tags.get("dinoscale.demo") == "true" else ""))
        report_dir = None
        if analyze:
            from dinoscale.analysis import analyze_sweep

            report_dir = analyze_sweep(tracking_uri, spec.experiment_name, parent_id, project_dir / "reports" / spec.modality,
                                       provenance=provenance_lines(plan), quiet=quiet)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    wall = time.perf_counter() - t0
    client.log_metric(parent_id, "sweep_wall_seconds", wall)
    if not quiet:
        console.print(f"Sweep finished in {wall:.0f}s: {len(rows) - n_failed}/{len(rows)} cells ok. "
                      f"Browse with `make ui`; report: {report_dir / 'report.md' if report_dir else '-'}")
    return SweepOutcome(plan, parent_id, exp_id, tracking_uri, rows, extraction, wall, report_dir)


class _ProgressCallback(tune.Callback):
    """Prints one line per finished or failed cell (Tune's own table is switched off)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        auroc = r.get("test_macro_auroc")
        msg = (f"{auroc:.3f} [{r.get('test_macro_auroc_ci_low', np.nan):.3f}, {r.get('test_macro_auroc_ci_high', np.nan):.3f}]"
               if auroc is not None else "-")
        console.print(f"  [{self.done}/{self.total}] {trial.config['cell']}: test macro AUROC {msg}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        console.print(f"  [{self.done}/{self.total}] [red]{trial.config['cell']} FAILED[/red] (traceback in its MLflow run)")


def _collect_rows(plan: Plan, grid) -> list[dict]:
    rows = []
    for result in grid:
        cid = result.config["cell"] if result.config else None
        cell = plan.cell(cid)
        m = result.metrics or {}
        rows.append({
            "cell": cid, "backbone": cell.backbone.name, "n_params": cell.backbone.n_params,
            "resolution": cell.resolution, "probe": cell.probe, "strategy": cell.strategy, "seed": cell.seed,
            "state": "FINISHED" if result.error is None and "test_macro_auroc" in m else "FAILED",
            "test_macro_auroc": m.get("test_macro_auroc"), "test_macro_auroc_ci_low": m.get("test_macro_auroc_ci_low"),
            "test_macro_auroc_ci_high": m.get("test_macro_auroc_ci_high"), "val_macro_auroc": m.get("val_macro_auroc"),
            "selected": ", ".join(f"{k[9:]}={m[k]:g}" for k in sorted(m) if k.startswith("selected_")),
            "mlflow_run_id": m.get("mlflow_run_id"),
        })
    return rows


def _best_metrics(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["state"] == "FINISHED"]
    if not ok:
        return {}
    best = max(ok, key=lambda r: r["val_macro_auroc"])  # chosen on val, reported on test
    return {"best_val_macro_auroc": best["val_macro_auroc"], "best_cell_test_macro_auroc": best["test_macro_auroc"]}
