"""The report: PNG plots, fitted parameters (CSV), a markdown summary and a self-contained HTML page.
Provenance of data and weights comes first, always."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dinoscale.analysis.compare import best_configurations, compare_strategies, summarize_strategies
from dinoscale.analysis.curves import AXES, Curve, build_curves, fits_table
from dinoscale.analysis.html import render_html
from dinoscale.analysis.plots import plot_axis, plot_strategies
from dinoscale.analysis.resample import CellDraws, bootstrap_cells
from dinoscale.analysis.scaling import MIN_POINTS, MIN_POINTS_BROKEN, MIN_POINTS_EXTRAPOLATION
from dinoscale.analysis.sources import complete_columns, provenance_gaps

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


def _method(cd: CellDraws) -> list[str]:
    sources = ", ".join(sorted(set(cd.cells["uncertainty"])))
    return [
        "Error E = 1 - test macro AUROC, fitted per (modality, dataset, probe, strategy) as a saturating power law "
        "E = floor + A * x^(-alpha) (robust soft-L1 loss, several starts); alpha > 0 means larger x is better.",
        f"No exponent below {MIN_POINTS} distinct x values: the verdict then says 'too few points to fit'. A one-break "
        f"broken power law is fitted from {MIN_POINTS_BROKEN} points; a leave-largest-out extrapolation check from "
        f"{MIN_POINTS_EXTRAPOLATION}.",
        f"Verdicts compare the points themselves through paired bootstrap draws ({len(cd.draws)} resamples; "
        f"uncertainty from {sources}); 'no reliable trend' means the 95% intervals of the differences include zero.",
    ]


def _exponent_words(c: Curve) -> str:
    f = c.fit
    if f.exponent_identified:
        return (f" (alpha={f.alpha:.2f} [{f.alpha_low:.2f}, {f.alpha_high:.2f}], "
                f"floor error {f.floor:.3f} [{f.floor_low:.3f}, {f.floor_high:.3f}])")
    return " (power law fitted, exponent not identified by the data)" if f.fitted else ""


def _verdict_line(c: Curve) -> str:
    g, f = c.group, c.fit
    line = f"{g['dataset']} {g['probe']}/{g['strategy']}, vs {c.axis} at {c.at}: {f.verdict}{_exponent_words(c)}"
    if f.broken is not None and f.broken.delta_aicc > 2:
        line += (f"; a break at {c.axis}={f.broken.break_x:.3g} fits better (alpha {f.broken.alpha_before:.2f} "
                 f"then {f.broken.alpha_after:.2f})")
    if f.extrapolation is not None:
        line += f"; leave-largest-out: {f.extrapolation.describe(c.axis)}"
    return line


def _best_lines(best: pd.DataFrame) -> list[str]:
    return [f"{r.modality}: {r.backbone} ({r.n_params / 1e6:.2f}M params) at {r.resolution}px, {r.probe} probe, "
            f"{r.strategy}: test macro AUROC {r.test_metric:.3f} [{r.test_low:.3f}, {r.test_high:.3f}], chosen on {r.chosen_on}"
            for r in best.itertuples()]


def _figures(curves: list[Curve], comparisons: pd.DataFrame, out_dir: Path, title: str, prov: str) -> list[tuple[str, Path]]:
    figures = []
    modalities = sorted({c.group["modality"] for c in curves})
    for modality in modalities:
        prefix = "" if len(modalities) == 1 else f"{modality}_"
        mine = [c for c in curves if c.group["modality"] == modality]
        for axis in AXES:
            p = plot_axis(mine, axis, out_dir / f"{prefix}auroc_vs_{axis}.png", f"{title} - {modality}", prov)
            if p is not None:
                figures.append((f"{modality}: AUROC vs {axis}", p))
    p = plot_strategies(comparisons, out_dir / "strategies.png", f"{title}: strategy differences")
    if p is not None:
        figures.append(("strategy differences (other - baseline)", p))
    return figures


def _markdown(rc: ReportContent) -> str:
    md = [f"# Scaling report: {rc.title}", ""]
    md += [f"> **{line}**" for line in rc.provenance] + [""]
    md += rc.method + [""]
    md += [f"![{cap}]({p.name})\n" for cap, p in rc.figures]
    md += _verdicts_markdown(rc).splitlines()
    md += ["", "## Results", "", _cells_markdown(rc.cells)]
    md += ["", f"Files: {', '.join(rc.files)}."]
    return "\n".join(md) + "\n"


def _verdicts_markdown(rc: ReportContent) -> str:
    md = ["## Verdicts", ""]
    for modality, lines in rc.verdicts.items():
        md += [f"### {modality}", ""] + [f"- {v}" for v in lines] + [""]
    md += ["## Best configuration", ""] + [f"- {b}" for b in rc.best] + [""]
    md += ["## Strategies", ""] + ([f"- {s}" for s in rc.strategies] or ["- only one strategy in these results"])
    return "\n".join(md) + "\n"


def _cells_markdown(cells: pd.DataFrame) -> str:
    table = ["| modality | dataset | probe | strategy | backbone | params | resolution | test macro AUROC [95% CI] | seeds |",
             "|---|---|---|---|---|---:|---:|---|---:|"]
    for r in cells.sort_values(["modality", "dataset", "probe", "strategy", "resolution", "n_params"]).itertuples():
        table.append(f"| {r.modality} | {r.dataset} | {r.probe} | {r.strategy} | {r.backbone} | {r.n_params / 1e6:.2f}M | "
                     f"{r.resolution} | {r.metric:.3f} [{r.low:.3f}, {r.high:.3f}] | {r.seeds} |")
    return "\n".join(table)


def write_report(df: pd.DataFrame, out_dir: Path, title: str, provenance: list[str] | None,
                 predictions: dict[str, pd.DataFrame] | None = None, resamples: int = RESAMPLES, seed: int = 0) -> Path:
    """Analyse a results table (one row per run) and write the report folder; returns it.

    ``predictions``: run_id -> per-sample test predictions, for patient-level paired resampling.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        raise ValueError("no finished cells to analyse")
    _clear_previous(out_dir)
    runs = complete_columns(df)
    provenance = list(provenance or []) + provenance_gaps(runs, list(provenance or []))
    cd = bootstrap_cells(runs, predictions, resamples=resamples, seed=seed)
    curves = build_curves(cd, seed=seed)
    comparisons = compare_strategies(cd)
    rc = ReportContent(
        title=title, provenance=provenance, method=_method(cd),
        figures=_figures(curves, comparisons, out_dir, title, " | ".join(provenance)),
        verdicts={m: [_verdict_line(c) for c in curves if c.group["modality"] == m]
                  for m in sorted({c.group["modality"] for c in curves})},
        best=_best_lines(best_configurations(cd)), strategies=summarize_strategies(comparisons),
        cells=cd.cells, fits=fits_table(curves), comparisons=comparisons,
    )
    _write_files(rc, out_dir)
    return out_dir


_OWN_OUTPUTS = ("*auroc_vs_*.png", "strategies.png", "strategies.csv")


def _clear_previous(out_dir: Path) -> None:
    """Figures of an earlier report that this one does not redraw must not be attached as if current."""
    for pattern in _OWN_OUTPUTS:
        for f in out_dir.glob(pattern):
            f.unlink()


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
