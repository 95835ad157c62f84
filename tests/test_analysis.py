"""Scaling fits: exponents recovered from a known law; verdicts on constructed cases; the report."""

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from dinoscale.analysis import fit_power_law, results_from_csv, write_report
from dinoscale.cli import app


def _law(x, a=2.0, alpha=0.3):
    return 1 - a * np.asarray(x, float) ** (-alpha)


def test_exponent_recovered_from_noisy_known_law():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e6, 3e8, 6)
    truth = _law(x, a=20.0, alpha=0.25)
    metric = truth + rng.normal(0, 0.002, len(x))
    fit = fit_power_law(x, metric, metric - 0.004, metric + 0.004, axis="params")
    assert abs(fit.alpha - 0.25) < 0.03
    assert fit.alpha_low < 0.25 < fit.alpha_high
    assert fit.verdict.startswith("improves")
    np.testing.assert_allclose(fit.predict_metric(x), truth, atol=0.01)


def test_verdicts_on_constructed_cases():
    x = np.array([1e6, 4e6, 1.6e7, 6.4e7])
    tight = 0.005
    up = np.array([0.70, 0.78, 0.84, 0.88])
    assert fit_power_law(x, up, up - tight, up + tight, "params").verdict == "improves with params"
    down = up[::-1]
    assert fit_power_law(x, down, down - tight, down + tight, "params").verdict == "degrades with params"
    peak = np.array([0.70, 0.85, 0.86, 0.72])
    assert fit_power_law(x, peak, peak - tight, peak + tight, "params").verdict == "peaks at params=1.6e+07"
    flat = np.array([0.80, 0.81, 0.79, 0.805])
    v = fit_power_law(x, flat, flat - 0.05, flat + 0.05, "params").verdict
    assert v.startswith("no reliable trend")
    sat = np.array([0.70, 0.80, 0.850, 0.852])
    assert "saturating beyond params=1.6e+07" in fit_power_law(x, sat, sat - 0.01, sat + 0.01, "params").verdict


def test_too_few_points_gives_no_exponent():
    fit = fit_power_law([1e6, 1e7], [0.7, 0.8], [0.68, 0.78], [0.72, 0.82], "params")
    assert fit.alpha is None and fit.verdict.startswith("too few points to fit (2 < 3)")
    assert "beats the smallest" in fit.verdict


def _table():
    rows = []
    for probe in ("linear", "knn"):
        for res in (64, 128, 224):
            for name, n in (("a", 1e6), ("b", 4e6), ("c", 1.6e7)):
                m = _law(n, 5, 0.2) - (0.02 if probe == "knn" else 0) + res / 1e4
                rows.append(dict(backbone=name, n_params=int(n), resolution=res, probe=probe, strategy="frozen", seed=0,
                                 test_macro_auroc=m, test_macro_auroc_ci_low=m - 0.01, test_macro_auroc_ci_high=m + 0.01))
    return pd.DataFrame(rows)


def test_report_from_csv_has_plots_provenance_and_fits(tmp_path):
    csv = tmp_path / "published.csv"
    _table().to_csv(csv, index=False)
    res = CliRunner().invoke(app, ["analyze", "--csv", str(csv), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    rep = tmp_path / "rep"
    for f in ("report.md", "auroc_vs_params.png", "auroc_vs_resolution.png", "fits.csv", "results.csv"):
        assert (rep / f).stat().st_size > 0
    md = (rep / "report.md").read_text()
    assert md.splitlines()[2].startswith("> **results table")  # provenance first
    fits = pd.read_csv(rep / "fits.csv")
    assert len(fits) == 2 * (3 + 3)
    assert (fits[fits.axis == "params"].verdict.str.startswith("improves")).all()
    assert (fits.alpha[fits.axis == "params"] - 0.2).abs().max() < 0.05
    assert (rep / "auroc_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_csv_missing_columns_is_named(tmp_path):
    import pytest

    csv = tmp_path / "bad.csv"
    _table().drop(columns=["resolution"]).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['resolution'\]"):
        results_from_csv(csv)


def test_write_report_refuses_empty(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="no finished cells"):
        write_report(_table().iloc[0:0], tmp_path, "t", [])
