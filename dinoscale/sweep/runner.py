"""Run a sweep: plan -> MLflow parent run -> extraction stage (Ray tasks) -> trials (Ray Tune)
-> summary -> analysis attached to the parent run.

A sweep leaves its state under ``<storage>/sweeps/<name>/`` so that ``resume=True`` finds its parent
run and Tune experiment again: finished cells are not rerun (Tune's state, and the MLflow record as a
second line of defence), cached feature sets are not extracted again, and every cell keeps exactly
one child run.

Nothing starts before the pre-flight (``dinoscale.sweep.preflight``: storage, tracking, weights, data) has
passed. SIGINT / SIGTERM stop the sweep cleanly (``dinoscale.sweep.interrupt``): the parent run and
unfinished cell runs are marked KILLED and ``SweepInterrupted`` says how to resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

import dinoscale
from dinoscale import pseudonym, record, settings
from dinoscale.analysis import report_folder
from dinoscale.console import capture_third_party, console, log_file
from dinoscale.data.external import EXTERNAL_SPLIT
from dinoscale.errors import (
    StorageError,
    SweepInterrupted,
    TrackingError,
    describe,
    environment_error,
    signal_name,
    user_error_of,
)
from dinoscale.features import FeatureStore
from dinoscale.mlflow_ui import browse_hint
from dinoscale.spec import SweepSpec
from dinoscale.sweep.budget import predicted_metrics
from dinoscale.sweep.cell import Cell, parse_unit
from dinoscale.sweep.describe import parent_description
from dinoscale.sweep.display import (
    ExtractionProgress,
    SweepProgress,
    extraction_unit,
    print_banner,
    print_plan,
    print_summary,
    progress_event,
)
from dinoscale.sweep.extraction import check_cluster_memory, cluster_has_gpus, extraction_record
from dinoscale.sweep.interrupt import SweepSignals
from dinoscale.sweep.plan import NotRunnableError, Plan, build_plan, check_runnable  # noqa: F401  (re-exported)
from dinoscale.sweep.preflight import (
    check_storage_on_nodes,
    failure_line,
    no_retries,
    preflight,
    tracking_failure_of,
    tracking_store_failure,
)
from dinoscale.sweep.state import SweepState, new_sweep_id
from dinoscale.tasks import get_task
from dinoscale.tracking import (
    default_artifact_location,
    ensure_experiment,
    git_commit,
    log_batch,
    resolve_tracking_uri,
    split_dataset_inputs,
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
    state: SweepState


def _init_ray(spec: SweepSpec, address: str | None) -> None:
    import ray

    address = settings.ray_address(spec.ray.address, address)  # flag > DINOSCALE_RAY_ADDRESS > RAY_ADDRESS > spec
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

        if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
            # Inside `ray job submit`: the job's runtime env already ships the code, and a second one
            # would make Ray delete the job's working dir under the running driver.
            ray.init(address=address, log_to_driver=False)
        else:
            # Ship the project to the workers of an existing cluster.
            ray.init(
                address=address, runtime_env={"py_modules": [str(Path(dinoscale.__path__[0]))]}, log_to_driver=False
            )
    else:
        # address="local": a fresh embedded Ray even when a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=spec.ray.num_cpus, include_dashboard=False, log_to_driver=False)


def sweep_log_path(spec: SweepSpec, project_dir: Path) -> Path:
    """Where a sweep's third-party logs and warnings go: ``<storage>/logs/<spec name>-<time>.log``."""
    from dinoscale.sweep.plan import storage_root

    return storage_root(spec.storage, project_dir) / "logs" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def trial_resources(cell: Cell, spec: SweepSpec, has_gpu: bool) -> dict[str, float]:
    """Frozen-encoder trials share a GPU (fraction); training trials take a whole one; CPU-only clusters: no GPU."""
    res = spec.resources
    gpu = res.gpus_per_training_trial if cell.trains_encoder else res.gpus_per_trial
    return {"CPU": res.cpus_per_trial, "GPU": gpu if has_gpu else 0}


def provenance_tags(plan: Plan) -> dict[str, str]:
    """The parent run's tags: provenance, task and headline, manifest digests."""
    spec, ds = plan.spec, plan.dataset
    tags = plan.provenance().tags()
    for split in ("train", "val", "test"):
        tags[record.MANIFEST_DIGEST_PREFIX + split] = ds.manifest_digest(split)
    tags.update({**get_task(ds.task).headline.tags(), record.TASK: ds.task, record.MODALITY: spec.modality})
    return tags


