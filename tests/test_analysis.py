"""Scaling analysis: exponents recovered from known laws, verdicts on constructed cases, paired
resampling over patients and seeds, strategy comparisons, and the report from a CSV or MLflow."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dinoscale.analysis import bootstrap_cells, fit_curve, fit_power_law, results_from_csv, write_report
from dinoscale.analysis.compare import compare_strategies
from dinoscale.cli import app


def _saturating_metric(x, floor=0.1, a=0.3, alpha=0.35, x0=1e6):
    return 1 - (floor + a * (np.asarray(x, float) / x0) ** (-alpha))


# ---------------------------------------------------------------- fits recover known laws


@pytest.mark.parametrize("noise_seed", [0, 1, 2])
def test_saturating_law_recovered_with_intervals(noise_seed):
    x = np.geomspace(1e6, 1e9, 8)
    rng = np.random.default_rng(noise_seed)
    metric = _saturating_metric(x) + rng.normal(0, 0.003, len(x))
    fit = fit_power_law(x, metric, metric - 0.006, metric + 0.006, axis="params")
    assert abs(fit.alpha - 0.35) < 0.06
    assert fit.alpha_low <= 0.35 <= fit.alpha_high
    assert abs(fit.floor - 0.1) < 0.02 and fit.floor_low <= 0.1 <= fit.floor_high
    assert fit.verdict == "improves with params" and fit.exponent_identified
    # the bootstrap band on the curve contains the truth across the range
    truth = _saturating_metric(fit.band["x"])
    assert np.mean((fit.band["low"] <= truth) & (truth <= fit.band["high"])) > 0.9
    assert fit.extrapolation is not None and fit.extrapolation.consistent


def test_pure_power_law_recovered():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e6, 3e8, 6)
    truth = 1 - 20.0 * x ** (-0.25)
    metric = truth + rng.normal(0, 0.002, len(x))
    fit = fit_power_law(x, metric, metric - 0.004, metric + 0.004, axis="params")
    assert abs(fit.alpha - 0.25) < 0.03
    assert fit.alpha_low <= 0.25 <= fit.alpha_high
    np.testing.assert_allclose(fit.predict_metric(x), truth, atol=0.01)


def test_robust_loss_shrugs_off_one_outlying_point():
    x = np.geomspace(1e6, 1e9, 8)
    metric = _saturating_metric(x)
    metric[3] += 0.06  # twenty standard deviations off the law
    fit = fit_power_law(x, metric, metric - 0.006, metric + 0.006, axis="params")
    assert abs(fit.alpha - 0.35) < 0.05


def test_broken_power_law_found_where_the_slope_changes():
    x = np.geomspace(1e6, 1e10, 9)
    u = np.log(x / 1e8)
    err = 0.2 * np.exp(-np.where(u < 0, 0.4 * u, 0.02 * u))  # steep, then almost flat beyond 1e8
    metric = 1 - err
    fit = fit_power_law(x, metric, metric - 0.004, metric + 0.004, axis="params")
    assert fit.broken is not None and fit.broken.delta_aicc > 2
    assert 3e7 < fit.broken.break_x < 3e8
    assert fit.broken.alpha_before > 0.3 and abs(fit.broken.alpha_after) < 0.1


def test_leave_largest_out_flags_a_law_that_does_not_extrapolate():
    x = np.geomspace(1e6, 1e9, 7)
    metric = _saturating_metric(x)
    metric[-1] += 0.05  # the largest model jumps far above the saturating trend
    fit = fit_power_law(x, metric, metric - 0.005, metric + 0.005, axis="params")
    assert fit.extrapolation is not None and not fit.extrapolation.consistent
    assert "does NOT extrapolate" in fit.extrapolation.describe("params")


# ---------------------------------------------------------------- verdicts

X4 = np.array([1e6, 4e6, 1.6e7, 6.4e7])


def _verdict(metric, half_width):
    metric = np.array(metric)
    return fit_power_law(X4, metric, metric - half_width, metric + half_width, "params")


def test_a_verdict_never_says_improves_when_its_exponent_interval_reaches_zero():
    """Issue 26: the paired comparison of the end points says "improves", the fitted exponent's interval
    reaches below 0 (and up to its optimiser bound): the verdict says no reliable trend, quoting both."""
    fit = fit_power_law(
        [1, 2, 4, 8], np.array([0.712, 0.731, 0.696, 0.741]), *_band([0.712, 0.731, 0.696, 0.741], 0.02), "params"
    )
    assert fit.trend == "no_trend" and "improves" not in fit.verdict
    assert fit.verdict.startswith("no reliable trend with params: params=8 scores above params=1 on paired resamples")
    assert fit.alpha_low <= 0 and "includes 0" in fit.verdict and "+5 (its bound)" in fit.verdict
    assert fit.notes == ["the paired comparison alone says 'improves with params'"] and fit.extrapolation is None
    up = _verdict([0.70, 0.78, 0.84, 0.88], 0.005)  # a clean improvement keeps its words and its exponent
    assert up.trend == "improves" and up.alpha_low > 0 and up.alpha_identified


def test_a_parameter_at_its_optimiser_bound_is_reported_not_identified():
    """The fits table shows "not identified" where the fit stopped on a bound (alpha +-5, floor 0), not the
    bound's number (the issue's alpha interval of +-5 and floor of 3.7e-14)."""
    from dinoscale.analysis.curves import Curve, fits_table

    m = np.array([0.70, 0.71, 0.70, 0.75])
    fit = fit_power_law([1, 2, 4, 8], m, m - 0.03, m + 0.03, "params")
    assert not fit.alpha_identified and max(abs(fit.alpha_low), abs(fit.alpha_high)) >= 4.95
    assert not fit.floor_identified and fit.floor < 1e-9
    row = fits_table([Curve({}, "params", "", np.array([1, 2, 4, 8]), m, m - 0.03, m + 0.03, [], fit)]).iloc[0]
    assert row.alpha == row.alpha_ci_high == row.floor_error == row.amplitude == "not identified"
    assert not row.exponent_identified
    good = _verdict([0.70, 0.78, 0.84, 0.88], 0.005)
    good_row = fits_table([Curve({}, "params", "", X4, good.band["metric"][:4], X4, X4, [], good)]).iloc[0]
    assert isinstance(good_row.alpha, float) and good_row.alpha > 0


def _band(metric, half_width):
    metric = np.array(metric)
    return metric - half_width, metric + half_width


def test_verdicts_on_constructed_cases():
    up = _verdict([0.70, 0.78, 0.84, 0.88], 0.005)
    assert (up.trend, up.verdict) == ("improves", "improves with params") and up.exponent_identified
    down = _verdict([0.88, 0.84, 0.78, 0.70], 0.005)
    assert (down.trend, down.verdict) == ("degrades", "degrades with params") and down.alpha_high < 0
    peak = _verdict([0.70, 0.85, 0.86, 0.72], 0.005)
    assert (peak.trend, peak.verdict) == ("peaks", "peaks at params=1.6e+07") and not peak.exponent_identified
    flat = _verdict([0.80, 0.81, 0.79, 0.805], 0.05)
    assert flat.trend == "no_trend" and flat.verdict == "no reliable trend with params (intervals overlap)"
    assert not flat.exponent_identified  # never a confident exponent from noise
    for fit in (up, down, peak, flat):  # intervals exist even where alpha = 0 makes floor and A one parameter
        assert np.isfinite([fit.floor_low, fit.floor_high]).all() and np.isfinite(fit.band["low"]).all()
    sat = _verdict([0.70, 0.80, 0.850, 0.852], 0.01)
    assert sat.trend == "saturates" and sat.verdict == "improves with params, saturates beyond params=1.6e+07"


def test_steady_small_gains_are_improvement_not_saturation():
    # each step is within noise, the whole run is not, and the gain per decade does not drop
    x = np.geomspace(1e6, 1e8, 5)
    steady = np.array([0.80, 0.81, 0.82, 0.83, 0.84])
    fit = fit_power_law(x, steady, steady - 0.012, steady + 0.012, "params")
    assert fit.trend == "improves" and fit.verdict == "improves with params"


def test_three_points_give_too_few_points_and_no_exponent():
    fit = fit_power_law([1e6, 1e7, 1e8], [0.70, 0.80, 0.85], [0.69, 0.79, 0.84], [0.71, 0.81, 0.86], "params")
    assert fit.verdict.startswith("too few points to fit (3 < 4 distinct params values)")
    assert fit.verdict.endswith("improves with params")  # what the points alone say, caveat first
    assert fit.alpha is None and fit.amplitude is None and fit.band is None and not fit.fitted
    two = fit_power_law([1e6, 1e7], [0.7, 0.8], [0.68, 0.78], [0.72, 0.82], "params")
    assert two.alpha is None and two.verdict.startswith("too few points to fit (2 < 4")


def test_duplicate_x_is_refused_with_the_axis_named():
    with pytest.raises(ValueError, match=r"fit_curve\(params\): x values must be distinct"):
        fit_curve([1e6, 1e6, 1e7, 1e8], [0.7, 0.71, 0.8, 0.85], np.full((10, 4), 0.8), "params")


# ---------------------------------------------------------------- resampling: patients, seeds, strategies


def _predictions(n_patients, signal, rng, classes=("a", "b")):
    """Per-sample test predictions with 2 images per patient; ``signal`` scales how well scores separate."""
    pid = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(pid))], "patient_id": pid})
    for c in classes:
        y = rng.integers(0, 2, len(pid))
        df[f"label_{c}"] = y
        df[f"score_{c}"] = y * signal + rng.normal(0, 1, len(pid))
    return df


def _run(run_id, strategy, metric, low, high, seed=0, **kw):
    row = dict(
        run_id=run_id,
        modality="xray",
        dataset="toy",
        backbone="b",
        n_params=1_000_000,
        resolution=224,
        probe="linear",
        strategy=strategy,
        seed=seed,
        test_macro_auroc=metric,
        test_macro_auroc_ci_low=low,
        test_macro_auroc_ci_high=high,
    )
    return {**row, **kw}


def test_patient_resampling_pairs_cells_and_sharpens_strategy_comparison():
    from dinoscale.metrics import macro_auroc, patient_bootstrap

    rng = np.random.default_rng(0)
    frozen = _predictions(60, 1.0, rng)
    lora = frozen.copy()
    for c in ("a", "b"):  # same noise per sample, a little more signal: a small but consistent gain
        lora[f"score_{c}"] = frozen[f"score_{c}"] + 0.15 * frozen[f"label_{c}"]
    runs = []
    for rid, p in (("f", frozen), ("l", lora)):
        y, s = p[["label_a", "label_b"]].to_numpy(), p[["score_a", "score_b"]].to_numpy()
        ci = patient_bootstrap(y, s, p["patient_id"].to_numpy(), resamples=300)
        runs.append(_run(rid, "frozen" if rid == "f" else "lora", macro_auroc(y, s), ci.low, ci.high))
    runs = pd.DataFrame(runs)
    assert runs.test_macro_auroc_ci_high[0] > runs.test_macro_auroc_ci_low[1]  # per-cell intervals overlap

    paired = compare_strategies(bootstrap_cells(runs, {"f": frozen, "l": lora}, resamples=400)).iloc[0]
    assert (paired.baseline, paired.other, paired.paired) == ("frozen", "lora", "paired over patients")
    assert paired.verdict == "lora better than frozen" and paired.delta_low > 0

    unpaired = compare_strategies(bootstrap_cells(runs, None, resamples=400)).iloc[0]
    assert unpaired.paired == "unpaired (independent draws)"
    assert unpaired.verdict == "no reliable difference between lora and frozen"


def test_seed_spread_widens_the_cell_interval():
    runs = pd.DataFrame(
        [_run("s0", "frozen", 0.70, 0.69, 0.71, seed=0), _run("s1", "frozen", 0.80, 0.79, 0.81, seed=1)]
    )
    cell = bootstrap_cells(runs, resamples=400).cells.iloc[0]
    assert cell.seeds == 2 and cell.metric == pytest.approx(0.75)
    assert cell.low < 0.72 and cell.high > 0.78  # wider than either seed's own interval


def test_strategies_compared_generically_over_the_strategy_column():
    runs = pd.DataFrame(
        [
            _run("f", "frozen", 0.70, 0.69, 0.71),
            _run("l", "lora", 0.80, 0.79, 0.81),
            _run("x", "full", 0.75, 0.60, 0.90),
            _run("z", "zz-custom", 0.70, 0.69, 0.71),
        ]
    )
    cmp = compare_strategies(bootstrap_cells(runs, resamples=400))
    assert len(cmp) == 6  # every pair once, cheapest strategy as baseline
    verdicts = dict(zip(zip(cmp.baseline, cmp.other), cmp.verdict))
    assert verdicts[("frozen", "lora")] == "lora better than frozen"
    assert verdicts[("lora", "zz-custom")] == "zz-custom worse than lora"
    assert verdicts[("frozen", "full")].startswith("no reliable difference")


def test_a_run_without_interval_gives_a_cell_of_unknown_uncertainty_not_an_invented_one():
    runs = pd.DataFrame(
        [
            _run("r7", "frozen", 0.7, np.nan, np.nan),
            _run("r8", "lora", 0.8, 0.8, 0.8),  # zero width: unknown too
            _run("r9", "full", 0.75, 0.70, 0.80),
        ]
    )
    cd = bootstrap_cells(runs, resamples=200)
    cells = cd.cells.set_index("strategy")
    assert cells.loc[["frozen", "lora"], ["low", "high"]].isna().all().all()
    assert cells.loc["frozen", "uncertainty"].startswith("none") and cells.loc["full", "low"] < 0.75
    assert np.isnan(cd.draws[:, cells.index.get_indexer(["frozen", "lora"])]).all()
    cmp = compare_strategies(cd).set_index(["baseline", "other"])
    assert cmp.loc[("frozen", "lora"), "verdict"] == (
        "lora higher than frozen (better by point estimate) (no intervals: point estimates only)"
    )
    assert not cmp.loc[("lora", "full"), "verdict"].startswith("no reliable")  # no claim either way


# ---------------------------------------------------------------- reports


def _table(strategies=("frozen",), tokens=True):
    rows = []
    for strategy in strategies:
        for probe in ("linear", "knn"):
            for res in (64, 128, 224):
                for name, n in (("a", 1e6), ("b", 4e6), ("c", 1.6e7), ("d", 6.4e7)):
                    m = _saturating_metric(n, 0.1, 0.2, 0.3) - (0.02 if probe == "knn" else 0) + res / 1e4
                    m += 0.05 if strategy == "lora" else 0
                    row = dict(
                        backbone=name,
                        n_params=int(n),
                        resolution=res,
                        probe=probe,
                        strategy=strategy,
                        seed=0,
                        test_macro_auroc=m,
                        test_macro_auroc_ci_low=m - 0.01,
                        test_macro_auroc_ci_high=m + 0.01,
                    )
                    if tokens:
                        row["tokens_per_image"] = 5 + (res // 16) ** 2
                    rows.append(row)
    return pd.DataFrame(rows)


def test_report_from_csv_has_plots_provenance_and_fits(tmp_path):
    csv = tmp_path / "published.csv"
    _table().to_csv(csv, index=False)
    res = CliRunner().invoke(app, ["analyze", "--csv", str(csv), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    rep = tmp_path / "rep"
    for f in (
        "report.md",
        "report.html",
        "verdicts.md",
        "auroc_vs_params.png",
        "auroc_vs_resolution.png",
        "auroc_vs_gflops.png",
        "fits.csv",
        "results.csv",
    ):
        assert (rep / f).stat().st_size > 0, f
    assert (rep / "auroc_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    md = (rep / "report.md").read_text().splitlines()
    assert md[2].startswith("> **results table")  # provenance first
    assert md[3] == "> **data: not stated in the results**" and md[4] == "> **weights: not stated in the results**"
    fits = pd.read_csv(rep / "fits.csv")
    # per probe: params at 3 resolutions, resolution at 4 backbones, gflops pooled
    assert len(fits) == 2 * (3 + 4 + 1)
    params = fits[fits.axis == "params"]
    assert (params.trend == "improves").all() and (params.alpha - 0.3).abs().max() < 0.05
    resolution = fits[fits.axis == "resolution"]
    assert resolution.verdict.str.startswith("too few points to fit (3 < 4").all() and resolution.alpha.isna().all()
    gflops = fits[fits.axis == "gflops"]
    assert gflops.notes.str.contains("estimated as 2 x params x tokens").all()
    assert not (rep / "strategies.csv").exists()


def test_gflops_axis_skipped_when_neither_logged_nor_estimable(tmp_path):
    write_report(_table(tokens=False), tmp_path, "t", ["data: x", "weights: y"])
    fits = pd.read_csv(tmp_path / "fits.csv")
    assert set(fits.axis) == {"params", "resolution"} and not (tmp_path / "auroc_vs_gflops.png").exists()


def test_report_compares_strategies_and_names_the_best(tmp_path):
    write_report(_table(strategies=("frozen", "lora")), tmp_path, "t", ["data: x", "weights: y"])
    cmp = pd.read_csv(tmp_path / "strategies.csv")
    assert len(cmp) == 2 * 3 * 4 and (cmp.verdict == "lora better than frozen").all()
    md = (tmp_path / "report.md").read_text()
    assert "lora vs frozen over 24 matched cell(s): better in 24" in md
    assert "- unknown: d (64.00M params) at 224px, linear probe, lora" in md
    assert "chosen on test (optimistic" in md
    assert (tmp_path / "strategies.png").read_bytes()[:4] == b"\x89PNG"


def test_several_modalities_get_their_own_figures_and_verdicts(tmp_path):
    rows = [
        dict(
            modality=mod,
            backbone=b,
            n_params=int(n),
            resolution=224,
            probe="linear",
            strategy="frozen",
            seed=0,
            test_macro_auroc=m,
            test_macro_auroc_ci_low=m - 0.01,
            test_macro_auroc_ci_high=m + 0.01,
        )
        for mod, shift in (("xray", 0.0), ("ct", -0.1))
        for b, n in (("a", 1e6), ("b", 4e6), ("c", 1.6e7), ("d", 6.4e7))
        for m in [_saturating_metric(n, 0.1, 0.2, 0.3) + shift]
    ]
    write_report(pd.DataFrame(rows), tmp_path, "two modalities", ["data: x", "weights: y"])
    assert (tmp_path / "xray_auroc_vs_params.png").exists() and (tmp_path / "ct_auroc_vs_params.png").exists()
    md = (tmp_path / "verdicts.md").read_text()
    assert "### ct" in md and "### xray" in md
    assert "- ct: d (64.00M params)" in md and "- xray: d (64.00M params)" in md  # best configuration per modality


def test_csv_without_a_resolution_column_reports_without_that_axis_and_says_so(tmp_path):
    csv = tmp_path / "nores.csv"
    _table().drop(columns=["resolution"]).to_csv(csv, index=False)
    df = results_from_csv(csv)
    assert "column(s) ['resolution'] not in the table: each taken as one value (not stated)" in df.attrs["notes"]
    write_report(df, tmp_path / "rep", "t", ["data: x", "weights: y"])
    fits = pd.read_csv(tmp_path / "rep" / "fits.csv")
    assert (
        "resolution" not in set(fits.axis) and (fits.loc[fits.axis == "params", "at"] == "resolution=not stated").all()
    )
    assert "column(s) ['resolution'] not in the table" in (tmp_path / "rep" / "verdicts.md").read_text()


def test_csv_without_the_metric_is_one_clear_error(tmp_path):
    csv = tmp_path / "nometric.csv"
    _table().drop(columns=["test_macro_auroc"]).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"nometric.csv: no headline metric in the results: expected a column test_"):
        results_from_csv(csv)


def test_csv_gaps_are_left_out_where_they_are_and_named_by_line(tmp_path):
    csv = tmp_path / "gap.csv"
    t = _table()
    t.loc[4, "test_macro_auroc_ci_low"] = np.nan  # line 6: no interval, still a point
    t.loc[7, "test_macro_auroc"] = np.nan  # line 9: no value at all
    t.to_csv(csv, index=False)
    df = results_from_csv(csv)
    assert len(df) == len(t) - 1 and df["_line"].tolist()[:6] == [2, 3, 4, 5, 6, 7]
    notes = " | ".join(df.attrs["notes"])
    assert "1 row without a numeric test_macro_auroc left out (line 9)" in notes
    assert "1 row with no interval (blank or not a number) (line 6): point estimates only there" in notes


def test_write_report_refuses_empty(tmp_path):
    with pytest.raises(ValueError, match="no finished cells"):
        write_report(_table().iloc[0:0], tmp_path, "t", [])


def test_analyze_sweep_reads_mlflow_resamples_patients_and_attaches_report(tmp_path):
    """A sweep recorded the way trial.py records it (params, metrics, predictions/test.csv), without Ray."""
    from mlflow.tracking import MlflowClient

    from dinoscale.analysis import analyze_sweep
    from dinoscale.metrics import macro_auroc, patient_bootstrap

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("dinoscale-toy", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(
        exp,
        tags={
            "dinoscale.role": "sweep",
            "dinoscale.sweep_id": "toy-1",
            "data.source": "phantom",
            "data.generator": "phantom-toy v1",
            "data.seed": "0",
            "weights.kinds": "random",
        },
    )
    rng = np.random.default_rng(1)
    base = _predictions(40, 0.0, rng)
    for i, n in enumerate((1e6, 4e6, 1.6e7, 6.4e7)):
        p = base.copy()
        for c in ("a", "b"):  # bigger backbones separate the classes better
            p[f"score_{c}"] = base[f"score_{c}"] + (0.4 + 0.4 * i) * base[f"label_{c}"]
        y, s = p[["label_a", "label_b"]].to_numpy(), p[["score_a", "score_b"]].to_numpy()
        ci = patient_bootstrap(y, s, p["patient_id"].to_numpy(), resamples=200)
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id})
        rid = run.info.run_id
        for k, v in {
            "modality": "toy",
            "dataset": "toyset",
            "backbone": f"bb{i}",
            "probe": "linear",
            "strategy": "frozen",
            "weights": "random",
        }.items():
            client.log_param(rid, k, v)
        for k, v in {
            "n_params": n,
            "resolution": 224,
            "seed": 0,
            "tokens_per_image": 201,
            **ci.as_dict("test_macro_auroc"),
            "val_macro_auroc": macro_auroc(y, s),
        }.items():
            client.log_metric(rid, k, v)
        client.log_text(rid, p.to_csv(index=False), "predictions/test.csv")
        client.set_terminated(rid, "FINISHED")

    out = analyze_sweep(uri, "dinoscale-toy", None, tmp_path / "reports" / "toy", quiet=True)
    cells = pd.read_csv(out / "results.csv")
    assert (cells.uncertainty == "patients (per-sample predictions) + 1 replicate(s) (test sampling only)").all()
    fits = pd.read_csv(out / "fits.csv")
    assert fits.set_index("axis").loc["params", "trend"] in ("improves", "saturates")
    head = (out / "report.md").read_text().splitlines()
    assert "DEMO RUN" in head[2] and "PHANTOM" in head[3]  # the sweep's provenance, decided once, comes first
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/fits.csv", "report/auroc_vs_params.png"} <= arts
    # one interval per cell (issue 26): the report's is the trial's, as MLflow holds it, to the last digit
    logged = {
        client.get_run(r.info.run_id).data.params["backbone"]: client.get_run(r.info.run_id).data.metrics
        for r in client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    assert len(cells) == len(logged) == 4
    for c in cells.itertuples():
        m = logged[c.backbone]
        assert (c.low, c.high) == (
            m["test_macro_auroc_ci_low"],
            m["test_macro_auroc_ci_high"],
        )
    # one selection rule: the answer names the val-selected cell and shows val with its n
    answer = (out / "report.md").read_text()
    assert "chosen on validation: val " in answer
    # the cells table reads as a person would: encoder names, parameters in M, the interval in one column
    html = (out / "report.html").read_text()
    cells_html = html[html.index("<h2>Cells</h2>") :]
    assert "<th>encoder</th>" in cells_html and "<th>params (M)</th>" in cells_html and "<td>1.0</td>" in cells_html
    assert "<th>n_params</th>" not in cells_html and "<th>uncertainty</th>" not in cells_html
    first = cells.iloc[0]
    assert f"{first.metric:.3f} [{first.low:.3f}, {first.high:.3f}]" in cells_html


def test_the_answer_says_when_the_data_cannot_tell_the_val_choice_from_the_test_leader():
    """Issue 26: the answer names the val-selected cell with its val (and n); a cell with a better test value is
    named under it, with whether the intervals let the data tell them apart - never two cells each "best"."""
    from dinoscale.analysis.compare import best_configurations
    from dinoscale.analysis.report import _answer

    def runs(leader_low):
        return pd.DataFrame(
            [
                _run("a", "frozen", 0.834, 0.803, 0.859, backbone="demo-s", val_macro_auroc=0.90, n_val=6),
                _run("b", "lora", 0.889, leader_low, 0.93, backbone="demo-m", val_macro_auroc=0.85, n_val=6),
            ]
        )

    for leader_low, words in ((0.85, "so the data cannot tell them apart"), (0.87, "validation ranked them otherwise")):
        cd = bootstrap_cells(runs(leader_low), resamples=200)
        lines = [text for _, text in _answer(cd, best_configurations(cd), cd.headline)]
        assert "frozen" in lines[0] and "0.834 [0.803, 0.859], chosen on validation: val 0.900 (n=6)" in lines[0]
        assert lines[1].startswith("on test, demo-m (1.00M params) at 224px, linear probe, lora scores 0.889")
        assert "val 0.850 (n=6)" in lines[1] and words in lines[1]


def test_val_intervals_that_overlap_are_said_not_hidden_behind_one_best():
    """Issue 26: a frozen cell logs its val metric's patient-level interval; where the best and the runner-up on
    validation overlap there, the answer says validation cannot tell them apart; where they do not, it says
    nothing more. The val interval is shown with the val value and survives a report's results.csv."""
    from dinoscale.analysis.compare import best_configurations
    from dinoscale.analysis.report import _answer

    def runs(second_high):
        ci = ("val_macro_auroc_ci_low", "val_macro_auroc_ci_high")
        return pd.DataFrame(
            [
                _run("a", "frozen", 0.834, 0.803, 0.859, backbone="demo-s", val_macro_auroc=0.90, n_val=30)
                | dict(zip(ci, (0.85, 0.95))),
                _run("b", "frozen", 0.820, 0.79, 0.85, backbone="demo-m", val_macro_auroc=0.80, n_val=30)
                | dict(zip(ci, (0.70, second_high))),
            ]
        )

    for second_high, said in ((0.88, True), (0.84, False)):
        cd = bootstrap_cells(runs(second_high), resamples=200)
        lines = [text for _, text in _answer(cd, best_configurations(cd), cd.headline)]
        assert "chosen on validation: val 0.900 [0.850, 0.950] (n=30)" in lines[0], lines
        told = [x for x in lines if x.startswith("validation cannot tell it from")]
        assert bool(told) is said, lines
        if said:
            assert "demo-m" in told[0] and f"val 0.800 [0.700, {second_high:.3f}]" in told[0]


