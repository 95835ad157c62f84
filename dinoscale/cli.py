"""The `dinoscale` command line: thin wrappers over the package (spec, plan, sweep, analysis)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Scaling sweeps of vision foundation models on medical imaging."
)


def _load(spec_path: Path):
    from dinoscale.spec import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def validate(spec: Path = typer.Argument(..., help="sweep spec (YAML)")) -> None:
    """Check a spec; on error name each offending key path and what was expected."""
    s = _load(spec)
    typer.echo(f"{spec}: ok - sweep '{s.name}' ({s.modality}, {s.profile} profile), spec digest {s.digest()}")


@app.command()
def plan(spec: Path = typer.Argument(..., help="sweep spec (YAML)")) -> None:
    """Dry run: cells, cached vs to-extract feature sets, trial count and estimated compute."""
    from dinoscale.sweep.display import print_banner, print_plan
    from dinoscale.sweep.plan import build_plan

    p = build_plan(_load(spec))
    print_banner(p)
    print_plan(p)


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
    from dinoscale.data import DataError
    from dinoscale.data.slides import tile_slides

    try:
        folders = tile_slides(slides, out, tile_size=tile_size, mpp=mpp, level=level, min_tissue=min_tissue)
    except DataError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
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
    """Run the sweep: extraction stage, one Ray Tune trial per cell, MLflow record, scaling report."""
    import os

    from dinoscale.data import DataError
    from dinoscale.sweep.plan import NotRunnableError
    from dinoscale.sweep.runner import run_sweep
    from dinoscale.sweep.state import ResumeError

    s = _load(spec)
    if tracking_uri:
        os.environ["DINOSCALE_TRACKING_URI"] = tracking_uri
    try:
        out = run_sweep(s, address=address, analyze=not no_analysis, resume=resume)
    except (DataError, ResumeError, NotRunnableError) as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    if any(r["state"] != "FINISHED" for r in out.rows):
        raise typer.Exit(1)


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
    from dinoscale.analysis import analyze_sweep, results_from_csv, write_report
    from dinoscale.tracking import resolve_tracking_uri

    if csv is not None:
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
    s = _load(spec)
    try:
        analyze_sweep(
            resolve_tracking_uri(s.tracking.uri), s.experiment_name, run_id, out or Path("reports") / s.modality
        )
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
    """List the dataset adapters."""
    from dinoscale.data import dataset_names, is_phantom

    for n in dataset_names():
        typer.echo(f"{n:20s} {'phantom (generated)' if is_phantom(n) else 'real (needs a data root)'}")


# ---------------------------------------------------------------- cache: the feature store

cache_app = typer.Typer(
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
        n_bytes = 2 if m.get("dtype") == "float16" else 4
        size = n_bytes
        for d in m.get("shape", []):
            size *= d
        typer.echo(
            f"{m['digest']}  {m.get('backbone_name', k.get('backbone', '?')):22s} r{k.get('resolution', '?'):<5} "
            f"{k.get('tokens', '?'):22s} {m.get('split', '?'):6s} {'x'.join(map(str, m.get('shape', []))):14s} "
            f"{m.get('dtype', '?'):8s} {size / 2**20:8.2f} MiB  weights {k.get('weights_digest', '?')[:40]}"
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