def _open_parent(
    client,
    spec: SweepSpec,
    plan: Plan,
    tracking_uri: str,
    project_dir: Path,
    resume: bool,
    dataset_inputs: list,
    annotations: dict[str, str] | None = None,
) -> SweepState:
    """Create the sweep's parent run, or find it again when resuming."""
    if resume:
        state = SweepState.for_resume(plan.storage, spec.name, spec.digest())
        client.update_run(state.parent_run_id, status="RUNNING")
        client.set_tag(state.parent_run_id, record.RESUMES, str(state.attempts - 1))
        return state
    exp_id = ensure_experiment(
        client, spec.experiment_name, spec.tracking.artifact_location or default_artifact_location(tracking_uri)
    )
    sweep_id = new_sweep_id(spec.name)
    commit = git_commit(project_dir)
    parent = client.create_run(
        exp_id,
        run_name=sweep_id,
        tags={
            **provenance_tags(plan),
            record.SWEEP_ID: sweep_id,
            record.ROLE: record.ROLE_SWEEP,
            record.SPEC_DIGEST: spec.digest(),
            record.SPEC_NAME: spec.name,
            record.DESCRIPTION: parent_description(plan),  # what the sweep is, in the MLflow runs table
            record.GIT_COMMIT: commit,
            **(annotations or {}),
        },
    )
    parent_id = parent.info.run_id
    client.log_text(parent_id, spec.resolved_yaml(), record.RESOLVED_SPEC)
    from dinoscale.sweep.protocol import protocol_data, protocol_markdown, recipes_data

    client.log_text(parent_id, protocol_markdown(plan), record.PROTOCOL)  # every constant, for a line-by-line reading
    client.log_dict(parent_id, protocol_data(plan), record.PROTOCOL_JSON)
    client.log_dict(parent_id, recipes_data(plan), record.FEATURE_RECIPES)  # how each feature set was computed
    log_batch(
        client,
        parent_id,
        params={
            "sweep": spec.name,
            record.DATASET_PARAM: spec.dataset.name,
            "backbones": ",".join(b.name for b in spec.backbones),
            "resolutions": ",".join(map(str, spec.resolutions)),
            "probes": ",".join(p.kind for p in spec.probes),
            "strategies": ",".join(spec.strategies),
            "seeds": ",".join(map(str, spec.seeds)),
            "cells": len(plan.cells),
            **(annotations or {}),
        },
    )
    client.log_inputs(parent_id, datasets=dataset_inputs)
    return SweepState(
        sweep_id,
        spec.name,
        spec.digest(),
        parent_id,
        exp_id,
        tracking_uri,
        str(plan.storage / "tune" / sweep_id),
        started=time.time(),
    )


def run_sweep(
    spec: SweepSpec,
    project_dir: Path | None = None,
    address: str | None = None,
    analyze: bool = True,
    quiet: bool = False,
    resume: bool = False,
    annotations: dict[str, str] | None = None,
    verbose: bool = False,
) -> SweepOutcome:
    """``annotations``: tags of the parent run (copied to every child when their names start with one of
    ``record.PROVENANCE_PREFIXES``), also logged as its params; a rehearsal records what it changed this way.
    ``verbose``: third-party logging and warnings on the terminal too (always in the sweep's log file)."""
    from mlflow.tracking import MlflowClient

    t0 = time.perf_counter()
    project_dir = (project_dir or Path.cwd()).resolve()
    plan, tracking_uri = _checked_plan(spec, project_dir, address, resume, quiet, verbose)
    client = MlflowClient(tracking_uri)
    dataset_inputs = split_dataset_inputs(plan.dataset)  # built once: the parent and every child log them
    state = _open_parent(client, spec, plan, tracking_uri, project_dir, resume, dataset_inputs, annotations)
    state.save(plan.storage)
    parent_id, step = state.parent_run_id, state.attempts - 1
    log_batch(client, parent_id, step=step, metrics=predicted_metrics(plan, address))  # beside what runs
    if not quiet:
        verb = f"resuming sweep {state.sweep_id} (attempt {state.attempts})" if resume else f"sweep {state.sweep_id}"
        console.print(f"MLflow: {verb}, experiment '{spec.experiment_name}', parent run {parent_id} ({tracking_uri})")

    rows: list[dict] = []
    report_dir = None
    monitor = _system_metrics(parent_id, tracking_uri, step)
    signals, stage = SweepSignals().start(), "start of Ray"
    try:
        _init_ray(spec, address)
        signals.install()  # ray.init sets its own SIGTERM handler
        check_storage_on_nodes(plan.storage)
        stage = "extraction stage"
        extraction = _extraction_stage(plan, client, parent_id, step, quiet)
        stage = "trial stage"
        grid, trials_seconds = _trial_stage(plan, state, client, quiet, dataset_inputs, signals)
        if signals.fired:  # Tune stopped gracefully and saved its state; the sweep stops here
            raise KeyboardInterrupt
        stage = "summary and analysis"
        rows = _collect_rows(plan, grid, get_task(plan.dataset.task).headline)
        _summarise(plan, client, parent_id, step, rows, trials_seconds, quiet)
        if analyze and any(r["state"] == "FINISHED" for r in rows):
            on_cluster = settings.ray_address(spec.ray.address, address) is not None
            report_dir = _analyze(plan, tracking_uri, parent_id, on_cluster, project_dir, quiet)
        client.set_terminated(parent_id, "FINISHED")
        state.status = "finished"
    except KeyboardInterrupt:
        signum = signals.signum or signal.SIGINT
        state.status = "interrupted"
        message = _record_interruption(client, plan, state, signal_name(signum), stage)
        raise SweepInterrupted(signum, message) from None
    except BaseException as e:
        state.status = "failed"
        stopped = _stopped_by_surroundings(e, client, plan, state, stage)  # a full disk, a store gone: one message
        if stopped is not None:
            raise stopped from None
        client.set_terminated(parent_id, "FAILED")
        raise
    finally:
        signals.stop()
        _save_state(state, plan.storage)
        if monitor is not None:
            with contextlib.suppress(Exception):  # its last samples go to a store that may be what failed
                monitor.finish()
    wall = time.perf_counter() - t0
    client.log_metric(parent_id, "sweep_wall_seconds", wall, step=step)
    if not quiet:
        _last_lines(rows, wall, report_dir, tracking_uri, state, project_dir)
    return SweepOutcome(plan, parent_id, state.experiment_id, tracking_uri, rows, extraction, wall, report_dir, state)


