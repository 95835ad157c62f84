"""The analysis follows the sweep's headline metric: Dice (higher is better) and VOI (lower is better)
sweeps recorded in a real MLflow store with per-volume predictions, results tables naming other
metrics, and scaling fits of a lower-is-better metric."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dinoscale.analysis import analyze_sweep, fit_power_law, results_from_csv, results_from_mlflow, write_report
from dinoscale.analysis.sources import detect_headline, sweep_headline
from dinoscale.cli import app
from dinoscale.headline import AUROC, DICE, VOI
from dinoscale.metrics import volume_bootstrap
from test_analysis import _saturating_metric, _table  # the AUROC fixtures of the original analysis tests

SIZES = (("xs", 1e6), ("s", 4e6), ("m", 1.6e7), ("l", 6.4e7))
N_PATIENTS = 30  # two volumes each


def _volumes(rng):
    pid = np.repeat([f"p{i}" for i in range(N_PATIENTS)], 2)
    return pd.DataFrame({"sample_id": [f"v{i}" for i in range(len(pid))], "patient_id": pid})


def _dice_values(n, difficulty, rng):
    """Per-volume Dice rising with n (a saturating law), volumes sharing their difficulty across runs."""
    d = np.clip(_saturating_metric(n, 0.1, 0.4, 0.3) - difficulty + rng.normal(0, 0.02, len(difficulty)), 0, 1)
    d[::17] = np.nan  # a class absent from prediction and ground truth: undefined, skipped
    return d


def _voi_values(n, difficulty, rng, shift=0.0):
    """Per-volume VOI (bits) falling with n: 0.3 + 2 (n / 1e6)^-0.3, above 1 for the small models."""
    return np.clip(
        0.3 + 2.0 * (n / 1e6) ** -0.3 + shift + 3 * difficulty + rng.normal(0, 0.03, len(difficulty)), 0, None
    )


def _record_sweep(tmp_path, headline, values_of, strategies=("frozen",)):
    """A sweep as trial.py records it: parent tagged with the headline, FINISHED children with the
    mirrored axes, params, test_<name> (+ interval), val_<name> and predictions/test.csv per volume."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("dinoscale-seg", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(
        exp,
        tags={
            "dinoscale.role": "sweep",
            "dinoscale.sweep_id": "seg-1",
            "data.name": "toy-seg",
            "weights.kinds": "pretrained",
            **headline.tags(),
        },
    )
    rng = np.random.default_rng(3)
    vols = _volumes(rng)
    difficulty = rng.normal(0, 0.08, len(vols))
    truth = {}
    for strategy in strategies:
        for backbone, n in SIZES:
            values = values_of(n, strategy, difficulty, rng)
            p = vols.assign(**{headline.name: values, "hd95": 5.0})  # other per-volume columns ride along
            ci = volume_bootstrap(values, p["patient_id"].to_numpy(), resamples=300)
            rid = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id}).info.run_id
            for k, v in {
                "modality": "em",
                "dataset": "toy-seg",
                "backbone": backbone,
                "probe": "seg-linear",
                "strategy": strategy,
                "weights": "pretrained",
            }.items():
                client.log_param(rid, k, v)
            for k, v in {
                "n_params": n,
                "resolution": 224,
                "seed": 0,
                "tokens_per_image": 197,
                **ci.as_dict(headline.test),
                headline.val: ci.value + rng.normal(0, 0.002),
                "test_hd95": 5.0,
            }.items():
                client.log_metric(rid, k, v)
            client.log_text(rid, p.to_csv(index=False), "predictions/test.csv")
            client.set_terminated(rid, "FINISHED")
            truth[(backbone, strategy)] = ci
    # a failed child is left out
    failed = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id}).info.run_id
    client.set_terminated(failed, "FAILED")
    return uri, client, parent.info.run_id, truth


def _check_intervals(out, truth):
    cells = pd.read_csv(out / "results.csv")
    assert (cells.uncertainty == "patients (per-sample predictions) + 1 seed(s)").all()
    assert ((cells.low <= cells.metric) & (cells.metric <= cells.high)).all()
    for r in cells.itertuples():  # the report's patient resampling agrees with the runs' own volume bootstrap
        ci = truth[(r.backbone, r.strategy)]
        assert r.metric == pytest.approx(ci.value)
        assert 0.6 < (r.high - r.low) / (ci.high - ci.low) < 1.6
    return cells


