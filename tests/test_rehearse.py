"""Rehearsals: every paper spec whose dataset has a replica writer runs end to end on its replica, labelled
REHEARSAL; broken replicas give one clear message (exit 2) or, with on_bad_file: skip, a recorded skip.

The end-to-end rehearsals are parametrized over ``replica_names()`` and the specs under ``sweeps/``, so a new
replica writer (or a new paper spec of a dataset with one) joins them without a change here. They run
``--lean`` (the smallest and largest backbone and resolution) to keep the suite's time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT
from dinoscale import record
from dinoscale.cli import app
from dinoscale.data.replicas import get_replica, replica_names

PAPER_SPECS = sorted(p for p in (ROOT / "sweeps").glob("*.yaml"))


def _dataset(spec: Path) -> str:
    return yaml.safe_load(spec.read_text())["dataset"]["name"]


REHEARSABLE = [s for s in PAPER_SPECS if _dataset(s) in replica_names()]
# sweeps/xray-external-rsna.yaml: NIH-14's replica as sweeps/xray.yaml's (its broken variants are those), rehearsed
# end to end with its external set in tests/test_external.py
# sweeps/wsi-external-camelyon17.yaml: the wsi-tiles replica as sweeps/wsi.yaml's (its broken variants are those)
EXTERNAL = ("xray-external-rsna", "wsi-external-camelyon17")
# sweeps/<modality>-msd-<task>.yaml of the Decathlon tasks beyond Task01 / Task09: rehearsed one after another in one
# test (tests/test_msd_tasks.py); their broken variants are sweeps/ct-msd-spleen.yaml's (the same writer and adapter)
MSD_TASKS = tuple(s.stem for s in REHEARSABLE if "-msd-" in s.stem and s.stem != "ct-msd-spleen")
BROKEN = [(s, v) for s in REHEARSABLE if s.stem not in EXTERNAL + MSD_TASKS for v in get_replica(_dataset(s)).variants]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Storage and tracking of a rehearsal under tmp_path; the project folder (reports) is tmp_path."""
    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("DINOSCALE_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- the transformation


def test_transform_maps_to_the_demo_ladder_and_records_every_change(tmp_path):
    from dinoscale.rehearse import transform
    from dinoscale.spec import parse_spec

    raw = yaml.safe_load((ROOT / "sweeps" / "xray.yaml").read_text())
    s, changes = transform(raw, "sweeps/xray.yaml", tmp_path / "replica")
    spec = parse_spec(s)
    assert spec.profile == "rehearsal" and spec.name == "xray-paper-rehearsal"
    assert spec.tracking.experiment == "dinoscale-xray-paper-rehearsal"  # never mixed with real results
    assert [b.name for b in spec.backbones] == ["dinov3-demo-xs", "dinov3-demo-s", "dinov3-demo-m"]  # S < B < L
    assert {b.weights for b in spec.backbones} == {"random"}
    assert spec.resolutions == [32, 48, 64, 80]  # as many values, same order, multiples of 16
    assert spec.dataset.root == str(tmp_path / "replica") and spec.dataset.name == "nih-chestxray14"
    assert spec.probes[0].epochs == 3 and spec.seeds == [0]
    assert spec.resources.cpus_per_trial == 1
    assert changes[record.REHEARSAL_PREFIX + "backbones"].startswith("dinov3-vits16(hub)->dinov3-demo-xs(random)")
    assert changes[record.REHEARSAL_PREFIX + "resolutions"] == "224->32,256->48,384->64,512->80"
    cuts = changes[record.REHEARSAL_PREFIX + "cuts"]
    assert "probes.linear.epochs 50->3" in cuts and "seeds [0, 1, 2]->[0]" in cuts
    lean, _ = transform(raw, "sweeps/xray.yaml", tmp_path, lean=True, replicates=2)
    assert [b["name"] for b in lean["backbones"]] == ["dinov3-demo-xs", "dinov3-demo-m"]
    assert lean["resolutions"] == [32, 80] and lean["seeds"] == [0, 1]


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps" / "compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_comparison_of_families_rehearses_on_two_demo_ladders(path, tmp_path):
    """Issue 25: each comparison spec rehearses with its families kept apart: DINOv3 on the DINOv3 demo ladder, the
    other families on the DINOv2 demo ladder (patch 14), resolutions exact for both patch sizes; the lean
    rehearsal keeps both ends of each ladder, so the report still pairs the families."""
    from dinoscale.rehearse import _raw_spec, transform
    from dinoscale.spec import parse_spec

    raw = _raw_spec(path)
    for lean in (False, True):
        s, changes = transform(raw, str(path), tmp_path / "replica", lean=lean)
        spec = parse_spec(s)
        names = [b.name for b in spec.backbones]
        assert {n.rsplit("-", 1)[0] for n in names} == {"dinov3-demo", "dinov2-demo"}, names
        assert all(r % 112 == 0 for r in spec.resolutions) and len(set(names)) == len(names)
        if lean:
            assert len(names) == 4 and len(spec.resolutions) <= 2
    assert "->dinov2-demo-" in changes[record.REHEARSAL_PREFIX + "backbones"]


def test_rehearsal_provenance_is_labelled_everywhere():
    from dinoscale.provenance import REHEARSAL_HEADLINE, Provenance

    p = Provenance.of_sweep("rehearsal", {record.DATA_SOURCE: "real", record.DATA_NAME: "CT-RATE"}, ["random"])
    assert p.rehearsal and p.demo and p.headline == REHEARSAL_HEADLINE
    assert p.lines()[0].startswith("data: REHEARSAL REPLICA of CT-RATE")
    tags = p.tags()
    assert tags[record.REHEARSAL] == "true" and tags[record.DEMO] == "true" and "REHEARSAL" in tags[record.NOTE]
    assert Provenance.from_tags(tags).rehearsal  # the analysis of a recorded rehearsal labels it too
    assert not Provenance.of_sweep("paper", {record.DATA_SOURCE: "real"}, ["hub"]).demo


def test_a_dataset_without_a_replica_is_refused_listing_those_with_one(tmp_path, isolated):
    spec = yaml.safe_load((ROOT / "sweeps" / "xray.yaml").read_text())
    spec["dataset"] = {"name": "manifest", "root": str(tmp_path), "classes": ["a"]}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["rehearse", str(path)])
    assert res.exit_code == 2, res.output
    assert "dataset 'manifest' has no replica writer" in res.output and "nih-chestxray14" in res.output
    assert "Traceback" not in res.output


