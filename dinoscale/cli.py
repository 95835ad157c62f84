"""The `dinoscale` command line: thin wrappers over the package (spec, plan, sweep, analysis).

One error policy for every command (``_error_policy``): a user error (``dinoscale.errors.UserError``:
spec, data, weights, storage, tracking, leakage, resume), also when it was raised inside a Ray task or
a Ray Tune trial, is printed as its one message without a traceback, exit status 2. An interrupted
sweep says what it kept and how to resume, exit status 128 + signal (130 Ctrl-C, 143 SIGTERM). Anything
else is a bug: its traceback is kept, with what to send when reporting it, exit status 1. The checks
behind these messages are listed in ERRORS.md.

Where the tracking store, the storage and the Ray cluster come from: one precedence for every command
(``dinoscale.settings``): flag > DINOSCALE_* variable > MLFLOW_TRACKING_URI / RAY_ADDRESS > the spec.
Choices are enums, refused by the parser before anything heavy is imported; this module imports only
typer and the package's leaves at module level (``python -X importtime -c 'import dinoscale.cli'``: ~0.1 s),
each command its own work inside its body (torch, Ray, MLflow: seconds).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer

from dinoscale import __version__, settings
from dinoscale.errors import EXIT_CRASH, EXIT_USER_ERROR, SweepInterrupted, describe, resume_command, user_error_of


def _error_policy(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import click

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # typer's and click's own exits and usage errors (usage errors exit 2 with their message)
        except SweepInterrupted as e:
            typer.secho(f"interrupted: {e}", fg="yellow", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.secho(f"interrupted (Ctrl-C): dinoscale {_name(fn)} stopped", fg="yellow", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `dinoscale ... | head`: the reader left; stop as the shell's tools do
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            raise typer.Exit(141) from None  # 128 + SIGPIPE
        except Exception as e:  # noqa: BLE001 - the policy: user errors as one message, bugs with a traceback
            user = user_error_of(e)
            if user is not None:
                typer.secho(describe(user), fg="red", err=True)
                if getattr(user, "resumable", False) and _name(fn) == "sweep":  # stopped mid-sweep on its storage
                    typer.secho(f"continue with: {resume_command('sweep', kwargs.get('spec'))}", fg="red", err=True)
                raise typer.Exit(EXIT_USER_ERROR) from None
            _report_crash(_name(fn))
            raise typer.Exit(EXIT_CRASH) from None

    return run


def _name(fn) -> str:
    return fn.__name__.removesuffix("_cmd").replace("_", "-")


def _report_crash(command: str) -> None:
    """A bug, not the user's input: the traceback stays, with what to send when reporting it."""
    import traceback
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "-"

    import platform

    typer.echo(traceback.format_exc(), err=True)
    versions = ", ".join(f"{p} {v(p)}" for p in ("dinoscale", "torch", "timm", "ray", "mlflow", "monai"))
    typer.secho(
        f"dinoscale {command} stopped on an unexpected error: a bug in dinoscale (or a library it uses), not a "
        "problem with your input. Please report it to the dinoscale maintainers with the traceback above, the "
        f"command line, the spec (dinoscale validate prints its digest) and these versions: {versions}, "
        f"Python {platform.python_version()} on {platform.system()}.",
        fg="red",
        err=True,
    )


_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"dinoscale {__version__}")
        raise typer.Exit()


def _version_option():
    return typer.Option(False, "--version", callback=_show_version, is_eager=True, help="print the version and exit")


def _with_version(fn):
    """The command also answers --version, as the top level does (an eager option: nothing else runs)."""
    sig = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def run(*args, version: bool = False, **kwargs):
        return fn(*args, **kwargs)

    extra = inspect.Parameter("version", inspect.Parameter.KEYWORD_ONLY, default=_version_option(), annotation=bool)
    run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    run.__annotations__ = {**fn.__annotations__, "version": bool}
    return run