def _checked_plan(
    spec: SweepSpec, project_dir: Path, address: str | None, resume: bool, quiet: bool, verbose: bool
) -> tuple[Plan, str]:
    """The plan and the tracking URI, once everything that can be checked before work starts is (the
    pre-flight: storage, tracking, weights, data; then the memory of the cluster's nodes), shown to the user;
    Ray started (or joined) and library logs routed to the sweep's log file."""

    log_path = sweep_log_path(spec, project_dir)
    capture_third_party(log_path, verbose)
    if not verbose:  # Tune's new output engine prints its configuration box and a TensorBoard hint at any verbosity
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tracking_uri = resolve_tracking_uri(spec.tracking.uri, project_dir)
    plan, checks = preflight(spec, project_dir, tracking_uri, resume)  # storage, tracking, weights, data: before Ray
    if not quiet:
        print_banner(plan, plan.provenance())
        print_plan(plan)
        console.print(checks.line())
    # every task must fit the memory a node declares: refused before any run is recorded or work starts
    _init_ray(spec, address)
    capture_third_party(log_path, verbose)  # ray.init installs Ray's own handlers again
    check_cluster_memory(plan)
    return plan, tracking_uri


def _summarise(plan: Plan, client, parent_id: str, step: int, rows: list[dict], trials_seconds: float, quiet: bool):
    """The sweep's totals and best result on its parent run (metrics, description) and on the terminal."""
    spec, headline, provenance = plan.spec, get_task(plan.dataset.task).headline, plan.provenance()
    n_failed = sum(r["state"] != "FINISHED" for r in rows)
    log_batch(
        client,
        parent_id,
        step=step,
        metrics={
            "trials_total": len(rows),
            "trials_failed": n_failed,
            "trials_wall_seconds": trials_seconds,
            "trials_reused_from_record": sum(r["reused"] for r in rows),
            **_best_metrics(rows, headline),
        },
    )
    client.set_tag(parent_id, record.DESCRIPTION, parent_description(plan, rows))  # + the headline result
    if quiet:
        return
    label = f" - {provenance.label}" if provenance.label else ""  # the one provenance decision's words
    level = int(spec.metrics.bootstrap.level * 100)
    print_summary(rows, f"{spec.name}: {headline.label} with patient-level {level}% bootstrap CI{label}", headline)
    for r in rows:
        if r["state"] != "FINISHED":
            console.print(f"cell {r['cell']} failed: {r['error'] or 'no result'}", style="red", markup=False)


def _analyze(plan: Plan, tracking_uri: str, parent_id: str, on_cluster: bool, project_dir: Path, quiet: bool) -> Path:
    """The sweep's report, attached to its parent run (``settings.reports_root``: the project's reports/ on a
    laptop, the storage's on a cluster)."""
    from dinoscale.analysis import analyze_sweep

    spec = plan.spec
    return analyze_sweep(
        tracking_uri,
        spec.experiment_name,
        parent_id,
        settings.reports_root(plan.storage, on_cluster, project_dir) / report_folder(spec),
        provenance=plan.provenance(),
        quiet=quiet,
    )


