"""The report: PNG plots, fitted parameters (CSV), a markdown summary and a self-contained HTML page.
Provenance of data and weights comes first, always; then which headline metric it is about and
which way is better. Plots are ``[<modality>_]<stem>_vs_<axis>.png`` (``sources.file_stem``:
``auroc``, ``dice``, ``voi``...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.analysis.compare import best_configurations, compare_strategies, summarize_strategies
from dinoscale.analysis.curves import AXES, Curve, build_curves, fits_table
from dinoscale.analysis.html import render_html
from dinoscale.analysis.plots import plot_axis, plot_strategies
from dinoscale.analysis.resample import CellDraws, bootstrap_cells
from dinoscale.analysis.scaling import MIN_POINTS, MIN_POINTS_BROKEN, MIN_POINTS_EXTRAPOLATION
from dinoscale.analysis.sources import (
    KNOWN_HEADLINES,
    complete_columns,
    detect_headline,
    direction,
    file_stem,
    provenance_gaps,
    short_name,
)
from dinoscale.headline import AUROC, Headline
from dinoscale.provenance import DEMO_HEADLINE, Provenance
from dinoscale.record import CELL_KEYS

RESAMPLES = 500


@dataclass
class ReportContent:
    """What both the markdown and the HTML say, in order."""

    title: str
    provenance: list[str]
    method: list[str]
    figures: list[tuple[str, Path]]  # (caption, file in the report folder)
    verdicts: dict[str, list[str]]  # modality -> lines
    best: list[str]
    strategies: list[str]
    cells: pd.DataFrame
    fits: pd.DataFrame
    comparisons: pd.DataFrame
    files: list[str] = field(default_factory=list)
    headline: Headline = AUROC
    demo: bool = False  # phantom / semi-synthetic data, random weights or the demo profile (dinoscale.provenance)


def _headline_line(h: Headline) -> str:
    moves = "increases" if h.goal == "max" else "decreases"
    named = h.label if direction(h) in h.label else f"{h.label}, {direction(h)}"
    return (
        f"Headline metric: {named} ({h.test}). 'Improves' means it {moves}; "
        f"the best configuration is the one with the {'highest' if h.goal == 'max' else 'lowest'} value."
    )


def _method(cd: CellDraws) -> list[str]:
    sources = ", ".join(sorted(set(cd.cells["uncertainty"])))
    h = cd.headline
    error = (
        f"Error E = 1 - {h.label}"
        if h.goal == "max"
        else f"Error E = {h.test} itself ({direction(h)}: it is already an error, so it is fitted untransformed, no sign flip)"
    )
    return [
        _headline_line(h),
        f"{error}, fitted per (modality, dataset, probe, strategy) as a saturating power law "
        "E = floor + A * x^(-alpha) (robust soft-L1 loss, several starts); alpha > 0 means larger x is better.",
        f"No exponent below {MIN_POINTS} distinct x values: the verdict then says 'too few points to fit'. A one-break "
        f"broken power law is fitted from {MIN_POINTS_BROKEN} points; a leave-largest-out extrapolation check from "
        f"{MIN_POINTS_EXTRAPOLATION}.",
        f"Verdicts compare the points themselves through paired bootstrap draws ({len(cd.draws)} resamples; "
        f"uncertainty from {sources}); 'no reliable trend' means the 95% intervals of the differences include zero.",
    ]


def _selection_warnings(runs: pd.DataFrame) -> list[str]:
    """Runs whose choice on val sits on the edge of its grid (tag ``record.SELECTION_EDGE``): the optimum may
    lie outside the grid, so the number may understate the configuration."""
    if "selection_edge" not in runs.columns:
        return []
    edged = runs[runs["selection_edge"].fillna("").astype(str) != ""]
    if edged.empty:
        return []
    examples = "; ".join(
        f"{r.backbone} {r.resolution}px {r.probe}: {r.selection_edge}" for r in edged.head(5).itertuples()
    )
    return [
        f"Warning: {len(edged)} of {len(runs)} run(s) chose a hyper-parameter on the edge of its grid, so the "
        f"optimum may lie outside it (widen the grid): {examples}" + (" ..." if len(edged) > 5 else "")
    ]


def _exponent_words(c: Curve, h: Headline = AUROC) -> str:
    f = c.fit
    if f.exponent_identified:
        floor = "floor error" if h.goal == "max" else f"floor {short_name(h)}"
        return (
            f" (alpha={f.alpha:.2f} [{f.alpha_low:.2f}, {f.alpha_high:.2f}], "
            f"{floor} {f.floor:.3f} [{f.floor_low:.3f}, {f.floor_high:.3f}])"
        )
    return " (power law fitted, exponent not identified by the data)" if f.fitted else ""


def _verdict_line(c: Curve, h: Headline = AUROC) -> str:
    g, f = c.group, c.fit
    line = f"{g['dataset']} {g['probe']}/{g['strategy']}, vs {c.axis} at {c.at}: {f.verdict}{_exponent_words(c, h)}"
    if f.broken is not None and f.broken.delta_aicc > 2:
        line += (
            f"; a break at {c.axis}={f.broken.break_x:.3g} fits better (alpha {f.broken.alpha_before:.2f} "
            f"then {f.broken.alpha_after:.2f})"
        )
    if f.extrapolation is not None:
        line += f"; leave-largest-out: {f.extrapolation.describe(c.axis)}"
    return line


def _interval_text(low, high) -> str:
    """'[low, high]', or what stands in for an interval the data cannot give (too few test units)."""
    return f"[{low:.3f}, {high:.3f}]" if np.isfinite(low) and np.isfinite(high) else "(no interval: too few test units)"


def _best_lines(best: pd.DataFrame, h: Headline = AUROC) -> list[str]:
    return [
        f"{r.modality}: {r.backbone} ({r.n_params / 1e6:.2f}M params) at {r.resolution}px, {r.probe} probe, "
        f"{r.strategy}: {h.label} {r.test_metric:.3f} {_interval_text(r.test_low, r.test_high)}, chosen on {r.chosen_on}"
        for r in best.itertuples()
    ]


def _figures(
    curves: list[Curve], comparisons: pd.DataFrame, out_dir: Path, title: str, prov: str, h: Headline = AUROC
) -> list[tuple[str, Path]]:
    figures = []
    modalities = sorted({c.group["modality"] for c in curves})
    for modality in modalities:
        prefix = "" if len(modalities) == 1 else f"{modality}_"
        mine = [c for c in curves if c.group["modality"] == modality]
        for axis in AXES:
            p = plot_axis(
                mine, axis, out_dir / f"{prefix}{file_stem(h)}_vs_{axis}.png", f"{title} - {modality}", prov, h
            )
            if p is not None:
                figures.append((f"{modality}: {short_name(h)} vs {axis} ({direction(h)})", p))
    p = plot_strategies(comparisons, out_dir / "strategies.png", f"{title}: strategy differences", h)
    if p is not None:
        figures.append(("strategy differences (other - baseline)", p))
    return figures


def _markdown(rc: ReportContent) -> str:
    md = [f"# Scaling report: {rc.title}", ""]
    md += [f"> **{line}**" for line in ([DEMO_HEADLINE] if rc.demo else []) + rc.provenance] + [""]
    md += rc.method + [""]
    md += [f"![{cap}]({p.name})\n" for cap, p in rc.figures]
    md += _verdicts_markdown(rc).splitlines()
    md += ["", "## Results", "", _cells_markdown(rc.cells, rc.headline)]
    md += ["", f"Files: {', '.join(rc.files)}."]
    return "\n".join(md) + "\n"


def _verdicts_markdown(rc: ReportContent) -> str:
    md = ["## Verdicts", "", _headline_line(rc.headline), ""]
    for modality, lines in rc.verdicts.items():
        md += [f"### {modality}", ""] + [f"- {v}" for v in lines] + [""]
    md += ["## Best configuration", ""] + [f"- {b}" for b in rc.best] + [""]
    md += ["## Strategies", ""] + ([f"- {s}" for s in rc.strategies] or ["- only one strategy in these results"])
    return "\n".join(md) + "\n"


def _cells_markdown(cells: pd.DataFrame, h: Headline = AUROC) -> str:
    table = [
        f"| modality | dataset | probe | strategy | backbone | params | resolution | {h.label} [95% CI] | seeds |",
        "|---|---|---|---|---|---:|---:|---|---:|",
    ]
    for r in cells.sort_values([*CELL_KEYS[:-3], "resolution", "n_params"]).itertuples():
        table.append(
            f"| {r.modality} | {r.dataset} | {r.probe} | {r.strategy} | {r.backbone} | {r.n_params / 1e6:.2f}M | "
            f"{r.resolution} | {r.metric:.3f} {_interval_text(r.low, r.high)} | {r.seeds} |"
        )
    return "\n".join(table)


def write_report(
    df: pd.DataFrame,
    out_dir: Path,
    title: str,
    provenance: Provenance | list[str] | None,
    predictions: dict[str, pd.DataFrame] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    headline: Headline | None = None,
) -> Path:
    """Analyse a results table (one row per run) and write the report folder; returns it.

    ``provenance``: the sweep's ``Provenance`` (it decides whether the report is labelled DEMO), or
    lines about a results table (then the table's own ``weights`` column decides: random is a demo).

    ``predictions``: run_id -> per-sample test predictions, for patient-level paired resampling.
    ``headline``: the metric the table holds (default: ``df.attrs['headline']`` as set by
    ``results_from_mlflow`` / ``results_from_csv``, else detected from the columns).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        raise ValueError("no finished cells to analyse")
    headline = headline or df.attrs.get("headline") or detect_headline(df.columns)
    _clear_previous(out_dir, headline)
    runs = complete_columns(df)
    if isinstance(provenance, Provenance):
        demo, provenance = provenance.demo, provenance.lines()
    else:
        demo = "random" in set(runs["weights"].dropna().astype(str))
    provenance = list(provenance or []) + provenance_gaps(runs, list(provenance or []))
    cd = bootstrap_cells(runs, predictions, resamples=resamples, seed=seed, headline=headline)
    curves = build_curves(cd, seed=seed)
    comparisons = compare_strategies(cd)
    rc = ReportContent(
        title=title,
        provenance=provenance,
        method=_method(cd) + _selection_warnings(runs),
        figures=_figures(curves, comparisons, out_dir, title, " | ".join(provenance), headline),
        verdicts={
            m: [_verdict_line(c, headline) for c in curves if c.group["modality"] == m]
            for m in sorted({c.group["modality"] for c in curves})
        },
        best=_best_lines(best_configurations(cd), headline),
        strategies=summarize_strategies(comparisons, headline),
        cells=cd.cells.assign(headline=headline.test, goal=headline.goal),
        fits=fits_table(curves, headline),
        comparisons=comparisons,
        headline=headline,
        demo=demo,
    )
    _write_files(rc, out_dir)
    return out_dir


def _plot_patterns(stems) -> tuple[str, ...]:
    return tuple(f"*{stem}_vs_{axis}.png" for stem in stems for axis in AXES)


# every headline's plots (an earlier report in the same folder may have been on another metric)
_OWN_OUTPUTS = _plot_patterns(sorted({file_stem(h) for h in KNOWN_HEADLINES})) + ("strategies.png", "strategies.csv")


def _clear_previous(out_dir: Path, headline: Headline = AUROC) -> None:
    """Figures of an earlier report that this one does not redraw must not be attached as if current."""
    for pattern in _OWN_OUTPUTS + _plot_patterns([file_stem(headline)]):
        for f in out_dir.glob(pattern):
            f.unlink(missing_ok=True)


def _write_files(rc: ReportContent, out_dir: Path) -> None:
    rc.fits.to_csv(out_dir / "fits.csv", index=False)
    rc.cells.to_csv(out_dir / "results.csv", index=False)
    rc.files = ["fits.csv (fitted parameters)", "results.csv (cells with intervals)"]
    if not rc.comparisons.empty:
        rc.comparisons.to_csv(out_dir / "strategies.csv", index=False)
        rc.files.append("strategies.csv (strategy differences)")
    rc.files += ["report.html (self-contained)", "verdicts.md"]
    (out_dir / "verdicts.md").write_text(_verdicts_markdown(rc))
    (out_dir / "report.md").write_text(_markdown(rc))
    (out_dir / "report.html").write_text(render_html(rc), encoding="utf-8")