class _Typer(typer.Typer):
    """Every command runs under the one error policy, answers -h and --version."""

    def __init__(self, **kwargs):
        super().__init__(context_settings=_CONTEXT, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("context_settings", _CONTEXT)
        register = super().command(*args, **kwargs)
        return lambda fn: register(_with_version(_error_policy(fn)))


app = _Typer(add_completion=False, no_args_is_help=True)  # its help: the docstring of _top


@app.callback()
def _top(version: bool = _version_option()) -> None:
    """Scaling sweeps of vision foundation models on medical imaging.

    Tracking URI, storage and Ray cluster, for every command: flag > DINOSCALE_TRACKING_URI /
    DINOSCALE_STORAGE / DINOSCALE_RAY_ADDRESS > MLFLOW_TRACKING_URI / RAY_ADDRESS > the spec."""


# ---------------------------------------------------------------- choices and shared options


class Variant(str, Enum):
    """A rehearsal's replica: ok, or broken the way a real dataset can be (dinoscale.data.replicas.VARIANTS)."""

    ok = "ok"
    corrupt_file = "corrupt_file"
    bad_label = "bad_label"
    mask_shape = "mask_shape"


class OnBadFile(str, Enum):
    error = "error"
    skip = "skip"


class Goal(str, Enum):
    max = "max"
    min = "min"


def _check_sets(values: list[str] | None) -> list[str]:
    """--set syntax, refused while the command line is parsed (one line, exit 2), before the spec is read."""
    from dinoscale.specfile import SpecError, parse_override

    for v in values or []:
        try:
            parse_override(v)
        except SpecError as e:
            typer.secho(describe(e), fg="red", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
    return values or []


def _set_option():
    return typer.Option(
        None,
        "--set",
        metavar="KEY.PATH=VALUE",
        callback=_check_sets,
        help="override a spec value, validated like the YAML (repeatable; the value is YAML): "
        "--set resolutions=[224] --set probes.0.epochs=10 --set dataset.split.seed=3",
    )


def _storage_option():
    return typer.Option(
        None, "--storage", help="storage root (beats DINOSCALE_STORAGE, which beats the spec's storage.path)"
    )


def _tracking_option():
    return typer.Option(
        None,
        "--tracking-uri",
        help="MLflow tracking URI (beats DINOSCALE_TRACKING_URI, then MLFLOW_TRACKING_URI, then the spec's)",
    )


def _address_option():
    return typer.Option(
        None,
        "--address",
        help="an existing Ray cluster: host:6379, ray://host:10001 or auto (beats DINOSCALE_RAY_ADDRESS, then "
        "RAY_ADDRESS, then the spec's ray.address; none: an embedded local Ray)",
    )


def _verbose_option():
    return typer.Option(
        False, "--verbose", help="show the libraries' logs and warnings (Ray, Tune, MLflow, MONAI) on the terminal too"
    )


def _quiet_libraries(spec, command: str, verbose: bool = False) -> None:
    """Third-party logs and warnings of a command that reads data (MONAI, MLflow) go to <storage>/logs/."""
    import time

    from dinoscale.console import capture_third_party
    from dinoscale.sweep.plan import storage_root

    stamp = time.strftime("%Y%m%d-%H%M%S")
    capture_third_party(storage_root(spec.storage) / "logs" / f"{command}-{spec.name}-{stamp}.log", verbose)


def _load(spec_path: Path, overrides: Sequence[str] | None = ()):
    """The spec of ``spec_path`` (its ``extends`` merged) with the ``--set`` overrides, validated."""
    from dinoscale.spec import load_spec

    return load_spec(spec_path, overrides or ())  # a SpecError is printed as one message by the error policy


def _tracking_server_first(spec_path: Path, overrides: Sequence[str] | None = ()) -> None:
    """A tracking server that is down, reported within seconds of the command's start: before the spec's
    validation imports torch and timm (5-15 s on 2 cores). The URI the sweep will use (``settings``), the
    spec's read from its YAML (``extends`` and --set applied; the full validation comes next)."""
    from dinoscale.specfile import load_raw
    from dinoscale.sweep.preflight import check_tracking_server

    tracking = load_raw(spec_path, overrides or ()).get("tracking")
    spec_uri = tracking.get("uri") if isinstance(tracking, dict) else None
    uri = settings.tracking_uri(spec_uri if isinstance(spec_uri, str) else None)
    check_tracking_server(uri)


def _ray_cluster_first(spec_path: Path, overrides: Sequence[str] | None, flag: str | None) -> None:
    """The Ray cluster a sweep joins, said and checked (seconds) before anything heavy: an address from
    RAY_ADDRESS is used, never silently ignored; none: an embedded local Ray, as always."""
    from dinoscale.specfile import load_raw

    ray = load_raw(spec_path, overrides or ()).get("ray")
    spec_address = ray.get("address") if isinstance(ray, dict) else None
    address = settings.ray_address(spec_address, flag)
    if address:
        source = settings.ray_address_source(spec_address, flag)
        settings.check_ray_address(address, source)
        typer.echo(f"Ray: joining the cluster at {address} ({source})")


def _set_args(overrides: Sequence[str] | None) -> str:
    return "".join(f" --set {o}" for o in overrides or ())


@app.command()
def validate(
    spec: Path = typer.Argument(..., help="sweep spec (YAML)"),
    sets: list[str] | None = _set_option(),
    show: bool = typer.Option(False, "--show", help="print the resolved spec (extends and --set applied, defaults)"),
) -> None:
    """Check a spec; on error name each offending key path and what was expected."""
    s = _load(spec, sets)
    if show:
        from dinoscale.specfile import extends_chain

        typer.echo(f"# {' < '.join(map(str, extends_chain(spec)))}{_set_args(sets)}, every default filled in")
        typer.echo(s.resolved_yaml())
    typer.echo(f"{spec}: ok - sweep '{s.name}' ({s.modality}, {s.profile} profile), spec digest {s.digest()}")


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="sweep spec (YAML)"),
    sets: list[str] | None = _set_option(),
    storage: str | None = _storage_option(),
    verbose: bool = _verbose_option(),
    cluster: Path | None = typer.Option(
        None,
        "--cluster",
        help="price the plan on this Ray cluster-launcher YAML (e.g. cluster/launcher/aws.yaml) with "
        "cluster/costs.yaml; default: the project's AWS launcher for paper specs, this machine otherwise",
    ),
    markdown: bool = typer.Option(False, "--markdown", help="print only the budget, as a markdown table"),
) -> None:
    """Dry run: cells, feature sets to extract, and the budget: wall-clock on a named cluster, GPU-hours,
    dollars (on demand and spot), bytes on disk, and what bounds each stage."""
    from dinoscale.sweep.budget import budget_row, markdown_table, plan_budget, plan_cluster
    from dinoscale.sweep.display import print_banner, print_plan
    from dinoscale.sweep.plan import build_plan, storage_root
    from dinoscale.sweep.preflight import check_storage

    settings.apply_flags(storage=storage)
    s = _load(spec, sets)
    if cluster is not None and not cluster.is_file():
        from dinoscale.errors import UserError

        raise UserError(
            f"--cluster {cluster}: no such file; give a Ray cluster-launcher YAML, e.g. cluster/launcher/aws.yaml"
        )
    check_storage(storage_root(s.storage), write=False)  # a phantom dataset is generated there even for a dry run
    _quiet_libraries(s, "plan", verbose)
    p = build_plan(s)
    b = plan_budget(p, plan_cluster(s, cluster))
    if markdown:
        typer.echo(markdown_table([budget_row(p, b)]))
        return
    print_banner(p)
    print_plan(p, b)


