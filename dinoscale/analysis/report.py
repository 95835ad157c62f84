"""Plots (PNG), a CSV of fits and a markdown report. Provenance comes first, always."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dinoscale.analysis.scaling import fit_power_law

METRIC = "test_macro_auroc"


def _aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds; interval: mean of the per-seed bounds (seed-aware intervals come with more seeds)."""
    keys = ["probe", "strategy", "backbone", "n_params", "resolution"]
    return df.groupby(keys, as_index=False).agg(
        auroc=(METRIC, "mean"), low=(f"{METRIC}_ci_low", "mean"), high=(f"{METRIC}_ci_high", "mean"), seeds=("seed", "nunique"),
    )


def fit_table(agg: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (probe, strategy), g in agg.groupby(["probe", "strategy"]):
        for res, h in g.groupby("resolution"):
            f = fit_power_law(h["n_params"], h["auroc"], h["low"], h["high"], axis="params")
            rows.append({"probe": probe, "strategy": strategy, "axis": "params", "at": f"resolution={res}", **_fit_row(f)})
        for bb, h in g.groupby("backbone"):
            f = fit_power_law(h["resolution"], h["auroc"], h["low"], h["high"], axis="resolution")
            rows.append({"probe": probe, "strategy": strategy, "axis": "resolution", "at": f"backbone={bb}", **_fit_row(f)})
    return pd.DataFrame(rows)


def _fit_row(f) -> dict:
    return {"n_points": f.n_points, "alpha": f.alpha, "alpha_ci_low": f.alpha_low, "alpha_ci_high": f.alpha_high,
            "amplitude": f.amplitude, "verdict": f.verdict}


def _plot(agg: pd.DataFrame, fits: pd.DataFrame, x: str, series: str, path: Path, title: str, provenance: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = sorted(agg["probe"].unique())
    fig, axes = plt.subplots(1, len(probes), figsize=(5.2 * len(probes), 4.2), squeeze=False, sharey=True)
    for ax, probe in zip(axes[0], probes):
        g = agg[agg["probe"] == probe]
        for i, (name, h) in enumerate(g.groupby(series)):
            h = h.sort_values(x)
            color = f"C{i}"
            ax.plot(h[x], h["auroc"], "o-", color=color, label=f"{series}={name}")
            ax.fill_between(h[x], h["low"], h["high"], color=color, alpha=0.15)
            axis = "params" if x == "n_params" else "resolution"
            at = f"{'resolution' if axis == 'params' else 'backbone'}={name}"
            f = fits[(fits["probe"] == probe) & (fits["axis"] == axis) & (fits["at"] == at)]
            if len(f) and pd.notna(f.iloc[0]["alpha"]):
                xs = np.geomspace(h[x].min(), h[x].max(), 50)
                ax.plot(xs, 1 - f.iloc[0]["amplitude"] * xs ** (-f.iloc[0]["alpha"]), "--", color=color, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("parameters" if x == "n_params" else "input resolution (px)")
        ax.set_title(f"probe: {probe}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test macro AUROC (band: 95% CI, dashed: power-law fit)")
    fig.suptitle(f"{title}\n{provenance}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(df: pd.DataFrame, out_dir: Path, title: str, provenance: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if df.empty:
        raise ValueError("no finished cells to analyse")
    agg = _aggregate(df)
    fits = fit_table(agg)
    fits.to_csv(out_dir / "fits.csv", index=False)
    agg.to_csv(out_dir / "results.csv", index=False)
    prov = " | ".join(provenance) if provenance else "provenance unknown"
    _plot(agg, fits, "n_params", "resolution", out_dir / "auroc_vs_params.png", title, prov)
    _plot(agg, fits, "resolution", "backbone", out_dir / "auroc_vs_resolution.png", title, prov)

    verdicts = ["## Verdicts", ""]
    for r in fits.itertuples():
        exp = f" (alpha={r.alpha:.2f} [{r.alpha_ci_low:.2f}, {r.alpha_ci_high:.2f}])" if pd.notna(r.alpha) else ""
        verdicts.append(f"- {r.probe}/{r.strategy}, vs {r.axis} at {r.at}: {r.verdict}{exp}")
    best = agg.loc[agg["auroc"].idxmax()]
    verdicts += ["", f"Best cell on test: {best.backbone} at {best.resolution}px, {best.probe} probe: "
                     f"AUROC {best.auroc:.3f} [{best.low:.3f}, {best.high:.3f}]"]
    (out_dir / "verdicts.md").write_text("\n".join(verdicts) + "\n")

    table = ["| probe | strategy | backbone | params | resolution | test macro AUROC [95% CI] | seeds |", "|---|---|---|---:|---:|---|---:|"]
    for r in agg.sort_values(["probe", "resolution", "n_params"]).itertuples():
        table.append(f"| {r.probe} | {r.strategy} | {r.backbone} | {r.n_params / 1e6:.2f}M | {r.resolution} | "
                     f"{r.auroc:.3f} [{r.low:.3f}, {r.high:.3f}] | {r.seeds} |")
    md = [f"# Scaling report: {title}", ""]
    md += [f"> **{line}**" for line in provenance] + [""]
    md += ["Error E = 1 - AUROC fitted as E = A * x^(-alpha) where there are at least 3 points; alpha > 0 means "
           "bigger is better. Intervals: patient-level bootstrap per cell; the exponent's from redrawing each point "
           "within its interval.", ""]
    md += ["![AUROC vs parameters](auroc_vs_params.png)", "", "![AUROC vs resolution](auroc_vs_resolution.png)", ""]
    md += (out_dir / "verdicts.md").read_text().splitlines() + ["", "## Results", ""] + table
    md += ["", "Fitted parameters: `fits.csv`; aggregated results: `results.csv`."]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return out_dir