def test_every_point_of_the_frontier_plot_is_numbered_and_named(tmp_path):
    """Issue 26: each point of the cost plot can be identified (a number on the plot, its configuration in a key
    beside it, frontier points starred), not only the frontier's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dinoscale.analysis.plots import _identify_points, plot_frontier

    cells = pd.DataFrame(
        {
            "backbone": ["s", "s", "b", "b"],
            "resolution": [32, 64, 32, 64],
            "probe": ["linear", "knn", "linear", "knn"],
            "strategy": ["frozen"] * 4,
            "metric": [0.7, 0.6, 0.8, 0.75],
            "low": [0.6, 0.5, 0.7, 0.65],
            "high": [0.8, 0.7, 0.9, 0.85],
        },
        index=["c1", "c2", "c3", "c4"],
    )
    cost = pd.Series([1.0, 4.0, 3.0, 12.0], index=cells.index)
    fig, ax = plt.subplots()
    key = _identify_points(fig, ax, cells, cost, ["c1", "c3"])
    plt.close(fig)
    assert len(key) == 4 and key[0].startswith("1* s@32 linear|frozen") and key[1].startswith("2* b@32 ")
    assert key[2].startswith("3  s@64 knn") and key[3].startswith("4  b@64 knn")
    assert plot_frontier(cells, cost, ["c1", "c3"], tmp_path / "f.png", "t", "p").stat().st_size > 0
