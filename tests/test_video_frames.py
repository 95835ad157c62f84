"""Video-frame classification by video (issue 30): Kvasir-Capsule and AutoLaparo.

The video is the grouping unit a patient is in radiology: no video in two splits, intervals over videos; the
frame metrics the benchmark reports (accuracy, macro precision / recall / F1, Jaccard) agree with scikit-learn;
one paper spec rehearses end to end (trimmed to one cell; every spec's lean rehearsal is in test_rehearse.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, jaccard_score, precision_recall_fscore_support

from conftest import ROOT
from dinoscale import record
from dinoscale.data import prepare_dataset
from dinoscale.data.dataset import DataError
from dinoscale.data.replicas import get_replica
from dinoscale.data.video import AUTOLAPARO_PHASES, KVASIR_CAPSULE_CLASSES
from dinoscale.metrics import (
    NEGATIVE_PATIENTS,
    NEGATIVE_UNITS,
    frame_metrics,
    macro_class_set,
    per_video_accuracy,
)
from dinoscale.spec import DatasetSpec
from dinoscale.tasks import Scoring, get_task


def _prepared(name: str, tmp_path, **kw):
    spec = DatasetSpec(name=name, root=str(tmp_path / name), **kw)
    get_replica(name).write(tmp_path / name, spec)
    return spec, prepare_dataset(spec, tmp_path / "store")


# ---------------------------------------------------------------- splits by video


def test_autolaparo_splits_by_video_number_as_released(tmp_path):
    _, ds = _prepared("autolaparo", tmp_path)
    m = ds.manifest
    assert ds.task == "video_frames" and ds.color == "rgb" and ds.classes == AUTOLAPARO_PHASES
    videos = {s: set(m.loc[m.split == s, "patient_id"]) for s in ("train", "val", "test")}
    assert videos == {
        "train": {f"{v:02d}" for v in range(1, 11)},
        "val": {f"{v:02d}" for v in range(11, 15)},
        "test": {f"{v:02d}" for v in range(15, 22)},
    }
    assert (m[ds.classes].sum(axis=1) == 1).all()  # one phase per frame
    first = m[m.sample_id == "01/00000.png"].iloc[0]  # label row 'frame 1' is the first extracted frame
    assert first["path"].endswith("frames/01/00000.png") and first["Preparation"] == 1
    assert ds.replicates == "fixed"


def test_kvasir_capsule_tests_one_official_fold_and_keeps_each_video_in_one_split(tmp_path):
    spec, ds = _prepared("kvasir-capsule", tmp_path)
    m = ds.manifest
    assert ds.classes == KVASIR_CAPSULE_CLASSES and ds.color == "rgb"
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()  # no video in two splits
    fold1 = pd.read_csv(tmp_path / "kvasir-capsule" / "official_splits" / "split_1.csv")
    assert set(m.loc[m.split == "test", "sample_id"]) == set(fold1["filename"])
    assert m.loc[m.split == "val", "patient_id"].nunique() >= 1  # val: whole videos carved from the train fold
    assert "Polyp" not in m.columns and not m["path"].str.contains("/Polyp/").any()  # dropped classes unlisted
    meta = pd.read_csv(tmp_path / "kvasir-capsule" / "metadata.csv", sep=";")
    assert dict(zip(m["sample_id"], m["patient_id"])).items() <= dict(zip(meta.filename, meta.video_id)).items()
    swapped = prepare_dataset(spec.model_copy(update={"subset": "split_0"}), tmp_path / "store")
    trains = swapped.manifest[swapped.manifest.split != "test"]  # split_1 trains (val carved from its videos)
    assert set(trains["sample_id"]) == set(fold1["filename"])


def test_a_video_listed_in_both_folds_is_refused_naming_it(tmp_path):
    spec, ds = _prepared("kvasir-capsule", tmp_path)
    folder = tmp_path / "kvasir-capsule" / "official_splits"
    fold0, fold1 = (pd.read_csv(folder / f"split_{k}.csv") for k in (0, 1))
    leaked = fold0.iloc[:1]
    pd.concat([fold1, leaked]).to_csv(folder / "split_1.csv", index=False)
    video = ds.manifest.set_index("sample_id").loc[leaked.filename.iloc[0], "patient_id"]
    with pytest.raises(DataError, match=f"video {video} has frames in \\['split_0', 'split_1'\\]"):
        prepare_dataset(spec, tmp_path / "store")


def test_a_phase_outside_the_seven_names_the_file_and_line(tmp_path):
    spec = DatasetSpec(name="autolaparo", root=str(tmp_path))
    get_replica("autolaparo").write(tmp_path, spec, variant="bad_label")
    with pytest.raises(DataError, match=r"label_03\.txt, line 4: phase 8 is outside the class list 1-7"):
        prepare_dataset(spec, tmp_path / "store")


# ---------------------------------------------------------------- metrics


def test_frame_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    n, c = 300, 6
    true = rng.choice([0, 1, 2, 3, 4], n, p=[0.5, 0.2, 0.15, 0.1, 0.05])  # class 5 absent from the ground truth
    scores = rng.random((n, c)) + 0.8 * np.eye(c)[true] * (rng.random((n, 1)) < 0.6)
    scores[:, 4] -= 2  # class 4 never predicted: precision 0 (zero_division), recall 0
    scores[:7, 5] += 3  # class 5 predicted on a few frames: out of the averages, errors in accuracy
    pred = scores.argmax(1)
    present = np.unique(true)
    p, r, f, _ = precision_recall_fscore_support(true, pred, labels=present, average="macro", zero_division=0)
    want = {
        "accuracy": accuracy_score(true, pred),
        "macro_precision": p,
        "macro_recall": r,
        "macro_f1": f,
        "jaccard": jaccard_score(true, pred, labels=present, average="macro", zero_division=0),
    }
    got = frame_metrics(np.eye(c)[true], scores)
    assert got == pytest.approx(want, abs=1e-12)
    assert frame_metrics(true, scores) == pytest.approx(want, abs=1e-12)  # class indices as well as one-hot
    videos = np.repeat([f"v{k}" for k in range(10)], 30)
    ids, acc = per_video_accuracy(true, scores, videos)
    assert list(ids) == sorted(set(videos))
    assert acc == pytest.approx([accuracy_score(true[videos == v], pred[videos == v]) for v in ids])


def test_the_macro_class_set_of_frames_counts_a_video_negative_when_it_holds_another_class():
    # every video holds every phase: no video is negative under the patient rule, all are under the frame rule
    y = np.tile(np.eye(3), (6, 1))
    videos = np.repeat([f"v{k}" for k in range(6)], 3)
    assert not macro_class_set(y, videos, 1, NEGATIVE_PATIENTS).any()
    assert macro_class_set(y, videos, 5, NEGATIVE_UNITS).all()
    one_image_each = np.eye(3)[[0, 1, 2, 0, 1, 2]]  # one unit per patient: both rules agree
    ids = np.arange(6)
    assert (macro_class_set(one_image_each, ids, 2) == macro_class_set(one_image_each, ids, 2, NEGATIVE_UNITS)).all()


def test_video_frames_are_scored_with_intervals_over_videos():
    rng = np.random.default_rng(1)
    videos = np.repeat([f"{v:02d}" for v in range(12)], 20)
    true = rng.integers(0, 4, len(videos))
    y = np.eye(4)[true]
    scores = rng.random((len(videos), 4)) + y
    task = get_task("video_frames")
    s = Scoring(list(map(str, range(len(videos)))), videos, y, ["a", "b", "c", "d"], resamples=200)
    metrics, table = task.score(scores, None, s)
    assert task.exclusive and task.headline.test == "test_macro_f1" and metrics["macro_auroc_classes"] == 4
    for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "jaccard", "video_accuracy"):
        lo, hi = (metrics[f"test_{name}{end}"] for end in (record.CI_LOW, record.CI_HIGH))
        assert lo <= metrics[f"test_{name}"] <= hi
    assert metrics["test_accuracy"] == pytest.approx(frame_metrics(y, scores)["accuracy"])
    assert metrics["n_test_videos"] == 12 and metrics["interval_units"] == 12 and metrics[record.MACRO_NEGATIVES] == 1
    assert (table["predicted"] == np.array(s.classes)[scores.argmax(1)]).all()


def test_the_analysis_resamples_a_frame_task_with_its_own_class_set_rule():
    """The report recomputes macro AUROC on video resamples with the class set the trial used (the run logs
    ``macro_negative_units``): phases all present in every video are averaged, not dropped."""
    from dinoscale.analysis.resample import _fixed_classes, _patient_draws

    rng = np.random.default_rng(2)
    videos = np.repeat([f"{v:02d}" for v in range(12)], 14)
    y = np.tile(np.eye(7), (24, 1)).astype(int)  # every phase in every video, twice
    scores = rng.random(y.shape) + y
    p = pd.DataFrame({"sample_id": map(str, range(len(y))), "patient_id": videos})
    for j, c in enumerate(AUTOLAPARO_PHASES):
        p[f"label_{c}"], p[f"score_{c}"] = y[:, j], scores[:, j]
    assert _fixed_classes(p, 5) == [] and _fixed_classes(p, 5, NEGATIVE_UNITS) == AUTOLAPARO_PHASES
    draws = _patient_draws([p], 50, rng, [5], [NEGATIVE_UNITS])
    assert np.isfinite(draws).all() and (draws > 0.5).all()


def _auroc_and_f1_disagree(rng, n: int = 240, c: int = 4):
    """Frames on which scores that rank every class perfectly can still put most argmaxes on the wrong class
    (a large constant added to one class): macro AUROC 1, macro F1 low; the other scores rank worse but argmax
    right."""
    true = np.arange(n) % c
    y = np.eye(c)[true]
    ranked_wrong_argmax = y * 0.2 + rng.random((n, c)) * 0.1
    ranked_wrong_argmax[:, 0] += 0.5  # class 0 wins every argmax; each column still ranks its class first
    noisy_right_argmax = y + rng.random((n, c)) * 1.4
    return y, ranked_wrong_argmax, noisy_right_argmax


@pytest.mark.parametrize("kind", ["linear", "knn", "logreg"])
def test_a_video_frame_probe_selects_its_configuration_on_the_headline_macro_f1(kind):
    """The probes choose on val by the task's headline: macro F1 of the argmax class for video frames (the
    endoscopy tables' F1), macro AUROC for the other classification tasks; the value they return is it."""
    from dinoscale.metrics import macro_auroc, selection_metric
    from dinoscale.probes.registry import Split, get_probe

    rng = np.random.default_rng(3)
    y, wrong, right = _auroc_and_f1_disagree(rng)
    assert macro_auroc(y, wrong) > macro_auroc(y, right) and frame_metrics(y, wrong)["macro_f1"] < 0.4
    assert selection_metric("macro_f1")(y, right) > frame_metrics(y, wrong)["macro_f1"] + 0.3

    true = y.argmax(1)
    x = (np.eye(4)[true] * 2 + rng.normal(0, 1, (len(y), 4))).astype(np.float32)
    x = np.hstack([x, rng.normal(0, 1, (len(y), 12)).astype(np.float32)])
    select = get_task("video_frames").headline.name
    tr, va, te = (Split(x[i::3], y[i::3], exclusive=True, select=select) for i in range(3))
    defn = get_probe(kind)
    result = defn.fit(defn.spec(kind=kind), tr, va, te, seed=0)
    assert result.val_metric == pytest.approx(frame_metrics(va.y, result.val_scores)["macro_f1"])
    default = defn.fit(defn.spec(kind=kind), *(Split(s.x, s.y, exclusive=True) for s in (tr, va, te)), seed=0)
    assert default.val_metric == pytest.approx(macro_auroc(va.y, default.val_scores))


