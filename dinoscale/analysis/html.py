"""A self-contained HTML report: one file, images embedded as data URIs, no scripts, no network.
It travels as a single MLflow artifact or e-mail attachment and still shows every plot."""

from __future__ import annotations

import base64
from html import escape

import pandas as pd

from dinoscale.provenance import DEMO_HEADLINE

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}
.provenance{border:2px solid #2b7a2b;background:#eef8ee;padding:.6em 1em;border-radius:6px}
.provenance.demo{border-color:#b00;background:#fff0f0}
.provenance li{font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
figure{margin:1em 0} figcaption{font-size:13px;color:#555}
"""
_FITS_SHOWN = [
    "modality",
    "dataset",
    "probe",
    "strategy",
    "axis",
    "at",
    "n_points",
    "trend",
    "error",
    "alpha",
    "alpha_ci_low",
    "alpha_ci_high",
    "floor_error",
    "lolo_consistent",
]


def _provenance(lines: list[str], demo: bool) -> str:
    head = f"<p><b>{escape(DEMO_HEADLINE)}</b></p>" if demo else ""
    items = "".join(f"<li>{escape(x)}</li>" for x in lines) or "<li>provenance unknown</li>"
    return f'<section class="provenance{" demo" if demo else ""}" id="provenance"><h2>Provenance</h2>{head}<ul>{items}</ul></section>'


def _figure(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _list(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(x)}</li>" for x in lines) + "</ul>"


def _table(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    if df.empty:
        return "<p>none</p>"
    shown = df[[c for c in (columns or df.columns) if c in df.columns]]
    return shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0, escape=True)


def _cells(rc) -> str:
    h = rc.headline
    cells = rc.cells.drop(columns=["pairing", "headline", "goal"], errors="ignore")
    return _table(
        cells.rename(
            columns={"metric": h.test, "low": f"{h.test}_ci_low", "high": f"{h.test}_ci_high", "val_metric": h.val}
        )
    )


def render_html(rc) -> str:
    """``rc``: a report.ReportContent."""
    parts = [
        f"<h1>Scaling report: {escape(rc.title)}</h1>",
        _provenance(rc.provenance, rc.demo),
        "<h2>Method</h2>",
        _list(rc.method),
    ]
    parts += ["<h2>Verdicts</h2>"]
    for modality, lines in rc.verdicts.items():
        parts += [f"<h3>{escape(modality)}</h3>", _list(lines)]
    parts += ["<h2>Best configuration</h2>", _list(rc.best)]
    parts += ["<h2>Strategies</h2>", _list(rc.strategies or ["only one strategy in these results"])]
    parts += ["<h2>Plots</h2>"] + [_figure(cap, path.read_bytes()) for cap, path in rc.figures]
    parts += ["<h2>Fitted parameters</h2>", _table(rc.fits, _FITS_SHOWN), "<p>All columns: fits.csv.</p>"]
    if not rc.comparisons.empty:
        parts += ["<h2>Strategy differences</h2>", _table(rc.comparisons)]
    parts += ["<h2>Cells</h2>", _cells(rc)]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(rc.title)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
