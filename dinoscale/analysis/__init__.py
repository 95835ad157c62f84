"""Analysis: reads only the tracking store (or a results CSV), fits scaling curves, writes a report.

Everything follows the sweep's headline metric (``dinoscale.headline``): AUROC, Dice, VOI... and its
goal (higher or lower is better)."""

from __future__ import annotations

from pathlib import Path

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
from dinoscale.provenance import Provenance
from dinoscale.record import REPORT_DIR, SWEEP_ID


def analyze_sweep(
    tracking_uri: str,
    experiment: str,
    parent_run_id: str | None,
    out_dir: Path,
    provenance: Provenance | None = None,
    quiet: bool = False,
) -> Path:
    """Report on one sweep (the latest when ``parent_run_id`` is None), attached to its parent run."""
    from mlflow.tracking import MlflowClient

    df, info = results_from_mlflow(tracking_uri, experiment, parent_run_id, with_predictions=True)
    tags, headline = info["tags"], info["headline"]
    if df.empty:
        raise LookupError(
            f"no finished run of sweep {info['parent_run_id']} in '{experiment}' logged its headline "
            f"{headline.test}; nothing to analyse"
        )
    if provenance is None:
        provenance = Provenance.from_tags(tags)
    out_dir = write_report(
        df,
        Path(out_dir),
        title=f"{experiment} / {tags.get(SWEEP_ID, info['parent_run_id'])}",
        provenance=provenance,
        predictions=info["predictions"],
        headline=headline,
    )
    client = MlflowClient(tracking_uri)
    for f in sorted(out_dir.iterdir()):
        if f.is_file():
            client.log_artifact(info["parent_run_id"], str(f), REPORT_DIR)
    if not quiet:
        from dinoscale.console import console, print_markdown

        console.print(
            f"Report on {headline.test} ({'higher' if headline.goal == 'max' else 'lower'} is better): "
            f"{out_dir / 'report.html'} (also attached to parent run {info['parent_run_id']}); "
            f"patient-level resampling for {len(info['predictions'])}/{len(df)} runs",
            markup=False,
        )
        print_markdown((out_dir / "verdicts.md").read_text())
    return out_dir
