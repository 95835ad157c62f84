"""The `dinoscale` command line: thin wrappers over the package (spec, plan, sweep, analysis).

One error policy for every command (``_error_policy``): a user error (``dinoscale.errors.UserError``:
spec, data, weights, storage, tracking, leakage, resume), also when it was raised inside a Ray task or
a Ray Tune trial, is printed as its one message without a traceback, exit status 2. An interrupted
sweep says what it kept and how to resume, exit status 128 + signal (130 Ctrl-C, 143 SIGTERM). Anything
else is a bug: its traceback is kept, with what to send when reporting it, exit status 1. The checks
behind these messages are listed in ERRORS.md.
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer

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


class _Typer(typer.Typer):
    """Every command runs under the one error policy."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda fn: register(_error_policy(fn))


app = _Typer(
    add_completion=False, no_args_is_help=True, help="Scaling sweeps of vision foundation models on medical imaging."
)


def _load(spec_path: Path):
    from dinoscale.spec import load_spec

    return load_spec(spec_path)  # a SpecError is printed as one message by the error policy


def _tracking_server_first(spec_path: Path) -> None:
    """A tracking server that is down, reported within seconds of the command's start: before the spec's
    validation imports torch and timm (5-15 s on 2 cores). The URI the sweep will use: --tracking-uri /
    DINOSCALE_TRACKING_URI, else the spec's, read from its YAML as it stands (the full validation comes next
    and reports any problem of the file itself)."""
    import os

    import yaml

    from dinoscale.preflight import check_tracking_server

    uri = os.environ.get("DINOSCALE_TRACKING_URI")
    if not uri:
        try:
            raw = yaml.safe_load(Path(spec_path).read_text())
            uri = raw.get("tracking", {}).get("uri") if isinstance(raw, dict) else None
        except (OSError, yaml.YAMLError, AttributeError):
            return
    if isinstance(uri, str):
        check_tracking_server(uri)


@app.command()
def validate(spec: Path = typer.Argument(..., help="sweep spec (YAML)")) -> None:
    """Check a spec; on error name each offending key path and what was expected."""
    s = _load(spec)
    typer.echo(f"{spec}: ok - sweep '{s.name}' ({s.modality}, {s.profile} profile), spec digest {s.digest()}")


@app.command()
def plan(spec: Path = typer.Argument(..., help="sweep spec (YAML)")) -> None:
    """Dry run: cells, cached vs to-extract feature sets, trial count and estimated compute."""
    from dinoscale.preflight import check_storage
    from dinoscale.sweep.display import print_banner, print_plan
    from dinoscale.sweep.plan import build_plan, storage_root

    s = _load(spec)
    check_storage(storage_root(s), write=False)  # a phantom dataset is generated there even for a dry run
    p = build_plan(s)
    print_banner(p)
    print_plan(p)