def test_a_demo_spec_is_not_rehearsed(isolated):
    res = CliRunner().invoke(app, ["rehearse", str(ROOT / "sweeps" / "demo" / "xray.yaml")])
    assert res.exit_code == 2 and "is generated (a phantom)" in res.output, res.output


# ---------------------------------------------------------------- broken replicas: one message, exit 2


@pytest.mark.parametrize("spec,variant", BROKEN, ids=[f"{s.stem}-{v}" for s, v in BROKEN])
def test_a_broken_replica_gives_one_clear_line(spec, variant, isolated):
    res = CliRunner().invoke(app, ["rehearse", str(spec), "--variant", variant, "--no-analysis"])
    err = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output[-3000:]
    assert "Traceback" not in res.output
    message = err[-1]
    assert message.startswith("data error:"), message
    assert len([x for x in err if x.startswith(("data error", "spec error", "rehearsal error"))]) == 1
    # the message names the culprit: the broken file, or the CSV / array and the label
    replica = Path(isolated / "store" / "rehearsal" / _dataset(spec) / variant)
    if variant in ("corrupt_file", "mask_shape"):
        assert str(replica) in message and re.search(r"\.(png|jpg|nii\.gz|hdf|h5|npz|dcm)\b", message), message
    else:
        assert re.search(r"label|value|outside|not 0 or 1", message), message


# ---------------------------------------------------------------- the slide-cohort patient rule


def test_camelyon17_slides_without_patient_ids_are_refused(tmp_path):
    import pandas as pd

    from dinoscale.data import prepare_dataset
    from dinoscale.data.dataset import DataError
    from dinoscale.spec import DatasetSpec

    spec = DatasetSpec(name="wsi-tiles", root=str(tmp_path), subset="camelyon17")
    get_replica("wsi-tiles").write(tmp_path, spec)
    ds = prepare_dataset(spec, tmp_path / "store")
    m = ds.manifest
    assert m.groupby("patient_id")["bag_id"].nunique().max() == 5  # five slides per patient
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()  # never a patient in two splits
    table = pd.read_csv(tmp_path / "slides.csv")
    table.drop(columns=["patient_id"]).to_csv(tmp_path / "slides.csv", index=False)
    with pytest.raises(DataError, match=r"add a 'patient_id' column \(e\.g\. patient_000 for patient_000_node_0\)"):
        prepare_dataset(spec, tmp_path / "store")
    c16 = tmp_path / "c16"
    c16_spec = DatasetSpec(name="wsi-tiles", root=str(c16), patient_ids="required")
    get_replica("wsi-tiles").write(c16, c16_spec)
    pd.read_csv(c16 / "slides.csv").drop(columns=["patient_id"]).to_csv(c16 / "slides.csv", index=False)
    with pytest.raises(DataError, match="dataset.patient_ids is 'required'"):
        prepare_dataset(c16_spec, tmp_path / "store")
    ds = prepare_dataset(DatasetSpec(name="wsi-tiles", root=str(c16)), tmp_path / "store")
    assert ds.provenance["data.patient_ids"].startswith("slide id (one slide per patient assumed")


