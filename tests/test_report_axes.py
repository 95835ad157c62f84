"""The report groups by every axis the record holds: a categorical axis added to ``record.AXES`` (step 2 of
ARCHITECTURE.md's "a categorical grid axis") gets its own heatmap panels, curves, verdict blocks and columns,
instead of two of its values overwriting each other in one panel.

The axis is added the way a contributor would add it, by one ``Axis(...)`` line in ``record.py``; the patched
record is loaded in a child interpreter so that no other test sees it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    r"""
    import json, pathlib, sys, types

    import dinoscale

    path = pathlib.Path(dinoscale.__file__).parent / "record.py"
    anchor = '    Axis("strategy"),\n'
    source = path.read_text()
    assert anchor in source, "record.AXES no longer lists strategy on its own line"
    record = types.ModuleType("dinoscale.record")
    record.__file__ = str(path)
    sys.modules["dinoscale.record"] = record
    exec(compile(source.replace(anchor, anchor + '    Axis("tokens"),\n'), str(path), "exec"), record.__dict__)
    dinoscale.record = record

    import pandas as pd

    from dinoscale.analysis import write_report
    from dinoscale.analysis.curves import build_curves
    from dinoscale.analysis.plots import curve_panels, heatmap_panels, panel_title
    from dinoscale.analysis.resample import bootstrap_cells
    from dinoscale.analysis.sources import tidy_results
    from dinoscale.headline import AUROC

    assert "tokens" in record.GROUP_AXES
    rows = []
    for tokens, shift in (("cls", 0.0), ("patch", 0.1)):  # the same size x resolution grid, twice
        for name, n in (("s", 1e6), ("m", 4e6), ("l", 1.6e7), ("xl", 6.4e7)):
            for res in (64, 128):
                m = 0.6 + shift + 0.05 * len(name) + res / 1e4
                rows.append(dict(modality="xray", dataset="d", weights="hub", backbone=name, n_params=int(n),
                                 resolution=res, probe="linear", strategy="frozen", tokens=tokens, seed=0,
                                 test_macro_auroc=m, test_macro_auroc_ci_low=m - 0.01, test_macro_auroc_ci_high=m + 0.01))
    df = pd.DataFrame(rows)
    cd = bootstrap_cells(tidy_results(df, AUROC), resamples=100)
    curves, _ = build_curves(cd)
    out = write_report(df, pathlib.Path(sys.argv[1]), "axis", ["results table"], resamples=100)
    results = pd.read_csv(out / "results.csv")
    fits = pd.read_csv(out / "fits.csv")
    print(json.dumps({
        "heatmap_panels": [panel_title(k) for k, _ in heatmap_panels(cd.cells)],
        "heatmap_cells": [len(g) for _, g in heatmap_panels(cd.cells)],
        "curve_panels": [panel_title(k) for k, _ in curve_panels([c for c in curves if c.axis == "params"])],
        "results_tokens": sorted(results["tokens"].unique()),
        "results_rows": len(results),
        "fits_tokens": sorted(fits["tokens"].unique()),
        "report": (out / "report.md").read_text(),
        "html": (out / "report.html").read_text(),
    }))
    """
)


def test_a_new_axis_gets_its_own_panels_curves_and_columns(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "report")], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # the heatmap: one panel per value, each holding its own 4 sizes x 2 resolutions (none overwritten)
    assert got["heatmap_panels"] == ["probe: linear | frozen | tokens: cls", "probe: linear | frozen | tokens: patch"]
    assert got["heatmap_cells"] == [8, 8]
    # the curves vs size: one panel per value
    assert got["curve_panels"] == [
        "d | probe: linear | frozen | tokens: cls",
        "d | probe: linear | frozen | tokens: patch",
    ]
    # the tables keep the axis: 16 cells, not 8 averaged pairs; a fit per value
    assert got["results_rows"] == 16 and got["results_tokens"] == ["cls", "patch"]
    assert got["fits_tokens"] == ["cls", "patch"]
    # the verdict blocks and the best configuration name it
    assert "tokens: cls" in got["report"] and "tokens: patch" in got["report"]
    assert "<th>tokens</th>" in got["html"]
