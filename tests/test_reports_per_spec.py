"""One report and one MLflow experiment per spec: two specs of one modality never overwrite or mix with each
other; `dinoscale analyze SPEC` reports on that spec's own sweep; the parent run says what the sweep was;
and a report's results.csv reads back through `analyze --csv` to the same report (the round trip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import tiny_spec_dict
from dinoscale import record
from dinoscale.analysis import analyze_sweep
from dinoscale.cli import app

# ---------------------------------------------------------------- two specs of one modality, swept one after the other


def _tiny_xray(tmp: Path, name: str) -> Path:
    """A spec file of the smallest grid (1 backbone x 1 resolution x 1 probe); both specs share data and
    storage, so the second sweep finds its features in the store."""
    raw = tiny_spec_dict(
        tmp,
        name=name,
        description=f"the {name} spec of the test",
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32],
        probes=[{"kind": "linear", "epochs": 20, "batch_size": 64}],
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_two_specs_of_a_modality_keep_their_own_reports_experiments_and_analysis(tmp_path, monkeypatch, ray_local):
    from dinoscale.spec import load_spec
    from dinoscale.sweep.runner import run_sweep

    monkeypatch.chdir(tmp_path)  # `dinoscale analyze` writes under ./reports
    specs = [load_spec(_tiny_xray(tmp_path, name)) for name in ("xray-alpha", "xray-beta")]
    outs = [run_sweep(s, project_dir=tmp_path, quiet=True) for s in specs]
    client = MlflowClient(outs[0].tracking_uri)

    sweep_ids = {}
    for spec, out in zip(specs, outs):
        assert out.report_dir == tmp_path / "reports" / spec.name
        exp = client.get_experiment_by_name(f"dinoscale-{spec.name}")
        assert exp is not None and exp.experiment_id == out.experiment_id
        parents = client.search_runs([exp.experiment_id], f"tags.`{record.ROLE}` = '{record.ROLE_SWEEP}'")
        assert [p.info.run_id for p in parents] == [out.parent_run_id]  # nothing of the other spec mixed in
        tags = parents[0].data.tags
        sweep_ids[spec.name] = tags[record.SWEEP_ID]
        assert tags[record.SPEC_NAME] == spec.name
        note = tags[record.DESCRIPTION]  # the description the MLflow runs table shows
        assert note.startswith(f"**{spec.name}** (xray, demo profile)") and f"the {spec.name} spec" in note
        assert "1 backbone x 1 resolution x 1 probe x 1 strategy x 1 seed = 1 cell" in note
        best = out.rows[0]
        assert f"- result: test macro AUROC {best['metric']:.3f}" in note and "1/1 cells finished" in note
    assert outs[1].extraction.feature_sets_extracted == 0  # same data, same store: nothing extracted twice
    for spec, out in zip(specs, outs):  # two reports, neither overwritten by the other sweep
        assert f"# Scaling report: {spec.name} / {sweep_ids[spec.name]}" in (out.report_dir / "report.md").read_text()

    # `dinoscale analyze SPEC` of the first spec, after the second was swept: its own sweep, attached to its own run
    (tmp_path / "reports" / "xray-alpha" / "report.md").unlink()
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "xray-alpha.yaml")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "reports" / "xray-alpha" / "report.md").read_text()
    assert f"# Scaling report: xray-alpha / {sweep_ids['xray-alpha']}" in text
    assert sweep_ids["xray-beta"] not in text
    attached = {a.path for a in client.list_artifacts(outs[0].parent_run_id, record.REPORT_DIR)}
    assert f"{record.REPORT_DIR}/report.md" in attached
    # the sweep's results.csv reads back: the same cells and intervals, and it says what the table lacks
    res = CliRunner().invoke(app, ["analyze", "--csv", "reports/xray-alpha/results.csv", "--out", "from-csv"])
    assert res.exit_code == 0, res.output
    cols = ["backbone", "resolution", "metric", "low", "high", "headline", "goal"]
    assert pd.read_csv("from-csv/results.csv")[cols].equals(pd.read_csv("reports/xray-alpha/results.csv")[cols])
    assert "the report's paired patient resamples" in (tmp_path / "from-csv" / "verdicts.md").read_text()
    # --sweep names another sweep; --run-id is the same option
    res = CliRunner().invoke(
        app, ["analyze", str(tmp_path / "xray-beta.yaml"), "--run-id", outs[1].parent_run_id, "--out", "again"]
    )
    assert res.exit_code == 0, res.output
    assert sweep_ids["xray-beta"] in (tmp_path / "again" / "report.md").read_text()
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "xray-beta.yaml"), "--sweep", "0123abcd"])
    assert res.exit_code == 2 and "no run 0123abcd" in res.output


# ---------------------------------------------------------------- which sweep of a shared experiment (no Ray)


def _record_sweep(client, exp: str, spec_name: str | None, digest: str, auroc: float, param_only=False) -> str:
    """A parent run and two finished cells as the runner records them (tags, params, metrics)."""
    tags = {record.ROLE: record.ROLE_SWEEP, record.SWEEP_ID: f"{spec_name}-{digest}", record.SPEC_DIGEST: digest}
    if spec_name and not param_only:
        tags[record.SPEC_NAME] = spec_name
    parent = client.create_run(exp, tags=tags).info.run_id
    client.log_param(parent, "sweep", spec_name)  # what sweeps from before the spec-name tag carry
    for i, n in enumerate((1e6, 4e6)):
        rid = client.create_run(exp, tags={record.PARENT_RUN_ID: parent}).info.run_id
        for k, v in {"backbone": f"bb{i}", "probe": "linear", "strategy": "frozen"}.items():
            client.log_param(rid, k, v)
        value = auroc + 0.05 * i
        for k, v in {
            "n_params": n,
            "resolution": 32,
            "seed": 0,
            "test_macro_auroc": value,
            "test_macro_auroc_ci_low": value - 0.04,
            "test_macro_auroc_ci_high": value + 0.03,
            "val_macro_auroc": value,
        }.items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


def test_analyze_finds_the_latest_sweep_of_its_spec_in_a_shared_experiment(tmp_path):
    """Two specs logged to one experiment (the user named the same one): the report of a spec is on the latest
    sweep of that spec, preferring its current digest, and attached to that sweep's parent run only."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("shared", artifact_location=(tmp_path / "art").as_uri())
    old = _record_sweep(client, exp, "nih", "d1", 0.70, param_only=True)  # before the tag existed
    current = _record_sweep(client, exp, "nih", "d2", 0.72)
    edited = _record_sweep(client, exp, "nih", "d3", 0.74)  # the spec edited since, swept again
    other = _record_sweep(client, exp, "rsna", "r1", 0.80)  # the latest sweep of the experiment

    def report(name: str, digest: str | None) -> str:
        out = analyze_sweep(
            uri, "shared", None, tmp_path / name / str(digest), quiet=True, spec_name=name, spec_digest=digest
        )
        return (out / "report.md").read_text()

    assert "# Scaling report: nih / nih-d2" in report("nih", "d2")  # its digest, though not its latest sweep
    assert "# Scaling report: nih / nih-d1" in report("nih", "d1")  # an old sweep, found by its param
    text = report("nih", "d9")  # no sweep of this digest: the latest of the name, and the report says so
    assert "# Scaling report: nih / nih-d3" in text and "spec 'nih' has changed since its latest sweep" in text
    assert "# Scaling report: rsna / rsna-r1" in report("rsna", "r1")
    attached = {r: bool(client.list_artifacts(r, record.REPORT_DIR)) for r in (old, current, edited, other)}
    assert attached == {old: True, current: True, edited: True, other: True}
    with pytest.raises(
        LookupError, match=r"no sweep of spec 'chexpert' in experiment 'shared' \(it holds sweeps of nih, rsna\)"
    ):
        analyze_sweep(uri, "shared", None, tmp_path / "x", quiet=True, spec_name="chexpert")
    with pytest.raises(LookupError, match="is not a sweep's parent run"):
        child = client.search_runs([exp], f"tags.`{record.PARENT_RUN_ID}` = '{other}'")[0].info.run_id
        analyze_sweep(uri, "shared", child, tmp_path / "x", quiet=True)