# ---------------------------------------------------------------- MedMNIST+ items, memory-mapped


def test_medmnist_items_are_read_from_the_npz_without_loading_the_array(tmp_path):
    from dinoscale.data import prepare_dataset
    from dinoscale.data.readers import npz_member, read_image, read_volume
    from dinoscale.spec import DatasetSpec

    for subset, shape in (("pneumoniamnist_64", (64, 64)), ("organmnist3d_28", (28, 28, 28))):
        spec = DatasetSpec(name="medmnist", root=str(tmp_path), subset=subset)
        get_replica("medmnist").write(tmp_path, spec)
        ds = prepare_dataset(spec, tmp_path / "store")
        src = ds.sources("test")
        assert isinstance(npz_member(tmp_path / f"{subset}.npz", "test_images"), np.memmap)
        with np.load(tmp_path / f"{subset}.npz") as z:
            want = z["test_images"][3].astype(np.float32)
            assert z["test_images"].dtype == np.uint8 and z["test_images"].shape[1:] == shape
        if len(shape) == 2:
            np.testing.assert_array_equal(read_image(src.items[3]), want)
        else:
            vol, spacing = read_volume(src.items[3])
            np.testing.assert_array_equal(vol[0], want) and spacing == (1.0, 1.0, 1.0)
            assert src.n_slices[3] == 28


# ---------------------------------------------------------------- every paper spec, end to end


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


# sweeps/xray.yaml rehearses through the CLI under a pseudo-terminal instead (tests/test_front_door_pty.py);
# sweeps/autolaparo.yaml one cell at a time, with its frame metrics checked (tests/test_video_frames.py);
# sweeps/camus.yaml in tests/test_registration.py (with the registration task's own checks)
# sweeps/xray-external-rsna.yaml in tests/test_external.py (one cell, with its external results checked)
# the MSD tasks beyond Task01 / Task09 (MSD_TASKS) in tests/test_msd_tasks.py;
# sweeps/ct-msd-spleen.yaml on its Task09 replica in tests/test_replicas_volumes.py, with the probe steps and the
# resolution a known answer needs (Dice on the native grid); the lean MSD grid is rehearsed here by sweeps/mri.yaml
ELSEWHERE = ("xray", "autolaparo", "camus", "xray-external-rsna", "ct-msd-spleen", *MSD_TASKS)
IN_PROCESS = [s for s in REHEARSABLE if s.stem not in ELSEWHERE]
# Rehearsed with more than the first replicate: the replicate path of that spec's split (MSD: validation fold k)
REPLICATES = {"mri": 2}
# Rehearsed on one cell (the spec's first backbone at its first resolution): a second spec of a task kind whose lean
# grid the spec named beside it rehearses here; what it adds is its dataset (layout, labels, split, external set),
# as for the MSD tasks of tests/test_msd_tasks.py. One Tune trial is most of a rehearsal's time.
# (The grid is the scaling axes; the label type, multiclass / multilabel / binary, is the dataset's.)
ONE_CELL = {
    "em-ac3ac4": "em",  # EM affinities, VOI / ARAND
    "petct-hecktor": "petct",  # PET/CT fused segmentation
    "wsi-bcnb": "wsi",  # tile bags, ABMIL
    "wsi-external-camelyon17": "wsi",
    "endoscopy-edd2020": "endovis2018",  # RGB frames, linear segmentation head
    "medmnist-3d": "ct",  # volumes as mean-pooled slices, linear + k-NN
    "rsna": "medmnist-2d",  # 2D images, linear + k-NN
    "kvasir-capsule": "medmnist-2d",
}


def _one_cell(spec: Path) -> tuple[str, ...]:
    if spec.stem not in ONE_CELL:
        return ()
    raw = yaml.safe_load(spec.read_text())
    b = raw["backbones"][0]
    return f"resolutions=[{raw['resolutions'][0]}]", f"backbones=[{{name: {b['name']}, weights: {b['weights']}}}]"


def _predictions(client, run_id: str):
    import pandas as pd

    path = client.download_artifacts(run_id, record.PREDICTIONS)
    return pd.read_csv(path, dtype={"sample_id": str, "patient_id": str})


