"""The training-set-size axis (label efficiency, issue 29): subsets of each replicate's train patients, drawn by
patient, stratified by label, nested across sizes and redrawn per replicate, val and test untouched; cells per
size share the features; the demo spec swept through the CLI reports the curve and names the size that matches
full data."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT, tiny_spec_dict
from dinoscale import record
from dinoscale.data.splits import replicate_indices, train_subset_patients, train_subset_recipe
from dinoscale.spec import load_spec, parse_spec

DEMO = ROOT / "sweeps" / "demo" / "xray-labels.yaml"


def _cohort(n_patients=200, n_classes=3, seed=0, exclusive=True):
    """Patients with 1-4 units each; one class per patient (exclusive) or several, unbalanced classes."""
    rng = np.random.default_rng(seed)
    pids, labels = [], []
    weights = np.array([0.6, 0.3, 0.1][:n_classes])
    for p in range(n_patients):
        if exclusive:
            y = np.eye(n_classes)[rng.choice(n_classes, p=weights / weights.sum())]
        else:
            y = (rng.random(n_classes) < weights).astype(float)
        for _ in range(rng.integers(1, 5)):
            pids.append(f"p{p:03d}")
            labels.append(y)
    return np.array(pids), np.array(labels)


def _split(pids, labels, n_val=40):
    """The cohort cut into train and val by patient (the dataset's split)."""
    val_patients = set(sorted(set(pids))[:n_val])
    is_val = np.array([p in val_patients for p in pids])
    order = np.r_[np.flatnonzero(~is_val), np.flatnonzero(is_val)]  # train units, then val units
    return pids[~is_val], pids[is_val], labels[order]


def _subsets(pids, labels, unit, values, seed):
    return {v: train_subset_patients(pids, labels, train_subset_recipe(unit, v, 0, seed)) for v in values}


def test_subsets_are_whole_patients_of_the_replicates_train_and_val_stays_whole():
    pids, labels = _cohort()
    train_p, val_p, y = _split(pids, labels)
    for mode in ({"mode": "dataset"}, {"mode": "resplit", "seed": [0, 1]}):
        full_tr, full_va = replicate_indices(train_p, val_p, mode, labels=y)
        rec = {**mode, "train": train_subset_recipe("fractions", 0.1, 0, 1)}
        tr, va = replicate_indices(train_p, val_p, rec, labels=y)
        both = np.r_[train_p, val_p]
        assert np.array_equal(va, full_va)  # val untouched (test is never an input)
        assert set(tr) <= set(full_tr) and not set(both[tr]) & set(both[va])  # no val patient trains
        kept = set(both[tr])
        assert len(kept) == round(0.1 * len(set(both[full_tr])))
        # a patient is never split: every unit of a kept patient is kept, none of the others
        in_train = np.isin(np.arange(len(both)), full_tr)
        assert set(np.flatnonzero(np.isin(both, list(kept)) & in_train)) == set(tr)


def test_sizes_are_nested_stratified_and_redrawn_per_replicate():
    pids, labels = _cohort()
    fractions = [0.05, 0.1, 0.3, 0.6, 1.0]
    by_seed = {s: _subsets(pids, labels, "fractions", fractions, s) for s in (0, 1, 2)}
    stratum = {p: int(np.argmax(y)) for p, y in zip(pids, labels)}
    share = pd.Series(stratum).value_counts()
    for s, subsets in by_seed.items():
        for small, large in zip(fractions, fractions[1:]):
            assert subsets[small] <= subsets[large], (s, small, large)  # nested
        assert subsets[1.0] == set(pids)
        for f in fractions:  # each class's count in the subset within 2 patients of its share of the train set
            counts = pd.Series([stratum[p] for p in subsets[f]]).value_counts().reindex(share.index, fill_value=0)
            assert (counts - share / share.sum() * len(subsets[f])).abs().max() <= 2.0, (s, f)
    # redrawn per replicate, and the same replicate draws the same subsets
    assert by_seed[0][0.1] != by_seed[1][0.1] and by_seed[1][0.1] != by_seed[2][0.1]
    assert by_seed[1] == _subsets(pids, labels, "fractions", fractions, 1)
    # counts of patients: the same order's prefixes
    counts = _subsets(pids, labels, "patients", [10, 50], 1)
    assert counts[10] <= counts[50] and (len(counts[10]), len(counts[50])) == (10, 50)


def test_k_shot_takes_k_patients_per_class_nested():
    pids, labels = _cohort(exclusive=True)
    stratum = {p: int(np.argmax(y)) for p, y in zip(pids, labels)}
    shots = _subsets(pids, labels, "shots", [1, 5, 10], 0)
    for k, chosen in shots.items():
        assert pd.Series([stratum[p] for p in chosen]).value_counts().to_dict() == {0: k, 1: k, 2: k}
    assert shots[1] <= shots[5] <= shots[10]
    pids, labels = _cohort(exclusive=False, seed=1)  # multi-label: at least k positive patients per class
    chosen = train_subset_patients(pids, labels, train_subset_recipe("shots", 5, 0, 0))
    positives = {p: set(np.flatnonzero(y)) for p, y in zip(pids, labels)}
    assert all(sum(c in positives[p] for p in chosen) >= 5 for c in range(3))


@pytest.mark.parametrize(
    "value, words",
    [
        ({"fractions": [0.1, 1.5]}, "fractions must be in (0, 1]"),
        ({"fractions": [0.1], "shots": [5]}, "give exactly one of fractions, patients or shots"),
        ({"shots": [0, 5]}, "shots must be at least 1"),
        ({"patients": [20, 20]}, "patients: duplicate values"),
    ],
)
def test_a_bad_train_size_is_one_message_naming_the_key(tmp_path, value, words):
    from dinoscale.specfile import SpecError

    with pytest.raises(SpecError) as e:
        parse_spec({**tiny_spec_dict(tmp_path), "train_size": value})
    assert str(e.value).count("\n  - ") == 1 and f"train_size: {words}" in str(e.value)


def test_the_cli_refuses_a_bad_train_size_with_exit_2(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"extends": str(ROOT / "sweeps/demo/xray.yaml"), "train_size": {"shots": [0]}}))
    done = subprocess.run(
        [sys.executable, "-m", "dinoscale.cli", "validate", str(spec)], capture_output=True, text=True, timeout=120
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "train_size: shots must be at least 1" in out and "Traceback" not in out


def test_cells_per_size_share_the_features_and_training_cells_follow_the_same_subsets(tmp_path):
    from dinoscale.sweep.plan import build_plan

    raw = tiny_spec_dict(tmp_path, backbones=[{"name": "dinov3-demo-xs", "weights": "random"}], resolutions=[32])
    raw["dataset"]["phantom"]["image_size"] = 64
    raw.update(strategies=["frozen", "lora"], probes=[raw["probes"][0]], seeds=[0, 1])
    without = build_plan(parse_spec(raw), tmp_path)
    raw["train_size"] = {"fractions": [0.25, 1.0]}
    plan = build_plan(parse_spec(raw), tmp_path)
    assert len(plan.cells) == 2 * len(without.cells)
    # the axis adds no feature set and changes no feature key or recipe
    assert [f.key.digest for f in plan.feature_sets] == [f.key.digest for f in without.feature_sets]
    frozen = [c for c in plan.cells if not c.trains_encoder]
    assert {c.feature_keys for c in frozen} == {c.feature_keys for c in without.cells if not c.trains_encoder}
    assert len({c.trial_key for c in plan.cells}) == len(plan.cells) and len({c.id for c in plan.cells}) == len(
        plan.cells
    )
    for c in plan.cells:
        size = c.axes[record.TRAIN_SIZE_AXIS]
        assert c.id.endswith(f"_train_size{size}") and c.replicate["train"]["value"] == float(size)
        twin = [d for d in plan.cells if d.axes == {**c.axes, "strategy": d.strategy} and d is not c]
        assert twin and all(d.replicate == c.replicate for d in twin)  # lora trains on the frozen cell's subset


@pytest.mark.slow
def test_the_demo_reports_the_label_efficiency_curve_and_the_size_that_matches(tmp_path):
    """The demo as shipped (3 fractions x 2 replicates), on fewer, smaller phantom images (CI's time)."""
    spec = load_spec(DEMO)
    assert spec.profile == "demo" and len(spec.train_size.fractions) == 3 and len(spec.seeds) == 2
    uri = f"sqlite:///{tmp_path}/m.db"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "dinoscale.cli", "sweep", str(DEMO), "--tracking-uri", uri),
            *("--set", "dataset.phantom.n_patients=80", "--set", "dataset.phantom.image_size=64"),
            *("--set", "resolutions=[32]", "--set", "metrics.bootstrap.resamples=100"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DINOSCALE_STORAGE": str(tmp_path / "store")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = tmp_path / "reports" / "xray-labels-demo"
    md = (report / "report.md").read_text()
    assert "Label efficiency (dinov3-demo-xs@32px, logreg probe, frozen)" in md
    sentence = next(line for line in md.splitlines() if "Label efficiency (" in line)
    assert "matches full data" in sentence or "no smaller training set matches full data" in sentence
    assert (report / "auroc_vs_patients.png").stat().st_size > 0 and "auroc_vs_patients.png" in md
    cells = pd.read_csv(report / "results.csv", dtype={record.TRAIN_SIZE_AXIS: str})
    assert sorted(cells[record.TRAIN_SIZE_AXIS].astype(str)) == ["0.1", "0.3", "1"]
    assert (cells.seeds == 2).all() and (cells.low < cells.metric).all() and (cells.metric < cells.high).all()
    n = cells.sort_values(record.N_TRAIN_PATIENTS)[record.N_TRAIN_PATIENTS].to_numpy()
    assert n[0] < n[1] < n[2]  # the curve's x: the patients each size trained on
    fits = pd.read_csv(report / "fits.csv")
    assert list(fits.loc[fits.axis == "patients", "n_points"]) == [3]
    assert "| train_size | n_train_patients |" in md
    assert "training-set sizes" in done.stdout  # the sweep's plan states the axis
    assert Path(report / "report.html").read_text().count("Label efficiency") >= 1
