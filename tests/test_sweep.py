"""End to end with real Ray Tune and a real SQLite MLflow store (no mocks)."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_spec_dict
from dinoscale import record
from dinoscale.spec import parse_spec
from dinoscale.sweep.runner import run_sweep

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("project")
    spec = parse_spec(tiny_spec_dict(tmp))
    first = run_sweep(spec, project_dir=tmp, quiet=True)
    return tmp, spec, first


def _children(client, exp_id, parent_id):
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)


def test_sweep_records_one_child_run_per_cell_with_provenance(project):
    tmp, spec, out = project
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 8
    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    parents = client.search_runs([exp.experiment_id], "tags.`dinoscale.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["dinoscale.demo"] == "true"
    children = _children(client, exp.experiment_id, out.parent_run_id)
    assert len(children) == 8
    assert len({c.data.tags["dinoscale.trial_key"] for c in children}) == 8
    for c in children:
        m, t, p = c.data.metrics, c.data.tags, c.data.params
        assert c.info.status == "FINISHED"
        assert m["test_macro_auroc_ci_low"] <= m["test_macro_auroc"] <= m["test_macro_auroc_ci_high"]
        assert 0.0 <= m["test_macro_auroc"] <= 1.0
        assert (
            t["data.source"] == "phantom" and t["data.generator"].startswith("phantom-xray") and t["data.seed"] == "0"
        )
        assert t["weights.kind"] == "random" and t["weights.digest"].startswith("random-seed0")
        assert t["ray.node_id"] and t["ray.trial_id"]
        assert m["resolution"] == int(p["resolution"]) and m["n_params"] == int(p["n_params"])  # axes as metrics too
        preds = client.download_artifacts(c.info.run_id, "predictions/test.csv", str(tmp / c.info.run_id))
        assert sum(1 for _ in open(preds)) == 1 + int(m["n_test"])
    # parent run carries the resolved spec and the scaling report
    arts = {a.path for a in client.list_artifacts(out.parent_run_id, "report")}
    assert {"report/report.md", "report/auroc_vs_params.png", "report/auroc_vs_resolution.png"} <= arts
    assert (tmp / "reports" / spec.name / "report.md").read_text().count("PHANTOM") >= 1
    assert out.extraction.feature_sets_extracted == 12
    # measured figures next to the plan's predictions: each trial's peak memory, the store's bytes
    for c in children:
        m = c.data.metrics
        assert 0 < m["memory_trial_peak_rss_mb"] and 0 < m["memory_trial_peak_rss_predicted_mb"]
    pm = client.get_run(out.parent_run_id).data.metrics
    assert pm["features_bytes_measured"] == pm["features_bytes_predicted"] > 0
    assert pm["memory_extraction_peak_rss_mb"] > 0 and pm["memory_extraction_peak_rss_predicted_mb"] > 0
    # the extraction stage's feed (fused: each file decoded once for the 12 feature sets)
    assert pm[record.EXTRACTION_DECODES_PER_FILE] == 1.0 and out.extraction.decodes == out.extraction.files > 0
    assert pm[record.EXTRACTION_IMAGES_PER_SECOND] > 0 and 0 < pm[record.EXTRACTION_DECODE_SHARE] < 1
    sets = json.loads(
        open(client.download_artifacts(out.parent_run_id, "extraction/feature_sets.json", str(tmp))).read()
    )
    assert len(sets) == 12 and all(s["measured_bytes"] == s["predicted_bytes"] for s in sets)


def test_rerun_extracts_nothing_and_reproduces_results(project):
    tmp, spec, first = project
    second = run_sweep(spec, project_dir=tmp, quiet=True)
    assert second.plan.missing == []
    assert second.extraction.feature_sets_extracted == 0 and second.extraction.images == 0
    a = {r["cell"]: r["test_macro_auroc"] for r in first.rows}
    b = {r["cell"]: r["test_macro_auroc"] for r in second.rows}
    assert a == b
    client = MlflowClient(second.tracking_uri)
    metrics = client.get_run(second.parent_run_id).data.metrics
    assert metrics["extraction_feature_sets_extracted"] == 0 and metrics["extraction_feature_sets_cached"] == 12


def test_failed_trial_is_recorded_with_traceback_while_the_sweep_goes_on(project):
    tmp, spec, first = project
    victim = next(c for c in first.plan.cells if c.backbone.name == "dinov3-demo-xs" and c.resolution == 32)
    digest = dict(victim.feature_keys)["test"]
    npy = next((tmp / "store" / "features" / digest[:2] / digest).glob("shard-*.npy"))
    raw = bytearray(npy.read_bytes())
    raw[-2] ^= 0xFF
    npy.write_bytes(bytes(raw))

    out = run_sweep(spec, project_dir=tmp, quiet=True)
    failed = {r["cell"] for r in out.rows if r["state"] == "FAILED"}
    assert failed == {f"dinov3-demo-xs_r32_{p}_frozen_s0" for p in ("linear", "knn")}
    client = MlflowClient(out.tracking_uri)
    children = _children(client, out.experiment_id, out.parent_run_id)
    assert len(children) == 8  # the retried trials reused their runs
    for c in children:
        if c.data.tags["dinoscale.cell"] in failed:
            assert c.info.status == "FAILED"
            assert c.data.tags["dinoscale.evaluations"] == str(
                1 + spec.resources.trial_retries
            )  # retried, then recorded
            tb = client.download_artifacts(c.info.run_id, "error/traceback.txt", str(tmp / "tb" / c.info.run_id))
            assert "checksum mismatch" in open(tb).read()
        else:
            assert c.info.status == "FINISHED"


def test_ct_volumes_are_extracted_slice_by_slice_and_pooled(tmp_path, ray_local):
    """3D classification: slice features pooled per volume (CT window in the key) for the demo's probes (linear,
    k-NN); the pool probe reads the per-slice rows of the same extraction and pools them itself."""
    import yaml

    from dinoscale.features import FeatureStore

    raw = yaml.safe_load(open(ROOT / "sweeps/demo/ct.yaml"))
    raw.update(
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32],
        tracking={"uri": f"sqlite:///{tmp_path}/mlruns.db"},
        storage={"path": str(tmp_path / "store")},
    )
    raw["dataset"]["phantom"].update(n_patients=16, depth=8)
    raw["metrics"] = {"bootstrap": {"resamples": 200}}
    pool = {"kind": "pool", "poolings": ["mean", "attention"], "epochs": 10, "learning_rates": [0.01]}
    raw["probes"].append({**pool, "weight_decays": [0.0001], "batch_size": 8})
    out = run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True, analyze=False)
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 3
    ds = out.plan.dataset
    assert {f.view for f in out.plan.feature_sets} == {"slices", "volumes"}
    assert out.extraction.feature_sets_extracted == 6  # one feature set per view and split, each extracted once
    entries = FeatureStore(tmp_path / "store" / "features").entries()
    volumes = [e for e in entries if e["key"]["view"] == "volumes"]
    assert len(entries) == 6 and len(volumes) == 3
    for e in volumes:
        k = e["key"]  # the recipe's fields (dinoscale.features.recipe), its digest and the rows'
        assert (k["tokens"], k["view"], k["pool"]) == ("cls_mean_patch", "volumes", "mean")
        assert k["intensity"] == "window" and k["window"] == [-1350.0, 150.0] and k["recipe_digest"]
        assert e["shape"][0] == (ds.manifest["split"] == e["split"]).sum()  # one row per volume
    for e in entries:
        if e["key"]["view"] == "slices":  # the pool probe's rows: one per slice
            assert e["shape"][0] == ds.split(e["split"])["n_slices"].sum()
    # backbone inputs: every slice once per view (the pooled volumes' feature sets and the slice rows)
    assert out.extraction.images == 2 * int(ds.manifest["n_slices"].sum())
    client = MlflowClient(out.tracking_uri)
    runs = _children(client, out.experiment_id, out.parent_run_id)
    pool_run = next(r for r in runs if r.data.params["probe"] == "pool")
    assert pool_run.data.tags["selected.pooling"] in ("mean", "attention")
    assert int(pool_run.data.metrics["n_test"]) == len(ds.split("test"))  # scored per volume


def test_a_probe_that_does_not_fit_the_task_is_refused_before_anything_runs(tmp_path):
    import yaml

    from dinoscale.spec import SpecError

    raw = yaml.safe_load(open(ROOT / "sweeps/demo/mri.yaml"))
    raw.update(
        tracking={"uri": f"sqlite:///{tmp_path}/mlruns.db"},
        storage={"path": str(tmp_path / "store")},
        probes=[{"kind": "linear"}],
        features={"tokens": "cls_mean_patch"},
    )
    # the dataset registry states the task: refused when the spec is read, before a sweep could start
    with pytest.raises(
        SpecError, match=r"probe\(s\) \['linear'\] do not fit dataset 'phantom-mri' \(segmentation task\)"
    ):
        run_sweep(parse_spec(raw), project_dir=tmp_path, quiet=True)
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "store" / "features").exists()  # nothing started
