"""A self-contained HTML report: one file, images embedded as data URIs, no scripts, no network.
It travels as a single MLflow artifact or e-mail attachment and still shows every plot."""

from __future__ import annotations

import base64
from html import escape

import numpy as np
import pandas as pd

from dinoscale import record
from dinoscale.analysis.curves import ALPHA_CI
from dinoscale.analysis.sources import headline_sentence
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
.answer{border:2px solid #2456a6;background:#f0f5ff;padding:.4em 1em;border-radius:6px}
.answer > ul > li{font-weight:bold} .answer li li{font-weight:normal}
.notes{background:#fffbe6;border:1px solid #e0c200;padding:.3em 1em;border-radius:6px;font-size:14px}
.block h4{margin:.8em 0 .2em}
"""
_FITS_SHOWN = [
    *record.CONTEXT_COLUMNS,
    *record.GROUP_AXES,  # probe, strategy and any axis added to the record
    "axis",
    "at",
    "n_points",
    "trend",
    "error",
    "alpha",
    *ALPHA_CI,
    "floor_error",
    "lolo_consistent",
]


def _provenance(lines: list[str], demo: bool, banner: str = DEMO_HEADLINE) -> str:
    head = f"<p><b>{escape(banner)}</b></p>" if demo else ""
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
    """The cells as a person reads them: the encoder's name, parameters in M, the headline with its interval in
    one column, val with its n, compute; columns that hold one value everywhere are said once under the table
    (so it fits a 1400 px page without scrolling sideways). Every column: results.csv."""
    h, c = rc.headline, rc.cells
    if c.empty:
        return "<p>none</p>"

    def num(v, fmt):
        return "-" if pd.isna(v) else format(v, fmt)

    table = pd.DataFrame(
        {
            **{k: c.get(k) for k in record.CONTEXT_COLUMNS},
            "encoder": c["backbone"],
            "params (M)": [num(v / 1e6, ".1f") for v in pd.to_numeric(c["n_params"], errors="coerce")],
            "resolution": [num(v, "g") for v in pd.to_numeric(c["resolution"], errors="coerce")],
            **{a: c[a] for a in record.GROUP_AXES if a in c},
            f"{h.test} [95% CI]": [
                num(m, ".3f") + (f" [{lo:.3f}, {hi:.3f}]" if pd.notna(lo) and pd.notna(hi) else "")
                for m, lo, hi in zip(c["metric"], c["low"], c["high"])
            ],
            f"{h.val} (n)": [
                num(v, ".3f") + (f" ({int(n)})" if pd.notna(n) else "")
                for v, n in zip(c["val_metric"], c.get("n_val", pd.Series(np.nan, index=c.index)))
            ],
            "GFLOPs / image": [num(v, ".3g") for v in pd.to_numeric(c.get("gflops"), errors="coerce")],
            "seeds": c.get("seeds"),
        }
    )
    same = [
        k
        for k in table.columns
        if k in (*record.CONTEXT_COLUMNS, *record.GROUP_AXES, "seeds") and k != "probe" and table[k].nunique() <= 1
    ]
    said = "; ".join(f"{k}: {table[k].iloc[0]}" for k in same)
    if "uncertainty" in c and c["uncertainty"].nunique() == 1:
        said += ("; " if said else "") + f"intervals: {c['uncertainty'].iloc[0]}"
    return _table(table.drop(columns=same)) + (f"<p>{escape(said)}.</p>" if said else "")


def _answer(rc) -> str:
    items, open_sub = [], False
    for level, text in rc.best:
        if level == 0:
            if open_sub:
                items.append("</ul></li>")
                open_sub = False
            elif items:
                items.append("</li>")
            items.append(f"<li>{escape(text)}")
        else:
            if not open_sub:
                items.append("<ul>")
                open_sub = True
            items.append(f"<li>{escape(text)}</li>")
    items.append("</ul></li>" if open_sub else "</li>" if items else "")
    notes = f'<div class="notes" id="notes"><b>About these results</b>{_list(rc.notes)}</div>' if rc.notes else ""
    return (
        f'<section class="answer" id="answer"><h2>Answer</h2><p>{escape(headline_sentence(rc.headline))}</p>'
        f"<ul>{''.join(items)}</ul></section>{notes}"
    )


def _blocks(rc) -> list[str]:
    parts = ["<h2>Verdicts</h2>"]
    for modality, blocks in rc.verdicts.items():
        if len(rc.verdicts) > 1:
            parts.append(f"<h3>{escape(modality)}</h3>")
        for title, lines in blocks:
            parts.append(f'<div class="block"><h4>{escape(title)}</h4>{_list(lines)}</div>')
    return parts


def render_html(rc) -> str:
    """``rc``: a report.ReportContent. Order: provenance, the answer, heatmaps and cost frontier, verdicts,
    then the detail (method, curves, fits, cells)."""
    parts = [
        f"<h1>Scaling report: {escape(rc.title)}</h1>",
        _provenance(rc.provenance, rc.demo, rc.banner),
        _answer(rc),
    ]
    parts += [_figure(cap, path.read_bytes()) for cap, path in rc.key_figures]
    parts += _blocks(rc)
    parts += ["<h2>Strategies</h2>", _list(rc.strategies or ["only one strategy in these results"])]
    if rc.families:  # one family: nothing to compare, no section
        parts += ["<h2>Encoder families</h2>", _list([x.strip() for x in rc.families])]
    if not rc.external.empty:
        parts += ["<h2>External test sets</h2>", _table(rc.external), "<p>All columns: external.csv.</p>"]
    parts += ["<h2>Method</h2>", _list(rc.method)]
    parts += ["<h2>Scaling curves</h2>"] + [_figure(cap, path.read_bytes()) for cap, path in rc.figures]
    parts += ["<h2>Fitted parameters</h2>", _table(rc.fits, _FITS_SHOWN), "<p>All columns: fits.csv.</p>"]
    if not rc.comparisons.empty:
        parts += ["<h2>Strategy differences</h2>", _table(rc.comparisons)]
    if not rc.family_comparisons.empty:
        parts += ["<h2>Encoder family differences (paired, same test patients)</h2>", _table(rc.family_comparisons)]
    parts += ["<h2>Cells</h2>", _cells(rc)]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(rc.title)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