def test_dice_sweep_report_names_dice_and_resamples_volumes(tmp_path):
    uri, client, parent, truth = _record_sweep(
        tmp_path, DICE, lambda n, strategy, difficulty, rng: _dice_values(n, difficulty, rng)
    )
    df, info = results_from_mlflow(uri, "dinoscale-seg", None, with_predictions=True)
    assert info["headline"] == DICE and len(df) == 4 and len(info["predictions"]) == 4
    assert {"test_dice", "test_dice_ci_low", "test_dice_ci_high", "val_dice"} <= set(df.columns)
    assert "test_macro_auroc" not in df.columns

    out = analyze_sweep(uri, "dinoscale-seg", None, tmp_path / "rep", quiet=True)
    cells = _check_intervals(out, truth)
    assert set(cells.headline) == {"test_dice"} and set(cells.goal) == {"max"}
    md = (out / "report.md").read_text()
    assert "Headline metric: test mean foreground Dice, higher is better (test_dice)" in md
    assert "| test mean foreground Dice [95% CI] |" in md and "AUROC" not in md
    assert "Error E = 1 - test mean foreground Dice" in md
    for axis in ("params", "gflops"):
        assert (out / f"dice_vs_{axis}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "dice_vs_resolution.png").exists()  # one resolution: nothing to draw on that axis
    assert not list(out.glob("*auroc*"))
    fits = pd.read_csv(out / "fits.csv").set_index("axis")
    assert fits.loc["params", "trend"] in ("improves", "saturates") and fits.loc["params", "error"] == "1 - test_dice"
    best = cells.loc[cells.metric.idxmax()]
    verdicts = (out / "verdicts.md").read_text()
    assert f"- em: {best.backbone} (" in verdicts and "test mean foreground Dice" in verdicts
    assert "report/dice_vs_params.png" in {a.path for a in client.list_artifacts(parent, "report")}


def test_voi_sweep_lower_is_better_everywhere(tmp_path):
    def voi(n, strategy, difficulty, rng):
        return _voi_values(n, difficulty, rng, shift=-0.15 if strategy == "lora" else 0.0)

    uri, client, parent, truth = _record_sweep(tmp_path, VOI, voi, strategies=("frozen", "lora"))
    out = analyze_sweep(uri, "dinoscale-seg", parent, tmp_path / "rep", quiet=True)
    cells = _check_intervals(out, truth)
    assert cells.metric.max() > 1  # VOI in bits is no [0, 1] score: nothing was clipped to one

    md = (out / "report.md").read_text()
    verdicts = (out / "verdicts.md").read_text()
    html = (out / "report.html").read_text()
    for text in (md, verdicts):
        assert (
            "Headline metric: test VOI (split + merge, bits; lower is better) (test_voi). "
            "'Improves' means it decreases; the best configuration is the one with the lowest value." in text
        )
    assert (
        "test_voi itself (lower is better: it is already an error, so it is fitted untransformed, no sign flip)" in md
    )
    assert "test_voi" in html and "lower is better" in html

    # best cell: the LOWEST VOI (chosen on val_voi, which tracks test here), i.e. the largest model with LoRA
    best = cells.loc[cells.metric.idxmin()]
    assert (best.backbone, best.strategy) == ("l", "lora")
    assert "- em: l (64.00M params) at 224px, seg-linear probe, lora: test VOI" in verdicts
    assert "chosen on validation" in verdicts

    # scaling: VOI falls with parameters, so it improves with scale; the law is fitted on VOI itself
    fits = pd.read_csv(out / "fits.csv")
    params = fits[fits.axis == "params"]
    assert len(params) == 2 and params.trend.isin(["improves", "saturates"]).all()
    assert params.verdict.str.startswith("improves with params").all()
    assert (params.error == "test_voi").all() and (params.alpha > 0).all() and (params.floor_error >= 0).all()
    assert "- improves with model size at resolution 224" in verdicts
    assert "degrades" not in verdicts

    # strategies: lower VOI is better, so LoRA beats frozen at every size
    cmp = pd.read_csv(out / "strategies.csv")
    assert len(cmp) == 4 and (cmp.verdict == "lora better than frozen").all() and (cmp.delta < 0).all()
    assert (cmp.paired == "paired over patients").all()
    assert "lora vs frozen over 4 matched cell(s): better in 4" in verdicts and "test_voi (lower is better)" in verdicts

    for axis in ("params", "gflops"):
        assert (out / f"voi_vs_{axis}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "heatmap.png").exists() and (out / "frontier.png").exists()
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/voi_vs_params.png", "report/strategies.png", "report/verdicts.md"} <= arts


def test_lower_is_better_law_recovered_without_clipping_to_one():
    x = np.geomspace(1e6, 1e9, 8)
    voi = 0.2 + 3.0 * (x / 1e6) ** -0.35  # 3.2 bits down to 0.29
    fit = fit_power_law(x, voi, voi - 0.02, voi + 0.02, axis="params", goal="min")
    assert fit.trend == "improves" and fit.verdict == "improves with params" and fit.exponent_identified
    assert abs(fit.alpha - 0.35) < 0.05 and fit.alpha_low <= 0.35 <= fit.alpha_high
    assert abs(fit.floor - 0.2) < 0.05
    np.testing.assert_allclose(fit.predict_metric(x), voi, atol=0.05)
    assert np.all(np.diff(fit.band["metric"]) < 0)  # the fitted band is in VOI, falling
    worse = fit_power_law(x, voi[::-1], voi[::-1] - 0.02, voi[::-1] + 0.02, axis="params", goal="min")
    assert worse.trend == "degrades" and worse.alpha < 0


def test_stale_plots_of_another_headline_are_removed(tmp_path):
    write_report(_table(), tmp_path, "auroc first", ["data: x", "weights: y"])
    assert (tmp_path / "auroc_vs_params.png").exists()
    rising = _seg_table("test_voi", flip=True)
    rising["test_voi"], rising["test_voi_ci_low"], rising["test_voi_ci_high"] = (  # VOI rising with params
        2 - rising["test_voi"],
        2 - rising["test_voi_ci_high"],
        2 - rising["test_voi_ci_low"],
    )
    write_report(rising, tmp_path, "then voi", ["data: x", "weights: y"])
    assert (tmp_path / "voi_vs_params.png").exists() and not list(tmp_path.glob("*auroc_vs_*.png"))
    fits = pd.read_csv(tmp_path / "fits.csv")
    assert (fits[fits.axis == "params"].trend == "degrades").all()  # lower is better: rising VOI is worse with scale


def _seg_table(metric="test_dice", flip=False):
    t = _table(strategies=("frozen",), tokens=True)
    if flip:
        for c in ("test_macro_auroc", "test_macro_auroc_ci_low", "test_macro_auroc_ci_high"):
            t[c] = 1 - t[c]
        t[["test_macro_auroc_ci_low", "test_macro_auroc_ci_high"]] = t[
            ["test_macro_auroc_ci_high", "test_macro_auroc_ci_low"]
        ].values
    return t.rename(
        columns={
            "test_macro_auroc": metric,
            "test_macro_auroc_ci_low": f"{metric}_ci_low",
            "test_macro_auroc_ci_high": f"{metric}_ci_high",
        }
    )


def test_csv_tables_say_which_headline_they_hold(tmp_path):
    dice = tmp_path / "dice.csv"
    _seg_table().to_csv(dice, index=False)
    assert results_from_csv(dice).attrs["headline"] == DICE
    res = CliRunner().invoke(app, ["analyze", "--csv", str(dice), "--out", str(tmp_path / "dice")])
    assert res.exit_code == 0, res.output
    assert "Report on test_dice (higher is better)" in res.output
    assert (tmp_path / "dice" / "dice_vs_params.png").exists()

    both = tmp_path / "both.csv"
    t = _seg_table()
    voi = _seg_table("test_voi", flip=True)
    t[["test_voi", "test_voi_ci_low", "test_voi_ci_high"]] = voi[["test_voi", "test_voi_ci_low", "test_voi_ci_high"]]
    t.to_csv(both, index=False)
    with pytest.raises(ValueError, match=r"several headline metrics \(test_dice, test_voi\)"):
        results_from_csv(both)
    res = CliRunner().invoke(app, ["analyze", "--csv", str(both), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "analyze --headline" in res.output
    res = CliRunner().invoke(app, ["analyze", "--csv", str(both), "--headline", "voi", "--out", str(tmp_path / "voi")])
    assert res.exit_code == 0, res.output
    verdicts = (tmp_path / "voi" / "verdicts.md").read_text()
    assert (
        "lower is better) (test_voi)" in verdicts and "improves with model size" in verdicts
    )  # 1 - AUROC-like: falls with n
    assert "- unknown: d (64.00M params) at 224px, linear probe, frozen: test VOI" in verdicts  # lowest VOI

    hd = tmp_path / "hd95.csv"
    _seg_table("test_hd95", flip=True).to_csv(hd, index=False)
    with pytest.raises(ValueError, match="not a headline dinoscale knows"):
        results_from_csv(hd)
    res = CliRunner().invoke(app, ["analyze", "--csv", str(hd), "--goal", "min", "--out", str(tmp_path / "hd")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hd" / "hd95_vs_params.png").exists()
    with pytest.raises(ValueError, match="contradicts"):
        results_from_csv(both, "test_voi", "max")


def test_headline_from_columns_and_tags():
    assert detect_headline(_table().columns) == AUROC  # tables of before headlines existed
    assert sweep_headline({}) == AUROC and sweep_headline(VOI.tags()) == VOI
    custom = sweep_headline({"dinoscale.headline": "test_hd95", "dinoscale.headline_goal": "min"})
    assert (custom.test, custom.goal, custom.per_volume) == ("test_hd95", "min", True)