def test_fine_tuning_a_video_frame_cell_selects_on_val_macro_f1_too():
    """LoRA / full cells choose their epoch and configuration on the same val metric the frozen probes use."""
    from dinoscale.metrics import macro_auroc
    from dinoscale.train.heads import head_settings, objective_for

    y, wrong, right = _auroc_and_f1_disagree(np.random.default_rng(5))
    (head,) = head_settings(False, [], "mean")
    video = objective_for(head, get_task("video_frames").headline.name)
    assert video.val_metric(y, wrong) == pytest.approx(frame_metrics(y, wrong)["macro_f1"])
    assert video.val_metric(y, right) > video.val_metric(y, wrong)
    assert objective_for(head).val_metric(y, wrong) == pytest.approx(macro_auroc(y, wrong))


def test_the_analysis_recomputes_a_frame_headline_on_video_resamples():
    """The report's draws of macro F1 (or accuracy, ``--metric accuracy``) come from the predictions on video
    resamples: centred on the run's value, spread like the trial's video-level interval."""
    from dinoscale.analysis.resample import _frame_draws, _usable
    from dinoscale.headline import ACCURACY, MACRO_F1
    from dinoscale.metrics import frame_metric, patient_bootstrap

    rng = np.random.default_rng(4)
    videos = np.repeat([f"{v:02d}" for v in range(15)], 16)
    y = np.eye(4)[rng.integers(0, 4, len(videos))]
    scores = rng.random(y.shape) + 0.6 * y
    p = pd.DataFrame({"sample_id": map(str, range(len(y))), "patient_id": videos})
    for j, c in enumerate("abcd"):
        p[f"label_{c}"], p[f"score_{c}"] = y[:, j], scores[:, j]
    assert _usable(p, MACRO_F1) and _usable(p, ACCURACY)
    for h in (MACRO_F1, ACCURACY):
        draws = _frame_draws([p, p], h.name, 400, rng)
        point = frame_metrics(y, scores)[h.name]
        assert (draws[:, 0] == draws[:, 1]).all()  # one test set: the same resamples for every run
        trial = patient_bootstrap(y, scores, videos, metric=frame_metric(h.name), resamples=400, seed=0)
        lo, hi = np.quantile(draws[:, 0], [0.025, 0.975])
        assert abs(np.mean(draws[:, 0]) - point) < 0.03
        assert lo < point < hi and abs((hi - lo) - (trial.high - trial.low)) < 0.5 * (trial.high - trial.low)