# ---------------------------------------------------------------- the round trip


def _results_table(path: Path) -> Path:
    """A results table as a user brings one, its rows shuffled: 3 sizes x 2 resolutions x 2 probes, intervals."""
    rng = np.random.default_rng(1)
    rows = []
    for backbone, n in (("vit-s", 21.6e6), ("vit-b", 85.6e6), ("vit-l", 303e6)):
        for res in (224, 448):
            for probe in ("linear", "knn"):
                v = 0.7 + 0.05 * np.log10(n / 21.6e6) + 0.02 * (res == 448) + rng.normal(0, 0.01)
                rows.append(
                    {
                        "backbone": backbone,
                        "n_params": n,
                        "resolution": res,
                        "probe": probe,
                        "strategy": "frozen",
                        "seed": 0,
                        "test_macro_auroc": v,
                        "test_macro_auroc_ci_low": v - 0.03,
                        "test_macro_auroc_ci_high": v + 0.025,
                        "val_macro_auroc": v + 0.01,
                        "gflops": n / 1e7 * (res / 224) ** 2,
                    }
                )
    pd.DataFrame(rows).sample(frac=1, random_state=3).to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_a_reports_results_csv_reads_back_to_the_same_report(tmp_path):
    table = _results_table(tmp_path / "table.csv")
    first = CliRunner().invoke(app, ["analyze", "--csv", str(table), "--out", str(tmp_path / "first")])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(
        app, ["analyze", "--csv", str(tmp_path / "first" / "results.csv"), "--out", str(tmp_path / "second")]
    )
    assert again.exit_code == 0, again.output  # it used to stop at "no headline metric"
    for name in ("results.csv", "fits.csv", "verdicts.md"):  # the cells, the fits, the answer and the verdicts
        assert (tmp_path / "second" / name).read_text() == (tmp_path / "first" / name).read_text(), name
    cells = pd.read_csv(tmp_path / "first" / "results.csv")
    assert len(cells) == 12 and set(cells.headline) == {"test_macro_auroc"}
    rows = pd.read_csv(table).set_index(["backbone", "resolution", "probe"])
    for c in cells.itertuples():  # a cell of one run shows the interval that run logged
        r = rows.loc[(c.backbone, c.resolution, c.probe)]
        assert (c.low, c.high) == pytest.approx((r.test_macro_auroc_ci_low, r.test_macro_auroc_ci_high))