def _last_lines(rows: list[dict], wall: float, report_dir, tracking_uri: str, state: SweepState, project_dir: Path):
    n_ok = sum(r["state"] == "FINISHED" for r in rows)
    console.print(
        f"Sweep finished in {wall:.0f}s: {n_ok}/{len(rows)} cells ok; report: "
        f"{report_dir / 'report.html' if report_dir else '-'}. "
        + browse_hint(tracking_uri, state.experiment_id, project_dir),
        markup=False,
    )
    if log_file() is not None:
        console.print(f"Library logs and warnings (Ray, Tune, MLflow, MONAI): {log_file()}", markup=False)


def _record_interruption(client, plan: Plan, state: SweepState, signame: str, stage: str) -> str:
    """Mark the parent run and the cell runs still RUNNING as KILLED (quickly: no MLflow retries, a
    scheduler's grace period is short) and say what was kept and how to continue."""

    parent_id = state.parent_run_id
    done = killed = 0
    try:
        with no_retries():
            client.set_tag(
                parent_id, record.INTERRUPTED, f"{signame} during the {stage}, {time.strftime('%Y-%m-%d %H:%M:%S')}"
            )
            children = client.search_runs(
                [state.experiment_id], filter_string=f"tags.`{record.PARENT_RUN_ID}` = '{parent_id}'", max_results=5000
            )
            for run in children:
                if run.info.status == "FINISHED":
                    done += 1
                elif run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, "KILLED")
                    killed += 1
            client.set_terminated(parent_id, "KILLED")
        recorded = f"parent run {parent_id} marked KILLED"
    except Exception as e:  # noqa: BLE001 - the state file still allows a resume; say what could not be recorded
        recorded = f"the MLflow record could not be updated ({type(e).__name__}); the sweep state on disk was"

    store = FeatureStore(plan.storage / "features")
    stored = sum(1 for fs in plan.feature_sets if fs.key is not None and store.has(fs.key))
    return (
        f"sweep {state.sweep_id} interrupted by {signame} during the {stage}: {done}/{len(plan.cells)} cells finished "
        f"and recorded ({killed} running cell run(s) marked KILLED), {stored}/{len(plan.feature_sets)} feature sets "
        f"in the store; {recorded}. Resume with --resume and the same spec: finished cells are not rerun, stored "
        "features are not extracted again"
    )


def _stopped_by_surroundings(exc: BaseException, client, plan: Plan, state: SweepState, stage: str):
    """A storage or tracking store that failed mid-sweep (full, read-only, gone: ``StorageError`` /
    ``TrackingError``, also behind Ray's wrappers and MLflow's exceptions), as one user error that says what
    was kept; the parent run is marked FAILED where the store still takes it (``SweepState.for_resume`` accepts
    a failed sweep), and ``resumable`` tells the command line to print the resume command. None: not such a
    failure (a bug keeps its traceback)."""
    user = user_error_of(exc)
    if not isinstance(user, (StorageError, TrackingError)):
        user = tracking_failure_of(exc, state.tracking_uri, state.parent_run_id)
    if user is None:
        return None
    try:
        with no_retries():  # a server that went away is not retried for minutes
            client.set_terminated(state.parent_run_id, "FAILED")
        recorded = f"parent run {state.parent_run_id} marked FAILED"
    except Exception:  # noqa: BLE001 - the record may be what failed; the sweep state on disk still resumes
        recorded = "the MLflow record could not be updated"
    try:
        store = FeatureStore(plan.storage / "features")
        stored = sum(1 for fs in plan.feature_sets if fs.key is not None and not fs.online and store.has(fs.key))
        kept = f"{stored}/{sum(1 for fs in plan.feature_sets if not fs.online)} feature sets in the store"
    except OSError:
        kept = "the feature sets committed before it are kept"
    resumable = user.__dict__.get("resumable", True)  # False: tracking_failure_of found the record itself lost
    told = (TrackingError if isinstance(user, TrackingError) else StorageError)(
        f"{user}. The sweep {state.sweep_id} stopped in the {stage} ({kept} under '{plan.storage}'; {recorded})"
        + (
            ": once fixed, continue it with --resume (finished cells are not rerun, stored features not "
            "extracted again)"
            if resumable
            else ""
        )
    )
    told.__dict__.update({k: v for k, v in user.__dict__.items() if k != "resumable"})
    told.resumable = resumable
    return told


def _save_state(state: SweepState, storage: Path) -> None:
    """The sweep state, saved as the sweep ends. On a full or vanished storage it may not be: after a failure
    that is harmless (the state saved at the start says 'running', which ``--resume`` accepts) and the error
    on its way says what happened; after a finished sweep, whose every cell is recorded, a warning says it."""
    try:
        state.save(storage)
    except OSError as e:
        if state.status == "finished":
            told = environment_error(e, root=storage)
            if told is None:
                raise
            console.print(
                f"warning: sweep {state.sweep_id} finished and is recorded, but its state could not be marked "
                f"finished: {describe(told)}",
                style="yellow",
                markup=False,
            )