@app.command()
def calibrate(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="write the table here (JSON; the plan reads it from the environment variable DINOSCALE_CALIBRATION)",
    ),
    python: bool = typer.Option(False, "--python", help="print the table as shipped in dinoscale/sweep/budget.py"),
    seconds: float = typer.Option(1.0, "--seconds", min=0.05, help="time each measurement for at least this long"),
) -> None:
    """Measure this machine's decode + preprocess throughput per CPU core for each input kind (PNG, JPEG, slide
    tiles, DICOM, NIfTI.gz slices, HDF5 sections, .npz items) with the real readers, and the encoder on one core."""
    import json

    from dinoscale.sweep.calibrate import as_python
    from dinoscale.sweep.calibrate import calibrate as measure

    cal = measure(seconds, progress=lambda kind: typer.echo(f"  {kind}: measured", err=True))
    typer.echo(cal["label"])
    for kind, e in cal["decode"].items():
        rate = 1 / e["seconds"] if e["seconds"] else float("inf")
        px = f"{round(e['pixels'] ** 0.5)} px"
        typer.echo(f"  {kind:<9} {px:>8}  {e['seconds'] * 1e3:8.2f} ms/input  {rate:8.1f} inputs/s per core")
    typer.echo(f"  encoder on one CPU core: {cal['cpu_gflops']:.1f} GFLOP/s")
    if python:
        typer.echo(as_python(cal))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cal, indent=1))
        typer.echo(f"written {out}; use it with DINOSCALE_CALIBRATION={out}")