def _cremi_blocks_scored_per_sample_without_an_interval(r, out, parent, cells, client):
    """CREMI A/B/C, each sample's sections cut into train (first), val and test (last) blocks read from the HDF5 as
    volumes. Three test units are too few for a bootstrap interval: the runs say so (a tag, no _ci_ metrics) and
    report A, B and C separately."""
    (probe,) = r.spec.probes
    # the replica's 25 sections per sample: 16 train / 4 val / 5 test (20%, the last ones), x 3 samples
    assert {(f.split, f.n_slices) for f in out.plan.feature_sets} == {("train", 48), ("val", 12), ("test", 15)}
    assert parent.data.tags[record.HEADLINE_GOAL] == "min"
    text = Path(client.download_artifacts(parent.info.run_id, "protocol/protocol.md")).read_text()
    assert f"steps | {probe.steps}" in text and "CREMI" in text and "first sections train" in text
    for run in cells:
        m = run.data.metrics
        assert m["test_voi"] == pytest.approx(m["test_voi_split"] + m["test_voi_merge"], abs=1e-9)
        assert "test_voi_ci_low" not in m and "no interval: 3 test unit(s)" in run.data.tags[record.INTERVAL]
        assert 0 <= m["test_arand"] <= 1 and m["interval_units"] == 3 and m["n_test"] == 3
        per_sample = [m[f"test_voi.{s}"] for s in "ABC"]
        assert np.mean(per_sample) == pytest.approx(m["test_voi"], abs=1e-9)  # one block per sample
        assert m["val_voi"] >= 0 and float(run.data.tags["selected.threshold"]) in probe.thresholds
        assert run.data.params["probe.steps"] == str(probe.steps)
        assert run.data.params["replicate_split"] == "the dataset's split"
        assert run.data.tags[record.DATA_SOURCE] == "real"
        preds = _predictions(client, run.info.run_id)
        assert {"voi", "voi_split", "voi_merge", "arand", "cremi_score"} <= set(preds.columns)
        assert preds["group"].tolist() == ["A", "B", "C"]
        assert preds["sample_id"].tolist() == ["A:20-25", "B:20-25", "C:20-25"]
    assert "no interval" in (out.report_dir / "report.md").read_text()


def _pet_fused_into_the_features(r, out, parent, cells, client):
    """AutoPET: the PET (SUV) is a channel of the backbone's input beside the windowed CT, so it is in the key."""
    assert out.plan.feature_sets
    for f in out.plan.feature_sets:
        assert "pet_suv" in f.recipe.volume.signature() and f.recipe.intensity == "window"
    assert all("test_dice" in c.data.metrics for c in cells)


def _slides_scored_not_tiles(r, out, parent, cells, client):
    """Camelyon16: tiles are extracted, but ABMIL predicts (and is scored) once per slide."""
    test = out.plan.dataset.split("test")
    slides = list(dict.fromkeys(test["bag_id"].astype(str)))
    truth = test.drop_duplicates("bag_id").set_index("bag_id")["tumor"]
    for run in cells:
        m = run.data.metrics
        assert m["n_test"] == len(slides) and m["n_test"] < len(test)  # one prediction per slide
        preds = _predictions(client, run.info.run_id)
        assert preds["sample_id"].tolist() == slides
        assert (preds["label_tumor"].to_numpy() == truth.loc[slides].to_numpy()).all()


# The checks of a task kind's own path, on the rehearsal of the spec that runs it
TASK_CHECKS = {
    "em": _cremi_blocks_scored_per_sample_without_an_interval,
    "petct": _pet_fused_into_the_features,
    "wsi": _slides_scored_not_tiles,
}