@app.command()
def protocol(
    specs: list[Path] = typer.Argument(..., help="sweep spec(s) (YAML)"),
    out: Path | None = typer.Option(None, help="write the markdown here (default: print it)"),
) -> None:
    """The protocol table of each spec: every constant behind its numbers (splits, replicates, tokens, pooling,
    CT window, probe grids, epochs / steps, losses, metric conventions), as each sweep attaches it to MLflow."""
    from dinoscale.sweep.plan import build_plan
    from dinoscale.sweep.protocol import protocol_markdown

    parts = [protocol_markdown(build_plan(_load(s))) for s in specs]
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
    address: str | None = typer.Option(None, help="address of an existing Ray cluster (default: embedded local Ray)"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (overrides the spec)"),
    no_analysis: bool = typer.Option(False, "--no-analysis", help="skip the scaling report at the end"),
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
    import os

    if tracking_uri:
        os.environ["DINOSCALE_TRACKING_URI"] = tracking_uri
    _tracking_server_first(spec)
    from dinoscale.sweep.runner import run_sweep

    s = _load(spec)
    try:
        out = run_sweep(s, address=address, analyze=not no_analysis, resume=resume)
    except SweepInterrupted as e:
        typer.secho(f"interrupted: {e}", fg="yellow", err=True)
        typer.secho(f"continue with: dinoscale sweep {spec} --resume", fg="yellow", err=True)
        raise typer.Exit(e.exit_code) from None
    failed = [r for r in out.rows if r["state"] != "FINISHED"]
    if failed:
        raise typer.Exit(EXIT_USER_ERROR if all(r.get("user_error") for r in failed) else EXIT_CRASH)


@app.command()
def rehearse(
    spec: Path = typer.Argument(..., help="paper spec (YAML), e.g. sweeps/xray.yaml"),
    variant: str = typer.Option(
        "ok", help="ok, or a broken replica: corrupt_file | bad_label | mask_shape (shows the error a real run gives)"
    ),
    on_bad_file: str | None = typer.Option(
        None, "--on-bad-file", help="override dataset.on_bad_file (skip: drop unreadable files, recorded on the run)"
    ),
    seed: int = typer.Option(0, help="seed of the replica's generator"),
    replicates: int = typer.Option(1, min=1, help="replicates (seeds, CV folds) kept from the spec's seeds"),
    lean: bool = typer.Option(False, "--lean", help="only the smallest and largest backbone and resolution"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (overrides the spec)"),
    no_analysis: bool = typer.Option(False, "--no-analysis", help="skip the scaling report at the end"),
) -> None:
    """Rehearse a paper spec on a replica of its dataset's published layout, CPU-sized, labelled REHEARSAL.

    Writes the replica under <storage>/rehearsal/<dataset>/<variant>, maps the backbones onto the demo ladder
    with random weights, the resolutions onto small multiples of the patch size and cuts the training budgets
    (every change logged on the MLflow runs), then runs the ordinary sweep. Exit status as for `sweep`."""
    import os

    if tracking_uri:
        os.environ["DINOSCALE_TRACKING_URI"] = tracking_uri
    if on_bad_file not in (None, "error", "skip"):
        raise typer.BadParameter(f"'{on_bad_file}': expected error or skip", param_hint="--on-bad-file")
    _tracking_server_first(spec)
    from dinoscale.rehearse import rehearse as run_rehearsal

    _, out = run_rehearsal(
        spec,
        variant=variant,
        on_bad_file=on_bad_file,
        seed=seed,
        analyze=not no_analysis,
        replicates=replicates,
        lean=lean,
    )
    failed = [r for r in out.rows if r["state"] != "FINISHED"]
    if failed:
        raise typer.Exit(EXIT_USER_ERROR if all(r.get("user_error") for r in failed) else EXIT_CRASH)


@app.command("preflight")
def preflight_cmd(
    spec: Path = typer.Argument(..., help="sweep spec (YAML)"),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (overrides the spec)"),
) -> None:
    """Check what a sweep needs (storage, tracking, weights, data layout, sample files decoded); start nothing.

    `dinoscale sweep` runs the same checks first. The list of checks: ERRORS.md."""
    import os

    from dinoscale.preflight import preflight
    from dinoscale.tracking import resolve_tracking_uri

    if tracking_uri:
        os.environ["DINOSCALE_TRACKING_URI"] = tracking_uri
    _tracking_server_first(spec)
    s = _load(spec)
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
    run_id: str | None = typer.Option(None, help="parent run of the sweep (default: the latest)"),
    out: Path | None = typer.Option(None, help="output folder (default: reports/<modality>)"),
    headline: str | None = typer.Option(
        None,
        help="with --csv: the metric to analyse (e.g. test_dice, voi) when the "
        "table holds several (default: detected from its columns)",
    ),
    goal: str | None = typer.Option(None, help="with --csv: max | min, for a metric dinoscale does not know"),
) -> None:
    """Fit scaling curves and write plots + a markdown report (and attach them to the sweep's parent run).

    A sweep's metric is the headline its parent run recorded (AUROC, Dice, VOI...; lower-is-better ones
    such as VOI are ranked and judged as such)."""
    if csv is not None:
        from dinoscale.analysis import results_from_csv, write_report

        try:
            df = results_from_csv(csv, headline, goal)
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
    _tracking_server_first(spec)  # a server that is down: at once, not after MLflow's minutes of retries
    from dinoscale.analysis import analyze_sweep
    from dinoscale.preflight import check_tracking_reachable
    from dinoscale.tracking import resolve_tracking_uri

    s = _load(spec)
    uri = resolve_tracking_uri(s.tracking.uri)
    check_tracking_reachable(uri)
    try:
        analyze_sweep(uri, s.experiment_name, run_id, out or Path("reports") / s.modality)
    except LookupError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def backbones() -> None:
    """List the backbone registry."""
    from dinoscale.models import BACKBONES

    for b in BACKBONES.values():
        typer.echo(f"{b.name:20s} {b.arch_id:60s} {b.description}" + (f" [hub tag: {b.hub_tag}]" if b.hub_tag else ""))


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

_STORE_HELP = "feature store root: a path or an fsspec URL (s3://bucket/prefix); default: <spec storage>/features"


def _feature_store(spec: Path | None, store: str | None):
    from dinoscale.features import FeatureStore

    if store:
        return FeatureStore(store)
    if spec is not None:
        from dinoscale.sweep.plan import storage_root

        return FeatureStore(f"{storage_root(_load(spec))}/features")
    return FeatureStore(".dinoscale/features")


@cache_app.command("ls")
def cache_ls(
    spec: Path | None = typer.Argument(None, help="sweep spec whose storage path holds the store"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """List the entries: digest, backbone, resolution, tokens, split, shape, dtype, size."""
    fs = _feature_store(spec, store)
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
    digests: list[str] | None = typer.Argument(None, help="entries to check (default: all)"),
    spec: Path | None = typer.Option(None, "--spec", help="sweep spec whose storage path holds the store"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
) -> None:
    """Re-read entries and check their sha256 and shape; exit 1 if any is damaged."""
    fs = _feature_store(spec, store)
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
    digests: list[str] | None = typer.Argument(None, help="entries to remove"),
    spec: Path | None = typer.Option(None, "--spec", help="sweep spec whose storage path holds the store"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    all_: bool = typer.Option(False, "--all", help="remove every entry"),
    damaged: bool = typer.Option(False, "--damaged", help="remove entries that fail verification"),
    stale_hours: float | None = typer.Option(
        None, "--stale", help="remove leftovers of killed writers older than this many hours"
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation with --all"),
) -> None:
    """Remove entries (by digest, --all or --damaged) and/or stale leftovers of killed writers."""
    fs = _feature_store(spec, store)
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
