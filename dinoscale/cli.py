"""The `dinoscale` command line: thin wrappers over the package (spec, plan, sweep, analysis)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Scaling sweeps of vision foundation models on medical imaging.")


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


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="sweep spec (YAML)"),
    address: Optional[str] = typer.Option(None, help="address of an existing Ray cluster (default: embedded local Ray)"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (overrides the spec)"),
    no_analysis: bool = typer.Option(False, "--no-analysis", help="skip the scaling report at the end"),
) -> None:
    """Run the sweep: extraction stage, one Ray Tune trial per cell, MLflow record, scaling report."""
    import os

    from dinoscale.data import DataError
    from dinoscale.sweep.runner import run_sweep

    s = _load(spec)
    if tracking_uri:
        os.environ["DINOSCALE_TRACKING_URI"] = tracking_uri
    try:
        out = run_sweep(s, address=address, analyze=not no_analysis)
    except DataError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    if any(r["state"] != "FINISHED" for r in out.rows):
        raise typer.Exit(1)


@app.command()
def analyze(
    spec: Optional[Path] = typer.Argument(None, help="sweep spec: analyse its latest sweep in MLflow"),
    csv: Optional[Path] = typer.Option(None, help="analyse a results table instead (columns as results.csv)"),
    run_id: Optional[str] = typer.Option(None, help="parent run of the sweep (default: the latest)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: reports/<modality>)"),
) -> None:
    """Fit scaling curves and write plots + a markdown report (and attach them to the sweep's parent run)."""
    from dinoscale.analysis import analyze_sweep, results_from_csv, write_report
    from dinoscale.tracking import resolve_tracking_uri

    if csv is not None:
        df = results_from_csv(csv)
        d = write_report(df, out or Path("reports") / csv.stem, title=csv.name, provenance=[f"results table {csv}"])
        typer.echo(f"Report: {d / 'report.md'}")
        return
    if spec is None:
        typer.secho("give a spec or --csv", fg="red", err=True)
        raise typer.Exit(2)
    s = _load(spec)
    try:
        analyze_sweep(resolve_tracking_uri(s.tracking.uri), s.experiment_name, run_id, out or Path("reports") / s.modality)
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


if __name__ == "__main__":
    app()