def _system_metrics(run_id: str, tracking_uri: str, step: int):
    """CPU/memory/GPU of the driver node, logged to the parent run every 10 s (MLflow system metrics)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=tracking_uri, resume_logging=step > 0)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - optional telemetry must never stop a sweep
        console.print(f"[yellow]system metrics off: {e}[/yellow]")
        return None


def _extraction_stage(plan: Plan, client, parent_id: str, step: int, quiet: bool):
    from dinoscale.sweep.extraction import run_extraction_stage

    if not quiet:
        console.print(
            f"[bold]Extraction stage:[/bold] {len(plan.missing)} feature set(s) to extract, "
            f"{len(plan.feature_sets) - len(plan.missing)} cached"
        )

    def on_done(r: dict) -> None:
        what = (
            f"{r['entries']} files decoded once for {len(r['shards'])} shard(s), {r['slices']} encoder inputs "
            f"({r[record.EXTRACTION_IMAGES_PER_SECOND]:.0f}/s, {r[record.EXTRACTION_DECODE_SHARE]:.0%} decoding)"
            if "entries" in r
            else f"{r['images']} volumes ({r['slices']} slices)"
            if r.get("slices", 0) > r["images"]
            else f"{r['images']} images"
        )
        console.print(f"  extracted {r['job']}: {what} in {r['forward_seconds']:.1f}s on {r['device']}")

    res = plan.spec.resources
    with contextlib.nullcontext() if quiet or not plan.missing else ExtractionProgress(extraction_unit(plan)) as bar:
        extraction = run_extraction_stage(
            plan,
            plan.storage / "features",
            res.cpus_per_extraction,
            res.gpus_per_extraction,
            None if quiet else on_done,
            on_progress=bar,
        )
    log_batch(
        client,
        parent_id,
        step=step,
        metrics={
            "extraction_feature_sets_extracted": extraction.feature_sets_extracted,
            "extraction_feature_sets_cached": extraction.feature_sets_cached,
            "extraction_images_forwarded": extraction.images,
            "extraction_forward_seconds": extraction.forward_seconds,
            "extraction_wall_seconds": extraction.wall_seconds,
            "extraction_" + record.OOM_BACKOFFS: sum(j.get(record.OOM_BACKOFFS, 0) for j in extraction.per_job),
            **extraction_record(extraction),
        },
    )
    for i, job in enumerate(extraction.per_job):  # what each job measured: GFLOPs per image, weights' sha256, memory
        one = len(extraction.per_job) == 1
        name = ("fused" if "entries" in job else job["job"].replace("@", "_r")) + ("" if one else f"_task{i}")
        client.log_dict(parent_id, job, f"{record.EXTRACTION_DIR}/{name}.json")
    if extraction.per_feature_set:
        client.log_dict(parent_id, extraction.per_feature_set, record.FEATURE_SETS)
    if not quiet:
        console.print(
            f"  {extraction.feature_sets_extracted} extracted, {extraction.feature_sets_cached} cached, "
            f"{extraction.images} image forward passes, {extraction.wall_seconds:.1f}s wall"
            + (f", {extraction.decodes_per_file:.2g} decode(s) per file" if extraction.files else "")
        )
    return extraction


class CellResults(list):
    """One entry per cell (``config``, ``metrics``, ``error``), from its Tune trial (frozen) or from its
    selection (lora / full); ``trial_wall_s``: the driver-seen wall time of each cell's trials."""

    trial_wall_s: dict


@dataclass
class _CellResult:
    config: dict
    metrics: dict | None
    error: str | None = None