@pytest.mark.slow
@pytest.mark.parametrize("spec", IN_PROCESS, ids=[s.stem for s in IN_PROCESS])
def test_every_paper_spec_rehearses_end_to_end(spec, isolated):
    from dinoscale.rehearse import rehearse
    from dinoscale.tasks import get_task

    replicates = REPLICATES.get(spec.stem, 1)
    r, out = rehearse(
        spec, lean=True, quiet=True, project_dir=isolated, replicates=replicates, overrides=_one_cell(spec)
    )
    assert [row["cell"] for row in out.rows if row["state"] != "FINISHED"] == []
    runs = _runs(f"sqlite:///{isolated}/mlruns.db", r.spec.experiment_name)
    parents = [x for x in runs if x.data.tags.get(record.ROLE) == record.ROLE_SWEEP]
    cells = [x for x in runs if x.data.tags.get(record.ROLE) == record.ROLE_CELL]
    assert len(parents) == 1 and len(cells) == len(out.plan.cells) > 0
    if spec.stem in ONE_CELL:  # one backbone at one resolution; the sibling rehearses the lean grid here
        assert len(r.spec.backbones) == len(r.spec.resolutions) == 1
        assert ONE_CELL[spec.stem] in [s.stem for s in IN_PROCESS if s.stem not in ONE_CELL]
    headline = get_task(out.plan.dataset.task).headline.test
    for run in parents + cells:
        assert run.data.tags[record.REHEARSAL] == "true" and run.data.tags[record.PROFILE] == "rehearsal"
        assert run.data.tags[record.REHEARSAL_SOURCE_SPEC] == str(spec)
    assert all(np.isfinite(c.data.metrics[headline]) for c in cells)
    assert parents[0].data.params[record.REHEARSAL_PREFIX + "backbones"].startswith("dinov3-vit")
    for name in ("report.md", "report.html"):
        text = (out.report_dir / name).read_text()
        assert "REHEARSAL, NOT A RESULT" in text and "REHEARSAL REPLICA of" in text
    assert out.report_dir.parent.name == "reports" and out.report_dir.name.endswith("-rehearsal")
    if spec.stem == "mri":  # MSD Task01: 5-fold CV by case, replicate k validates on fold k; distances in mm
        assert {c.data.params["replicate_split"] for c in cells} == {f"validation fold {k} of 5" for k in (0, 1)}
        assert all("test_hd95_mm" in c.data.metrics for c in cells)
    if spec.stem in TASK_CHECKS:
        from mlflow.tracking import MlflowClient

        TASK_CHECKS[spec.stem](r, out, parents[0], cells, MlflowClient(f"sqlite:///{isolated}/mlruns.db"))


@pytest.mark.slow
def test_a_skipped_corrupt_file_is_recorded_on_the_run(isolated):
    from dinoscale.rehearse import rehearse

    spec = ROOT / "sweeps" / "xray.yaml"
    r, out = rehearse(spec, variant="corrupt_file", on_bad_file="skip", lean=True, quiet=True, project_dir=isolated)
    assert all(row["state"] == "FINISHED" for row in out.rows)
    parent = next(
        x
        for x in _runs(f"sqlite:///{isolated}/mlruns.db", r.spec.experiment_name)
        if x.data.tags.get(record.ROLE) == record.ROLE_SWEEP
    )
    assert parent.data.tags[record.DATA_SKIPPED] == "1"
    assert parent.data.tags[record.DATA_SKIPPED_FILES] == Path(r.replica.broken).name


# ---------------------------------------------------------------- protocol splits of the replicas' datasets


def test_rsna_uses_mgca_split_lists_when_present(tmp_path):
    import pandas as pd

    from dinoscale.data import prepare_dataset
    from dinoscale.data.dataset import DataError
    from dinoscale.spec import DatasetSpec

    spec = DatasetSpec(name="rsna-pneumonia", root=str(tmp_path))
    get_replica("rsna-pneumonia").write(tmp_path, spec)
    ds = prepare_dataset(spec, tmp_path / "store")
    listed = {s: set(pd.read_csv(tmp_path / f"{s}.csv")["patientId"]) for s in ("train", "val", "test")}
    for split, ids in listed.items():
        assert set(ds.manifest.loc[ds.manifest.split == split, "patient_id"]) == ids
    assert ds.provenance["data.split"] == "official"
    val = pd.read_csv(tmp_path / "val.csv", index_col=0)
    pd.concat([val, pd.read_csv(tmp_path / "test.csv", index_col=0).head(1)]).to_csv(tmp_path / "val.csv")
    with pytest.raises(DataError, match=r"is also in (val|test)\.csv"):
        prepare_dataset(spec, tmp_path / "store")
    (tmp_path / "val.csv").unlink()
    assert prepare_dataset(spec, tmp_path / "store").provenance["data.split"] == "patient-level random"


def test_cremi_paper_split_is_the_first_100_sections_and_the_last_25():
    from dinoscale.data.adapters import cremi_rows
    from dinoscale.spec import load_spec

    split = load_spec(ROOT / "sweeps" / "em.yaml").dataset.split
    cuts = {r["split"]: (r["z_start"], r["z_stop"]) for r in cremi_rows(Path("sample_A_20160501.hdf"), "A", 125, split)}
    assert cuts["test"] == (100, 125) and cuts["train"][0] == 0 and cuts["val"][1] == 100