@app.command()
def protocol(
    specs: list[Path] = typer.Argument(..., help="sweep spec(s) (YAML)"),
    out: Path | None = typer.Option(None, help="write the markdown here (default: print it)"),
    sets: list[str] | None = _set_option(),
    storage: str | None = _storage_option(),
) -> None:
    """The protocol table of each spec: every constant behind its numbers (splits, replicates, tokens, pooling,
    CT window, probe grids, epochs / steps, losses, metric conventions), as each sweep attaches it to MLflow."""
    from dinoscale.sweep.plan import build_plan
    from dinoscale.sweep.protocol import protocol_markdown

    settings.apply_flags(storage=storage)
    loaded = [_load(s, sets) for s in specs]
    _quiet_libraries(loaded[0], "protocol")
    parts = [protocol_markdown(build_plan(s)) for s in loaded]
    text = "\n".join(parts)
    if out is None:
        typer.echo(text)
        return
    header = (
        "# Protocol tables of the paper profiles\n\n"
        "Generated by `dinoscale protocol` from the specs named below (do not edit by hand; "
        "`make protocol` regenerates it). Every sweep attaches its own table to its MLflow parent run "
        "(`protocol/protocol.md`).\n\n" + "".join(f"- `{s}`\n" for s in specs) + "\n"
    )
    out.write_text(header + text)
    typer.echo(f"wrote {out}")


@app.command("tile-slides")
def tile_slides_cmd(
    slides: Path = typer.Argument(..., help="a slide file or a folder of slides (.svs, .ndpi, .mrxs, .tif, ...)"),
    out: Path = typer.Argument(
        ..., help="root of the tile bags: <out>/<slide>/tile_<x>_<y>.png (the wsi-tiles layout)"
    ),
    tile_size: int = typer.Option(224, help="tile edge in pixels at the chosen level"),
    mpp: float | None = typer.Option(
        None, help="microns per pixel wanted (picks the closest pyramid level; e.g. 0.5 for 20x)"
    ),
    level: int | None = typer.Option(None, help="pyramid level (instead of --mpp; default 0)"),
    min_tissue: float = typer.Option(0.5, help="keep tiles with at least this fraction of tissue pixels"),
) -> None:
    """Cut whole-slide images into tissue tiles with OpenSlide (pip install 'dinoscale\\[wsi]')."""
    from dinoscale.data.slides import tile_slides

    folders = tile_slides(slides, out, tile_size=tile_size, mpp=mpp, level=level, min_tissue=min_tissue)
    for f in folders:
        n = sum(1 for _ in f.glob("tile_*.png"))
        typer.echo(f"{f}: {n} tissue tiles")
    typer.echo(f"next: write {out}/slides.csv (slide_id,label[,patient_id][,split]) and use dataset name 'wsi-tiles'")


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="sweep spec (YAML)"),
    sets: list[str] | None = _set_option(),
    address: str | None = _address_option(),
    tracking_uri: str | None = _tracking_option(),
    storage: str | None = _storage_option(),
    no_analysis: bool = typer.Option(False, "--no-analysis", help="skip the scaling report at the end"),
    verbose: bool = _verbose_option(),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="resume the latest unfinished sweep of this spec from its storage "
        "path: finished cells are not rerun, cached features not extracted, MLflow runs reused",
    ),
) -> None:
    """Run the sweep: pre-flight checks, extraction stage, one Ray Tune trial per cell, MLflow record, scaling report.

    Exit status: 0 all cells finished; 2 the input (spec, data, weights, storage, tracking), or cells that
    failed only on such errors; 1 anything else; 130 / 143 interrupted (Ctrl-C / SIGTERM), resumable."""
    settings.apply_flags(tracking_uri=tracking_uri, storage=storage)
    _ray_cluster_first(spec, sets, address)
    _tracking_server_first(spec, sets)
    from dinoscale.specfile import provenance_tags
    from dinoscale.sweep.runner import run_sweep

    s = _load(spec, sets)
    try:
        out = run_sweep(
            s,
            address=address,
            analyze=not no_analysis,
            resume=resume,
            annotations=provenance_tags(spec, sets or ()),
            verbose=verbose,
        )
    except SweepInterrupted as e:
        typer.secho(f"interrupted: {e}", fg="yellow", err=True)
        typer.secho(f"continue with: dinoscale sweep {spec}{_set_args(sets)} --resume", fg="yellow", err=True)
        raise typer.Exit(e.exit_code) from None
    failed = [r for r in out.rows if r["state"] != "FINISHED"]
    if failed:
        raise typer.Exit(EXIT_USER_ERROR if all(r.get("user_error") for r in failed) else EXIT_CRASH)