def _trial_stage(plan: Plan, state: SweepState, client, quiet: bool, dataset_inputs: list, signals=None):
    """The sweep's trials on Ray Tune: one experiment for the frozen cells (a trial each), one for the
    configurations of the lora / full cells (a trial each, stopped early within their cell by
    ``CellSuccessiveHalving``); then the selection of lora / full cells (Ray tasks). Returns (one result
    per cell, seconds)."""

    from dinoscale.sweep.finetune import open_finetune_cell_runs
    from dinoscale.sweep.schedule import CellSuccessiveHalving
    from dinoscale.sweep.units import unit_trainable

    spec, ds = plan.spec, plan.dataset
    ctx = _sweep_context(plan, state, client, dataset_inputs)
    training = [c for c in plan.cells if c.trains_encoder]
    ctx.cell_runs = open_finetune_cell_runs(training, ctx, client)  # before their configurations start
    has_gpu = cluster_has_gpus()  # from the node types, not the nodes up now (workers start at zero)
    cells = ctx.cells
    trainable = tune.with_resources(
        tune.with_parameters(unit_trainable, ctx=ctx),
        lambda config: trial_resources(cells[parse_unit(config["unit"])[0]], spec, has_gpu),
    )
    es = spec.finetuning.early_stopping
    scheduler = CellSuccessiveHalving(
        {c.id: c.configurations[0]["epochs"] for c in training},
        es.grace_epochs,
        es.reduction_factor,
        ctx.schedule_state,
        enabled=es.enabled,
    )
    frozen_units = [c.id for c in plan.cells if not c.trains_encoder]
    config_units = [u for c in training for u in c.unit_ids]
    progress = None if quiet else SweepProgress([c.id for c in plan.cells], get_task(ds.task).headline)
    timer = _TrialTimer()
    callbacks = [timer] + ([] if progress is None else [_ProgressCallback()])
    if not quiet:
        sample = trial_resources(plan.cells[0], spec, has_gpu)
        console.print(
            f"[bold]Trial stage:[/bold] {len(frozen_units) + len(config_units)} trials on Ray Tune for "
            f"{len(plan.cells)} cells (e.g. {sample} per {plan.cells[0].strategy} trial)"
            + (
                f"; {len(config_units)} lora / full configurations, stopped early by ASHA within their cell "
                f"(grace {es.grace_epochs} epoch(s), reduction factor {es.reduction_factor:g})"
                if training and es.enabled
                else ""
            )
        )
    t0 = time.perf_counter()
    at_once = spec.resources.max_concurrent_trials
    tune_runs = [
        # frozen cells: short trials, actors reused between them
        (state.tune_path, frozen_units, tune.TuneConfig(reuse_actors=True, max_concurrent_trials=at_once), callbacks),
        # lora / full configurations: a fresh actor each, so a stopped one's process ends and its GPU memory
        # (CUDA context included) is free at once; a reused actor would wait for the stopped thread instead
        (
            state.tune_path + FINETUNE_SUFFIX,
            config_units,
            tune.TuneConfig(scheduler=scheduler, reuse_actors=False, max_concurrent_trials=at_once),
            [*callbacks, _StopRecorder(ctx)],
        ),
    ]
    grids, selected = [], []
    stopped = lambda: signals is not None and signals.fired  # noqa: E731
    tune_log, quiet_user_errors = logging.getLogger("ray.tune.execution.tune_controller"), _UserErrorsInOneLine()
    tune_log.addFilter(quiet_user_errors)
    try:
        with progress if progress is not None else contextlib.nullcontext():
            for path, units, tune_config, run_callbacks in tune_runs:
                if units and not stopped():
                    if signals is not None:
                        signals.in_tune = True  # a signal now asks Tune to stop gracefully (its state saved)
                    try:
                        grids.append(_fit(trainable, path, units, tune_config, run_callbacks, spec, state))
                    finally:
                        if signals is not None:
                            signals.in_tune = False
            if not stopped():  # Ray tasks, not Tune: a signal interrupts them (the resume selects again)
                selected = _selection_stage(plan, ctx, has_gpu, quiet, progress)
    finally:
        tune_log.removeFilter(quiet_user_errors)
    return _cell_results(grids, selected, timer), time.perf_counter() - t0


def _sweep_context(plan: Plan, state: SweepState, client, dataset_inputs: list):
    """What every trial of the sweep reads (``trial.SweepContext``): the cells, the dataset's units, where the
    store, the checkpoints and the record are, the tags each child run copies."""
    from dinoscale.sweep.trial import SweepContext

    spec, ds = plan.spec, plan.dataset
    parent_tags = client.get_run(state.parent_run_id).data.tags
    run_tags = {k: v for k, v in parent_tags.items() if k.startswith(record.PROVENANCE_PREFIXES)}
    return SweepContext(
        cells={c.id: c for c in plan.cells},
        classes=ds.classes,
        splits={s: ds.units(s) for s in ("train", "val", "test")},
        mask_labels=dict(ds.mask_labels),
        checkpoint_root=str(plan.storage / "checkpoints"),
        store_root=str(plan.storage / "features"),
        tracking_uri=state.tracking_uri,
        experiment_id=state.experiment_id,
        parent_run_id=state.parent_run_id,
        run_tags={
            **run_tags,
            record.SWEEP_ID: state.sweep_id,
            record.GIT_COMMIT: parent_tags.get(record.GIT_COMMIT, ""),
        },
        dataset_inputs=dataset_inputs,
        pseudonym_key=pseudonym.key_for(spec, plan.storage),
        sources={s: ds.sources(s) for s in ("train", "val", "test")} if any(c.online for c in plan.cells) else {},
        schedule_state=str(SweepState.folder(plan.storage, spec.name) / f"{state.sweep_id}.schedule.json"),
        externals={label: e.dataset.units(EXTERNAL_SPLIT) for label, e in plan.externals.items()},
        external_classes={label: e.classes for label, e in plan.externals.items()},
    )