def test_the_protocol_table_states_videos_as_the_unit_and_macro_f1_as_the_selection():
    """The committed protocol document (kept current by test_conventions) says what the video specs do: splits and
    intervals by video, the headline macro F1, every probe selecting on it."""
    text = (ROOT / "sweeps" / "PROTOCOL.md").read_text()
    for name in ("kvasir-capsule-paper", "autolaparo-paper"):
        section = text.split(f"## Protocol: {name}")[1].split("\n## Protocol:")[0]
        assert "| headline | test_macro_f1" in section and "| split | video-level;" in section
        assert "1000 video resamples" in section and "10 test videos" in section
        assert "patient" not in section.split("### Metrics")[0].split("| split |")[1].split("\n")[0]
        probes = [
            line for line in section.splitlines() if line.startswith("| selection |") and "on val only" not in line
        ]
        assert len(probes) == 2 and all("val macro F1 (frames, argmax class)" in line for line in probes)


# ---------------------------------------------------------------- a paper spec, end to end


@pytest.mark.slow
def test_the_autolaparo_spec_rehearses_to_its_headline_and_frame_metrics(tmp_path, monkeypatch):
    """One cell of sweeps/autolaparo.yaml (smallest backbone and resolution, the linear probe) through the
    rehearsal: the replica, the adapter, extraction in colour, the probe, the frame metrics and the report."""
    from mlflow.tracking import MlflowClient

    from dinoscale.rehearse import rehearse

    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("DINOSCALE_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.chdir(tmp_path)
    one_cell = ("backbones=[{name: dinov3-vits16, weights: hub}]", "resolutions=[224]", "probes=[{kind: linear}]")
    r, out = rehearse(ROOT / "sweeps" / "autolaparo.yaml", quiet=True, project_dir=tmp_path, overrides=one_cell)
    assert [row["state"] for row in out.rows] == ["FINISHED"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name(r.spec.experiment_name)
    cell = next(x for x in client.search_runs([exp.experiment_id]) if x.data.tags.get(record.ROLE) == record.ROLE_CELL)
    m = cell.data.metrics
    assert np.isfinite(m["test_macro_auroc"]) and m["n_test_videos"] == 7
    # the headline is the tables' macro F1, selected on val by it (the linear probe's val value is val macro F1)
    parent = client.get_run(cell.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[record.HEADLINE] == "test_macro_f1" and 0 <= m["val_macro_f1"] <= 1
    assert "val_macro_auroc" not in m
    assert all(0 <= m[f"test_{k}"] <= 1 for k in ("accuracy", "macro_f1", "jaccard", "video_accuracy"))
    assert m["test_accuracy"] > 1 / len(AUTOLAPARO_PHASES)  # the replica's phases are learnable
    assert cell.data.tags[record.DATA_PATIENT_IDS] == "video number (01-21)"
    assert "REHEARSAL, NOT A RESULT" in (out.report_dir / "report.md").read_text()