@app.command()
def rehearse(
    spec: Path = typer.Argument(..., help="paper spec (YAML), e.g. sweeps/xray.yaml"),
    variant: Variant = typer.Option(Variant.ok, help="ok, or a broken replica (shows the error a real run gives)"),
    on_bad_file: OnBadFile | None = typer.Option(
        None, "--on-bad-file", help="override dataset.on_bad_file (skip: drop unreadable files, recorded on the run)"
    ),
    sets: list[str] | None = _set_option(),
    seed: int = typer.Option(0, help="seed of the replica's generator"),
    replicates: int = typer.Option(1, min=1, help="replicates (seeds, CV folds) kept from the spec's seeds"),
    lean: bool = typer.Option(False, "--lean", help="only the smallest and largest backbone and resolution"),
    tracking_uri: str | None = _tracking_option(),
    storage: str | None = _storage_option(),
    address: str | None = _address_option(),
    no_analysis: bool = typer.Option(False, "--no-analysis", help="skip the scaling report at the end"),
    verbose: bool = _verbose_option(),
) -> None:
    """Rehearse a paper spec on a replica of its dataset's published layout, CPU-sized, labelled REHEARSAL.

    Writes the replica under <storage>/rehearsal/<dataset>/<variant>, maps the backbones onto the demo ladder
    with random weights, the resolutions onto small multiples of the patch size and cuts the training budgets
    (every change logged on the MLflow runs), then runs the ordinary sweep. Exit status as for `sweep`."""
    settings.apply_flags(tracking_uri=tracking_uri, storage=storage, address=address)
    _ray_cluster_first(spec, sets, address)
    _tracking_server_first(spec, sets)
    from dinoscale.rehearse import rehearse as run_rehearsal

    _, out = run_rehearsal(
        spec,
        variant=variant.value,
        on_bad_file=on_bad_file.value if on_bad_file else None,
        seed=seed,
        analyze=not no_analysis,
        replicates=replicates,
        lean=lean,
        overrides=sets or (),
        verbose=verbose,
    )
    failed = [r for r in out.rows if r["state"] != "FINISHED"]
    if failed:
        raise typer.Exit(EXIT_USER_ERROR if all(r.get("user_error") for r in failed) else EXIT_CRASH)


@app.command("preflight")
def preflight_cmd(
    spec: Path = typer.Argument(..., help="sweep spec (YAML)"),
    sets: list[str] | None = _set_option(),
    tracking_uri: str | None = _tracking_option(),
    storage: str | None = _storage_option(),
    verbose: bool = _verbose_option(),
) -> None:
    """Check what a sweep needs (storage, tracking, weights, data layout, sample files decoded); start nothing.

    `dinoscale sweep` runs the same checks first. The list of checks: ERRORS.md."""
    settings.apply_flags(tracking_uri=tracking_uri, storage=storage)
    _tracking_server_first(spec, sets)
    from dinoscale.sweep.preflight import preflight
    from dinoscale.tracking import resolve_tracking_uri

    s = _load(spec, sets)
    _quiet_libraries(s, "preflight", verbose)
    project_dir = Path.cwd().resolve()
    _, report = preflight(s, project_dir, resolve_tracking_uri(s.tracking.uri, project_dir))
    typer.echo(report.line())