def _cell_results(grids: list, selected: list, timer: _TrialTimer) -> CellResults:
    """One result per cell: the frozen cells' trials (a configuration's trial is not a cell's result) and the
    selected lora / full cells, with each cell's wall time seen from the driver."""

    results = CellResults()
    for grid in grids:
        for result in grid:
            if result.config and parse_unit(result.config["unit"])[1] is None:
                results.append(_CellResult({"cell": result.config["unit"]}, result.metrics, result.error))
    results.extend(selected)
    wall: dict[str, float] = {}
    for unit, seconds in timer.wall.items():  # a lora / full cell: the sum over its configurations
        wall[parse_unit(unit)[0]] = wall.get(parse_unit(unit)[0], 0.0) + seconds
    results.trial_wall_s = wall  # seen from the driver: scheduling + actor start + the trial's own work
    return results


FINETUNE_SUFFIX = "-finetune"  # the Tune experiment of the lora / full configurations, beside the frozen cells'


def _fit(trainable, path: str, units: list[str], tune_config, callbacks: list, spec: SweepSpec, state: SweepState):
    """One Tune experiment over ``units``; a resumed sweep restores it (finished trials are not rerun)."""
    if state.attempts > 1 and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=True
        )
    else:
        run_config = tune.RunConfig(
            name=Path(path).name,
            storage_path=str(Path(path).parent),
            failure_config=tune.FailureConfig(max_failures=spec.resources.trial_retries),
            verbose=0,
            callbacks=callbacks,
        )
        tuner = tune.Tuner(
            trainable, param_space={"unit": tune.grid_search(units)}, tune_config=tune_config, run_config=run_config
        )
    return tuner.fit()


def _selection_stage(plan: Plan, ctx, has_gpu: bool, quiet: bool, progress) -> list[_CellResult]:
    """Each lora / full cell, once its configurations have all ended: the best on val scored on test (one
    Ray task per cell, a GPU each where the cluster has them, all cells at once)."""
    import ray

    from dinoscale.sweep.finetune import finalize_finetune_cell

    cells = [c for c in plan.cells if c.trains_encoder]
    if not cells:
        return []
    res = plan.spec.resources
    task = ray.remote(finalize_finetune_cell).options(
        num_cpus=res.cpus_per_trial,
        num_gpus=res.gpus_per_training_trial if has_gpu else 0,
        max_retries=res.trial_retries,  # a lost worker; an error in the selection itself is recorded, not retried
    )
    ctx_ref = ray.put(ctx)
    pending = {task.remote(c.id, ctx_ref): c.id for c in cells}
    if not quiet:
        console.print(
            f"[bold]Selection:[/bold] {len(cells)} lora / full cell(s): best configuration on val, scored on test"
        )
    out = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cell_id = pending.pop(done[0])
        try:
            metrics, error = ray.get(done[0]), None
        except Exception as e:  # noqa: BLE001 - recorded as the cell's failure (its run holds the traceback)
            metrics, error = None, str(e).strip().splitlines()[-1][:500]
        if progress is not None:
            progress.update(cell_id, "FINISHED" if error is None else "FAILED", metrics)
        out.append(_CellResult({"cell": cell_id}, metrics, error))
    return out


class _UserErrorsInOneLine(logging.Filter):
    """Tune logs a failed trial with the whole remote traceback; a user error is logged as its message
    (the cell's MLflow run keeps the traceback), a tracking store that failed (a connection refused, a database
    that cannot be written) as the line that says so (Tune's error file keeps the traceback). Other errors keep
    Tune's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else record.exc_info
        user = user_error_of(exc) if isinstance(exc, BaseException) else None
        store = tracking_store_failure(exc) if isinstance(exc, BaseException) and user is None else None
        if user is not None or store is not None:  # a tracking store gone: each retry's traceback says nothing new
            said = describe(user) if user is not None else f"the tracking store failed: {failure_line(store)}"
            record.msg, record.args, record.exc_info, record.exc_text = f"{record.getMessage()}: {said}", (), None, None
        return True


class _TrialTimer(tune.Callback):
    """Wall time of each trial as the driver sees it (start -> complete), for the overhead benchmark."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.config["unit"], time.perf_counter())

    def on_trial_complete(self, iteration, trials, trial, **info):
        unit = trial.config["unit"]
        self.wall[unit] = time.perf_counter() - self.started.get(unit, time.perf_counter())


