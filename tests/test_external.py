"""External test sets (issue 29 part 2, "does it hold at another hospital"): the class mapping refused before
anything runs (exit 2, one line), the fitted probe (vector and bag probes) scoring external units exactly as it
scores test, the drop and its interval on a known shift, and the NIH-14 -> RSNA spec rehearsed end to end on its
replicas (external metrics with intervals on the run, the report's section, external.csv)."""

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, separable_splits, tiny_spec_dict
from dinoscale import record
from dinoscale.data.external import ExternalMappingError, class_mapping
from dinoscale.metrics import difference_bootstrap, macro_auroc
from dinoscale.probes import Split, run_probe
from dinoscale.spec import parse_spec
from dinoscale.specfile import SpecError
from dinoscale.sweep.external import cut_outputs

INTERNAL = ["cardiomegaly", "effusion", "nodule", "fibrosis"]
REHEARSED = ROOT / "sweeps" / "xray-external-rsna.yaml"


def _spec(tmp_path: Path, external: list, **extra) -> dict:
    d = tiny_spec_dict(tmp_path, backbones=[{"name": "dinov3-demo-xs", "weights": "random"}], resolutions=[32])
    d["probes"] = [dict(d["probes"][0], epochs=20)]
    d["dataset"]["phantom"].update({"n_patients": 40, "image_size": 64})
    d["external"] = external
    d.update(extra)
    return d


def _phantom(seed: int) -> dict:
    return {
        "name": "phantom-xray",
        "phantom": {"seed": seed, "n_patients": 40, "images_per_patient": [2, 3], "image_size": 64},
    }


def test_the_mapping_is_checked_whole_and_names_the_set_the_class_and_the_fix():
    same = class_mapping("b", ["Pneumonia", "Other"], ["Pneumonia", "Edema"], {"Pneumonia": "Pneumonia"}, ["Other"])
    assert same == {"Pneumonia": "Pneumonia"}
    assert class_mapping("b", INTERNAL[:2], INTERNAL, None, []) == {c: c for c in INTERNAL[:2]}
    cases = [
        (["Pneumonia", "Other"], {"Pneumonia": "Pneumonia"}, [], ["'Other'", "drop"]),  # unmapped, not dropped
        (["Pneumonia"], {"Pneumonia": "Pneumonitis"}, [], ["unknown internal class", "Pneumonitis"]),
        (["Pneumonia"], None, ["Opacity"], ["drop lists", "Opacity"]),
        (["Lung Opacity"], None, [], ["'Lung Opacity'", "external.classes"]),  # same names, none internal
    ]
    for external, given, drop, words in cases:
        with pytest.raises(ExternalMappingError) as e:
            class_mapping("rsna", external, ["Pneumonia", "Edema"], given, drop)
        msg = str(e.value)
        assert msg.startswith("external 'rsna': ") and "\n" not in msg
        assert all(w in msg for w in words), msg