@app.command()
def analyze(
    spec: Path | None = typer.Argument(None, help="sweep spec: analyse its latest sweep in MLflow"),
    csv: Path | None = typer.Option(
        None,
        help="analyse a results table instead (one row per run: backbone, n_params, "
        "resolution, probe, strategy, seed, test_<metric>, _ci_low, _ci_high)",
    ),
    sweep: str | None = typer.Option(
        None,
        "--sweep",
        "--run-id",
        help="the parent run id of the sweep to report on (default: the latest sweep of SPEC)",
    ),
    out: Path | None = typer.Option(
        None,
        help="output folder (default: reports/<spec name>, the reports folder from DINOSCALE_REPORTS if set; with --csv, reports/<file name>)",
    ),
    headline: str | None = typer.Option(
        None,
        help="with --csv: the metric to analyse (e.g. test_dice, voi) when the "
        "table holds several (default: detected from its columns)",
    ),
    goal: Goal | None = typer.Option(None, help="with --csv: for a metric dinoscale does not know"),
    sets: list[str] | None = _set_option(),
    tracking_uri: str | None = _tracking_option(),
) -> None:
    """Fit scaling curves and write plots + a markdown report (and attach them to the sweep's parent run).

    SPEC: the latest sweep of that spec (its name, preferring its current digest), reported in reports/<spec
    name>/. A sweep's metric is the headline its parent run recorded (AUROC, Dice, VOI...; lower-is-better ones
    such as VOI are ranked and judged as such). --csv reads any results table, a report's own results.csv too."""
    if csv is not None:
        from dinoscale.analysis import results_from_csv, write_report

        try:
            df = results_from_csv(csv, headline, goal.value if goal else None)
        except ValueError as e:
            typer.secho(str(e), fg="red", err=True)
            raise typer.Exit(2) from None
        d = write_report(df, out or Path("reports") / csv.stem, title=csv.name, provenance=[f"results table {csv}"])
        h = df.attrs["headline"]
        typer.echo(f"Report on {h.test} ({'higher' if h.goal == 'max' else 'lower'} is better): {d / 'report.md'}")
        return
    if headline or goal:
        typer.secho(
            "--headline / --goal apply to --csv only: a sweep's headline is read from its parent run",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    if spec is None:
        typer.secho("give a spec or --csv", fg="red", err=True)
        raise typer.Exit(2)
    settings.apply_flags(tracking_uri=tracking_uri)
    _tracking_server_first(spec, sets)  # a server that is down: at once, not after MLflow's minutes of retries
    from dinoscale.analysis import analyze_sweep, report_folder
    from dinoscale.sweep.preflight import check_tracking_reachable
    from dinoscale.tracking import resolve_tracking_uri

    s = _load(spec, sets)
    uri = resolve_tracking_uri(s.tracking.uri)
    check_tracking_reachable(uri)
    try:
        analyze_sweep(
            uri,
            s.experiment_name,
            sweep,
            out or settings.reports_root(None, on_cluster=False) / report_folder(s),
            spec_name=s.name,
            spec_digest=s.digest(),
        )
    except LookupError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def ui(
    tracking_uri: str | None = _tracking_option(),
    port: int = typer.Option(5000, help="port of the MLflow UI"),
    host: str = typer.Option("127.0.0.1", help="interface it listens on (0.0.0.0: every one; no login!)"),
) -> None:
    """The MLflow UI on the tracking store in use, after a direct link to each sweep's runs table.

    The store: --tracking-uri > DINOSCALE_TRACKING_URI > MLFLOW_TRACKING_URI > sqlite:///mlruns.db in
    this folder (the specs' default). One worker, no job runner (~0.5 GB); Ctrl-C stops it."""
    from dinoscale.mlflow_ui import serve
    from dinoscale.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(settings.tracking_uri(None, tracking_uri))
    if uri.startswith(("http://", "https://")):
        from dinoscale.mlflow_ui import describe as sweep_lines

        typer.echo("\n".join(sweep_lines(uri, uri)))
        typer.echo(f"{uri} is a tracking server: its UI is already there")
        return
    serve(uri, host=host, port=port)


@app.command()
def backbones() -> None:
    """List the encoder families (loader, sizes -> backbone names, gating) and any timm model as timm:<name>."""
    from dinoscale.models.families import FAMILIES

    for f in FAMILIES:
        gate = "gated" if f.gated else "open"
        typer.echo(f"{f.name:16s} {f.loader:13s} {gate:6s} {f.domain:10s} {f.title}")
        sizes = ", ".join(f"{s.key}={s.backbone}" for s in f.sizes)
        typer.echo(f"{'':16s} sizes: {sizes}")
        typer.echo(
            f"{'':16s} input {f.native_resolution or '3D'} px, mean {list(f.mean)}, std {list(f.std)}; "
            f"tokens: {f.tokens}"
        )
        typer.echo(f"{'':16s} pooling: protocol {f.pooling_protocol}; upstream {f.pooling_upstream}")
        typer.echo(f"{'':16s} licence: {f.licence}" + (f"; {f.notes}" if f.notes else ""))
    typer.echo("any other timm model: timm:<architecture>[.<pretrained tag>] (a family of its own)")


@app.command()
def weights(
    spec: Path = typer.Argument(..., help="sweep spec YAML"),
    sets: list[str] | None = _set_option(),
) -> None:
    """List the weights a spec needs and where each is looked for (no network); exit 2 naming every missing one."""
    from dinoscale.models import missing_weights_error, weights_need

    s = _load(spec, sets)
    needs = [weights_need(b.name, b.weights) for b in s.backbones]
    for n in needs:
        mark = "found  " if n.found else "MISSING"
        typer.echo(f"{mark} {n.backbone:20s} {n.family:14s} {n.weights:8s} {n.where}")
    error = missing_weights_error(needs)
    if error is not None:
        raise error


@app.command()
def datasets() -> None:
    """List the dataset adapters (and which can be rehearsed: those with a replica writer)."""
    from dinoscale.data import dataset_names, is_phantom
    from dinoscale.data.replicas import replica_names

    replicas = set(replica_names())
    for n in dataset_names():
        kind = "phantom (generated)" if is_phantom(n) else "real (needs a data root)"
        typer.echo(f"{n:20s} {kind:26s}{' replica: dinoscale rehearse' if n in replicas else ''}".rstrip())


# ---------------------------------------------------------------- cache: the feature store

cache_app = _Typer(
    add_completion=False, no_args_is_help=True, help="The feature store: list, verify and remove entries."
)
app.add_typer(cache_app, name="cache")


@cache_app.callback()
def _cache(version: bool = _version_option()) -> None:
    """The feature store: list, verify and remove entries."""


_STORE_HELP = (
    "feature store root: a path or an fsspec URL (s3://bucket/prefix); default: <storage>/features, the storage "
    "as for every command (--storage > DINOSCALE_STORAGE > the spec's storage.path > .dinoscale)"
)
_SPEC_HELP = "sweep spec whose storage path holds the store"


def _spec_option():
    return typer.Option(None, "--spec", hidden=True, help=_SPEC_HELP)  # the old spelling, kept working


def _spec_and_digests(args: list[str] | None, spec: Path | None) -> tuple[Path | None, list[str]]:
    """``[SPEC] [DIGEST]...``: a first argument that is a YAML file (or names one) is the spec."""
    args = list(args or [])
    if spec is None and args and (args[0].endswith((".yaml", ".yml")) or Path(args[0]).is_file()):
        return Path(args[0]), args[1:]
    return spec, args


def _feature_store(spec: Path | None, store: str | None, storage: str | None = None, sets=()):
    from dinoscale.features import FeatureStore

    if store:
        return FeatureStore(store)
    spec_storage = _load(spec, sets).storage.path if spec is not None else None
    return FeatureStore(f"{settings.storage_root(spec_storage, storage)}/features")


@cache_app.command("ls")
def cache_ls(
    spec: Path | None = typer.Argument(None, help=_SPEC_HELP),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    storage: str | None = _storage_option(),
    sets: list[str] | None = _set_option(),
) -> None:
    """List the entries: digest, backbone, resolution, tokens, split, shape, dtype, size."""
    fs = _feature_store(spec, store, storage, sets)
    entries = fs.entries()
    for m in entries:
        k = m.get("key", {})
        size = m.get("bytes")
        if size is None:  # format 2: one file, its size from the shape
            size = 2 if m.get("dtype") == "float16" else 4
            for d in m.get("shape", []):
                size *= d
        shards = m.get("n_shards", 1)
        typer.echo(
            f"{m['digest']}  {m.get('backbone_name', k.get('backbone', '?')):22s} r{k.get('resolution', '?'):<5} "
            f"{k.get('tokens', '?'):22s} {m.get('split', '?'):6s} {'x'.join(map(str, m.get('shape', []))):14s} "
            f"{m.get('dtype', '?'):8s} {size / 2**20:8.2f} MiB {shards:4d} shard{'s' if shards != 1 else ' '}  "
            f"weights {k.get('weights_digest', '?')[:40]}"
        )
    typer.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in {fs.url}")


@cache_app.command("verify")
def cache_verify(
    args: list[str] | None = typer.Argument(
        None, metavar="[SPEC] [DIGEST]...", help=f"{_SPEC_HELP}, then the entries to check (default: all)"
    ),
    spec: Path | None = _spec_option(),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    storage: str | None = _storage_option(),
    sets: list[str] | None = _set_option(),
) -> None:
    """Re-read entries and check their sha256 and shape; exit 1 if any is damaged."""
    spec, digests = _spec_and_digests(args, spec)
    fs = _feature_store(spec, store, storage, sets)
    todo = digests or [m["digest"] for m in fs.entries()]
    bad = 0
    for d in todo:
        problem = fs.verify(d)
        if problem:
            bad += 1
            typer.secho(f"{d}  BAD  {problem}", fg="red")
        else:
            typer.echo(f"{d}  ok")
    typer.echo(f"{len(todo) - bad} ok, {bad} damaged in {fs.url}")
    if bad:
        raise typer.Exit(1)


@cache_app.command("rm")
def cache_rm(
    args: list[str] | None = typer.Argument(
        None, metavar="[SPEC] [DIGEST]...", help=f"{_SPEC_HELP}, then the entries to remove"
    ),
    spec: Path | None = _spec_option(),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    storage: str | None = _storage_option(),
    sets: list[str] | None = _set_option(),
    all_: bool = typer.Option(False, "--all", help="remove every entry"),
    damaged: bool = typer.Option(False, "--damaged", help="remove entries that fail verification"),
    stale_hours: float | None = typer.Option(
        None, "--stale", help="remove leftovers of killed writers older than this many hours"
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation with --all"),
) -> None:
    """Remove entries (by digest, --all or --damaged) and/or stale leftovers of killed writers."""
    spec, digests = _spec_and_digests(args, spec)
    fs = _feature_store(spec, store, storage, sets)
    if not (digests or all_ or damaged or stale_hours is not None):
        typer.secho("nothing to remove: give digests, --all, --damaged or --stale HOURS", fg="red", err=True)
        raise typer.Exit(2)
    todo = list(digests or [])
    if all_:
        if not yes:
            typer.confirm(f"remove every entry of {fs.url}?", abort=True)
        todo += [m["digest"] for m in fs.entries()]
    if damaged:
        todo += [m["digest"] for m in fs.entries() if fs.verify(m["digest"])]
    missing = 0
    for d in dict.fromkeys(todo):
        if fs.remove(d):
            typer.echo(f"removed {d}")
        else:
            missing += 1
            typer.secho(f"{d}: not in {fs.url}", fg="yellow", err=True)
    if stale_hours is not None:
        for p in fs.stale(stale_hours * 3600):
            fs.remove_path(p)
            typer.echo(f"removed stale {p}")
    if missing:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