class _StopRecorder(tune.Callback):
    """When Tune ends a configuration the scheduler stopped, its run is marked stopped from here: the trial's
    own process may already be gone (Tune ends an actor it does not reuse). The stops are read from the
    scheduler's state file, so a copy of this callback restored with the experiment works alike."""

    def __init__(self, ctx):
        self.ctx = ctx

    def on_trial_complete(self, iteration, trials, trial, **info):
        from mlflow.tracking import MlflowClient

        from dinoscale.sweep.finetune import record_stopped_configuration
        from dinoscale.sweep.schedule import stopped_at

        cell_id, k = parse_unit(trial.config["unit"])
        if k is None:
            return
        epochs = stopped_at(self.ctx.schedule_state, cell_id, k)
        if epochs is not None:
            client = MlflowClient(self.ctx.tracking_uri)
            record_stopped_configuration(client, self.ctx, self.ctx.cells[cell_id], k, epochs)


class _ProgressCallback(tune.Callback):
    """Feeds the driver's live cell table (Tune's own table is switched off); a lora / full cell runs while
    any of its configurations does and finishes with its selection.

    Tune pickles its callbacks into the experiment state (and restores them on resume): this one holds
    nothing but calls ``display.progress_event``, which finds the table the driver has open, if any."""

    @staticmethod
    def _cell(trial) -> tuple[str, bool]:
        cell, k = parse_unit(trial.config["unit"])
        return cell, k is None

    def on_trial_start(self, iteration, trials, trial, **info):
        progress_event(self._cell(trial)[0], "RUNNING")

    def on_trial_complete(self, iteration, trials, trial, **info):
        cell, frozen = self._cell(trial)
        if frozen:
            progress_event(cell, "FINISHED", trial.last_result or {})

    def on_trial_error(self, iteration, trials, trial, **info):
        cell, frozen = self._cell(trial)
        if frozen:
            progress_event(cell, "FAILED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        progress_event(self._cell(trial)[0], "RETRYING")


def _collect_rows(plan: Plan, grid, headline) -> list[dict]:
    """One row per cell; ``metric`` / ``metric_ci_low`` / ``metric_ci_high`` / ``val_metric`` hold the headline."""
    h = headline
    rows = []
    for result in grid:
        cid = result.config["cell"]
        cell = plan.cell(cid)
        m = result.metrics or {}
        rows.append(
            {
                "cell": cid,
                **cell.axes,
                "state": "FINISHED" if result.error is None and h.test in m else "FAILED",
                "error": _error_text(result.error),
                "user_error": user_error_of(result.error) is not None,
                "metric": m.get(h.test),
                record.METRIC_CI[0]: m.get(h.test + record.CI_LOW),
                record.METRIC_CI[1]: m.get(h.test + record.CI_HIGH),
                "val_metric": m.get(h.val),
                h.test: m.get(h.test),
                "selected": ", ".join(f"{k[9:]}={m[k]:g}" for k in sorted(m) if k.startswith("selected_")),
                "selection_edge": m.get("selection_edge") or "",
                "per_group": ", ".join(
                    f"{k[len(h.test) + 1 :]} {m[k]:.3f}" for k in sorted(m) if k.startswith(f"{h.test}.")
                ),
                "interval_note": ""
                if m.get(h.test + record.CI_LOW) is not None or h.test not in m
                else f"{int(m.get('interval_units', 0))} test patient(s), fewer than "
                f"{plan.spec.metrics.min_interval_units}",
                "mlflow_run_id": m.get("mlflow_run_id"),
                "reused": int(m.get("reused_record", 0) or 0),
                "time_own_work_s": m.get("time_own_work_s"),
                "trial_wall_s": getattr(grid, "trial_wall_s", {}).get(cid),
            }
        )
    return rows


def _error_text(error) -> str | None:
    """A failed trial's error as the user should read it: a user error's own message (not Ray's wrapper
    with the remote traceback), else the exception's type and first line."""
    if error is None:
        return None
    found = user_error_of(error)
    if found is not None:
        return describe(found)
    cause = getattr(error, "cause", None) or error
    lines = [x for x in str(cause).splitlines() if x.strip()]
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


def _best_metrics(rows: list[dict], headline) -> dict:
    ok = [r for r in rows if r["state"] == "FINISHED" and r["val_metric"] is not None]
    if not ok:
        return {}
    sign = 1 if headline.goal == "max" else -1
    best = max(ok, key=lambda r: sign * r["val_metric"])  # chosen on val, reported on test
    return {f"best_{headline.val}": best["val_metric"], f"best_cell_{headline.test}": best["metric"]}
