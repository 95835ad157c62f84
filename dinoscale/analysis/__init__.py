"""Analysis: reads only the tracking store (or a results CSV), fits scaling curves, writes a report.

Everything follows the sweep's headline metric (``dinoscale.headline``): AUROC, Dice, VOI... and its
goal (higher or lower is better).

In a notebook: ``sweep_results(spec)`` (``dinoscale.results``) gives the latest sweep of a spec as a
DataFrame, ``write_report(df, folder)`` re-runs the analysis on it (or on any part of it), and
``analyze_sweep`` redoes what the end of a sweep does (the report, attached to the parent run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dinoscale.analysis.report import write_report
from dinoscale.analysis.resample import bootstrap_cells  # noqa: F401
from dinoscale.analysis.scaling import ScalingFit, fit_curve, fit_power_law  # noqa: F401
from dinoscale.analysis.sources import (  # noqa: F401
    RESULT_COLUMNS,
    detect_headline,
    resolve_headline,
    result_columns,
    results_from_csv,
    results_from_mlflow,
    sweep_headline,
)
from dinoscale.console import console, print_markdown
from dinoscale.provenance import Provenance
from dinoscale.record import REPORT_DIR, SWEEP_ID
from dinoscale.spec import SweepSpec, load_spec  # validating a spec imports timm (seconds): only when asked

if TYPE_CHECKING:
    from dinoscale.spec import SweepSpec


def report_folder(spec: SweepSpec) -> str:
    """A sweep's report folder under reports/: the spec's name, so two specs of a modality never overwrite each
    other's report; a rehearsal's is <spec name>-rehearsal (its spec is named so), never over a real report."""
    rehearsal = spec.profile == "rehearsal" and not spec.name.endswith("-rehearsal")
    return f"{spec.name}-rehearsal" if rehearsal else spec.name


def analyze_sweep(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None,
    out_dir: Path | str,
    provenance: Provenance | None = None,
    quiet: bool = False,
    spec_name: str | None = None,
    spec_digest: str | None = None,
) -> Path:
    """Report on one sweep, attached to its parent run: ``parent_run_id``, else the latest sweep of the spec
    ``spec_name`` (of its current ``spec_digest`` where there is one), else the latest of the experiment."""
    from mlflow.tracking import MlflowClient

    df, info = results_from_mlflow(
        tracking_uri, experiment, parent_run_id, with_predictions=True, spec_name=spec_name, spec_digest=spec_digest
    )
    tags, headline = info["tags"], info["headline"]
    if df.empty:
        raise LookupError(
            f"no finished run of sweep {info['parent_run_id']} in '{experiment}' logged its headline "
            f"{headline.test}; nothing to analyse"
        )
    if provenance is None:
        provenance = Provenance.from_tags(tags)
    if info["note"]:
        df.attrs["notes"] = [info["note"]]
    out_dir = write_report(
        df,
        Path(out_dir),
        title=f"{info['spec_name'] or experiment} / {tags.get(SWEEP_ID, info['parent_run_id'])}",
        provenance=provenance,
        predictions=info["predictions"],
        headline=headline,
    )
    client = MlflowClient(tracking_uri)
    for f in sorted(out_dir.iterdir()):
        if f.is_file():
            client.log_artifact(info["parent_run_id"], str(f), REPORT_DIR)
    if not quiet:
        console.print(
            f"Report on {headline.test} ({'higher' if headline.goal == 'max' else 'lower'} is better): "
            f"{out_dir / 'report.html'} (also attached to parent run {info['parent_run_id']}); "
            f"patient-level resampling for {len(info['predictions'])}/{len(df)} runs",
            markup=False,
        )
        print_markdown((out_dir / "verdicts.md").read_text())
    return out_dir


def sweep_results(
    spec: SweepSpec | str | Path,
    tracking_uri: str | None = None,
    sweep: str | None = None,
    project_dir: Path | str | None = None,
) -> pd.DataFrame:
    """The results of a spec's latest sweep (or of the sweep whose parent run is ``sweep``) as a DataFrame:
    one row per finished cell run, the axes, ``test_<headline>`` with ``_ci_low`` / ``_ci_high``, ``val_<headline>``.

    ``spec``: a ``SweepSpec`` or the path of its YAML; ``tracking_uri``: default the spec's (or
    DINOSCALE_TRACKING_URI), relative SQLite paths resolved against ``project_dir`` (default: the current folder).
    ``df.attrs`` carries the ``headline``, the ``parent_run_id`` and the sweep's ``provenance``, so
    ``write_report(df, folder)`` needs nothing else."""
    from dinoscale.tracking import resolve_tracking_uri

    s = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    uri = tracking_uri or resolve_tracking_uri(s.tracking.uri, Path(project_dir) if project_dir else None)
    df, info = results_from_mlflow(uri, s.experiment_name, sweep, spec_name=s.name, spec_digest=s.digest())
    df.attrs["provenance"] = Provenance.from_tags(info["tags"])
    df.attrs["title"] = f"{s.name} / {info['tags'].get(SWEEP_ID, info['parent_run_id'])}"
    if info["note"]:
        df.attrs["notes"] = [info["note"]]
    return df