@pytest.mark.slow
def test_an_unmapped_external_class_stops_the_command_before_anything_runs(tmp_path):
    ext = [{"label": "site2", "dataset": _phantom(3), "classes": {"cardiomegaly": "cardiomegaly"}, "drop": ["nodule"]}]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path, ext)))
    done = subprocess.run(
        [sys.executable, "-m", "dinoscale.cli", "plan", str(path)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in (done.stdout + done.stderr).splitlines() if "external 'site2'" in x]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "['effusion', 'fibrosis']" in lines[0] and "drop:" in lines[0]
    assert not (tmp_path / "store" / "features").exists() or not any((tmp_path / "store" / "features").rglob("*.npy"))


def test_dense_datasets_and_duplicate_labels_are_refused_by_validation(tmp_path):
    em = {"name": "phantom-em", "phantom": {"seed": 0}}
    for external, words in (
        ([{"label": "a", "dataset": em}], ["external 'a'", "classification"]),
        ([{"label": "a", "dataset": _phantom(1)}, {"label": "a", "dataset": _phantom(2)}], ["duplicate labels"]),
    ):
        with pytest.raises(SpecError) as e:
            parse_spec(_spec(tmp_path, external))
        assert all(w in str(e.value) for w in words), str(e.value)
    no_external = parse_spec(_spec(tmp_path, None))
    assert "external" not in no_external.model_dump(mode="json", exclude={"external"})
    assert (
        no_external.digest() == parse_spec({k: v for k, v in _spec(tmp_path, None).items() if k != "external"}).digest()
    )


@pytest.mark.parametrize(
    "probe", [{"kind": "linear", "epochs": 30}, {"kind": "logreg"}, {"kind": "knn", "ks": [5, 10]}]
)
def test_external_rows_appended_to_test_get_the_scores_of_the_same_fitted_model(probe):
    """Every vector probe scores a test row from train (and val) alone: test + external rows together give test
    exactly the outputs it gets alone, and each external row what it gets alone."""
    from dinoscale.probes import get_probe

    train, val, test = separable_splits(n=240, d=16, c=3, seed=0)
    _, _, ext = separable_splits(n=120, d=16, c=3, seed=5)
    spec = get_probe(probe["kind"]).spec.model_validate(probe)
    alone = run_probe(spec, train, val, test, seed=0).test_scores
    ext_alone = run_probe(spec, train, val, ext, seed=0).test_scores
    both = Split(np.concatenate([test.x, ext.x]), np.concatenate([test.y, ext.y]))
    scores, parts = cut_outputs(
        run_probe(spec, train, val, both, seed=0).test_scores, {"": len(test.y), "e": len(ext.y)}
    )
    np.testing.assert_allclose(scores, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parts["e"], ext_alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "probe",
    [{"kind": "pool", "epochs": 5, "learning_rates": [1e-3], "weight_decays": [0.0]}, {"kind": "abmil", "epochs": 5}],
)
def test_external_bags_appended_to_test_get_the_scores_of_the_same_fitted_model(probe):
    from dinoscale.probes import BagSplit, get_probe

    def bags(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, (n, 1)).astype(np.float32)
        x = [rng.normal(size=(int(rng.integers(3, 7)), 8)).astype(np.float32) + 2 * y[i, 0] for i in range(n)]
        return BagSplit(x, y)

    train, val, test, ext = bags(40, 0), bags(20, 1), bags(20, 2), bags(15, 3)
    spec = get_probe(probe["kind"]).spec.model_validate(probe)
    alone = run_probe(spec, train, val, test, seed=0).test_scores
    ext_alone = run_probe(spec, train, val, ext, seed=0).test_scores
    both = BagSplit(list(test.x) + list(ext.x), np.concatenate([test.y, ext.y]))
    scores, parts = cut_outputs(run_probe(spec, train, val, both, seed=0).test_scores, {"": 20, "e": 15})
    np.testing.assert_allclose(scores, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parts["e"], ext_alone, rtol=1e-4, atol=1e-5)


def test_an_external_set_keeps_the_rows_of_the_centres_it_names(tmp_path):
    """Camelyon16 -> Camelyon17's unseen centres: with the release's stage_labels.csv beside the tiler's table,
    each slide's centre comes from its patient number (20 per centre), ITC slides are left out and recorded, and
    a label that contradicts the slide's stage is refused in one message."""
    import pandas as pd

    from dinoscale import record
    from dinoscale.data import prepare_dataset
    from dinoscale.data.dataset import DataError
    from dinoscale.data.external import EXTERNAL_SPLIT, external_dataset
    from dinoscale.data.replicas import get_replica
    from dinoscale.spec import DatasetSpec

    c17 = DatasetSpec(name="wsi-tiles", root=str(tmp_path / "c17"), subset="camelyon17")
    c16 = DatasetSpec(name="wsi-tiles", root=str(tmp_path / "c16"))
    for spec in (c17, c16):
        get_replica("wsi-tiles").write(Path(spec.root), spec)
    stages = pd.read_csv(tmp_path / "c17" / "stage_labels.csv")
    slide_stage = {p.removesuffix(".tif"): s for p, s in zip(stages["patient"], stages["stage"]) if p.endswith(".tif")}
    itc = {k for k, v in slide_stage.items() if v == "itc"}
    assert itc and "center" not in pd.read_csv(tmp_path / "c17" / "slides.csv").columns
    ds = prepare_dataset(c17, tmp_path)
    assert not itc & set(ds.manifest["bag_id"]) and len(set(ds.manifest["bag_id"])) == len(slide_stage) - len(itc)
    assert ds.provenance[record.DATA_EXCLUDED] == f"{len(itc)} isolated-tumour-cell (itc) slides of stage_labels.csv"
    unseen = external_dataset(ds, "all", {"tumor": "tumor"}, ["tumor"], "c17", centers=[1, 3, 4])
    units = unseen.units(EXTERNAL_SPLIT)
    numbers = {int(p.split("_")[1]) for p in units.patient_ids}
    assert numbers and {n // 20 for n in numbers} == {1, 3, 4}  # centre c holds patients 20c ... 20c + 19
    expected = {k for k in slide_stage if k not in itc and int(k.split("_")[1]) // 20 in (1, 3, 4)}
    assert set(units.sample_ids) == expected  # every non-ITC slide of those centres, none of the others
    for data, centers, words in (
        (ds, ["7"], "centers ['7'] hold no rows"),
        (prepare_dataset(c16, tmp_path), ["1"], "no centre"),
    ):
        with pytest.raises(ExternalMappingError) as e:
            external_dataset(data, "all", {"tumor": "tumor"}, ["tumor"], "c17", centers=centers)
        assert words in str(e.value) and "external 'c17'" in str(e.value)
    table = pd.read_csv(tmp_path / "c17" / "slides.csv")
    negative = next(i for i, sid in enumerate(table["slide_id"]) if slide_stage[sid] == "negative")
    table.loc[negative, "label"] = "tumor"
    table.to_csv(tmp_path / "c17" / "slides.csv", index=False)
    with pytest.raises(DataError, match=rf"line {negative + 2}: slide '\S+' is labelled 'tumor' but stage_labels"):
        prepare_dataset(c17, tmp_path)


def _scored_set(n_patients: int, separation: float, seed: int):
    rng = np.random.default_rng(seed)
    pids = np.repeat([f"p{i}" for i in range(n_patients)], 2)
    y = np.repeat(rng.integers(0, 2, (n_patients, 1)), 2, axis=0).astype(float)
    s = y * separation + rng.normal(size=y.shape)
    return y, s, pids


def test_the_drop_has_the_sign_of_the_shift_and_an_interval_that_resamples_both_sets():
    internal = _scored_set(80, 3.0, 0)  # AUROC ~0.98
    shifted = _scored_set(80, 0.5, 1)  # AUROC ~0.64: a known drop of ~0.3
    same = _scored_set(80, 3.0, 2)
    drop = difference_bootstrap(internal, shifted, macro_auroc, resamples=300, seed=0)
    assert drop.value == pytest.approx(macro_auroc(*internal[:2]) - macro_auroc(*shifted[:2]))
    assert 0.15 < drop.value and 0 < drop.low < drop.value < drop.high
    none = difference_bootstrap(internal, same, macro_auroc, resamples=300, seed=0)
    assert none.low < 0 < none.high
    # wider than either set's own interval: both sets' patients are resampled
    from dinoscale.metrics import patient_bootstrap

    own = patient_bootstrap(*shifted, resamples=300, seed=1)
    assert drop.high - drop.low > own.high - own.low
    few = difference_bootstrap(internal, _scored_set(6, 3.0, 3), macro_auroc, resamples=50)
    assert np.isnan(few.low) and few.units == 6


@pytest.mark.slow
def test_the_nih_to_rsna_spec_rehearses_end_to_end_with_a_replica_of_each_external_dataset(tmp_path, monkeypatch):
    """The rehearsal writes RSNA's replica beside NIH-14's and points the external root there; the plan maps RSNA's
    Pneumonia onto NIH-14's and gives the frozen group an external feature set; the cell's run and the report carry
    the external results. One cell (the spec's grid cut by --set; `dinoscale rehearse sweeps/xray-external-rsna.yaml
    --lean` runs 8 cells the same way)."""
    from dinoscale.rehearse import rehearse
    from dinoscale.sweep.protocol import protocol_markdown

    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("DINOSCALE_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.setenv("DINOSCALE_REPORTS", str(tmp_path / "reports"))
    one_cell = ["backbones=[{name: dinov3-vits16, weights: hub}]", "resolutions=[256]", "probes=[{kind: linear}]"]
    r, out = rehearse(REHEARSED, lean=True, quiet=True, project_dir=tmp_path, overrides=one_cell)
    (ext,) = r.spec.external
    assert Path(ext.dataset.root).is_dir() and Path(ext.dataset.root).parent.name == "rsna-pneumonia"
    plan = out.plan
    (mapped,) = plan.externals.values()
    assert mapped.mapping == {"Pneumonia": "Pneumonia"} and mapped.classes == ["Pneumonia"]
    (fs,) = [f for f in plan.feature_sets if f.external == "rsna"]
    assert len(plan.rows(fs).ids) == len(mapped.dataset.manifest) and all(c.external_keys for c in plan.cells)
    assert "| rsna | rsna-pneumonia, rows: all" in protocol_markdown(plan)
    assert [row["cell"] for row in out.rows if row["state"] != "FINISHED"] == []
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name(r.spec.experiment_name).experiment_id
    (run,) = client.search_runs([exp], f"tags.`{record.CELL}` != ''")
    m = run.data.metrics
    for metric in record.EXTERNAL_METRICS:  # each with its patient-bootstrap interval
        name = record.external_name("rsna", metric)
        assert name in m and all(c in m for c in record.ci_names(name)), name
        assert m[name + record.CI_LOW] <= m[name] <= m[name + record.CI_HIGH]
    assert m[record.external_name("rsna", record.EXTERNAL_CLASSES)] == 1
    assert m[record.external_name("rsna", record.EXTERNAL_PATIENTS)] == len(set(mapped.dataset.manifest["patient_id"]))
    md = (out.report_dir / "report.md").read_text()
    assert "## External test sets" in md and "on rsna (external, 1 class mapped) the best cell" in md
    table = pd.read_csv(out.report_dir / "external.csv")
    assert list(table["external_set"]) == ["rsna"] and table["drop"].iloc[0] == pytest.approx(
        m[record.external_name("rsna", record.EXTERNAL_DROP)]
    )
