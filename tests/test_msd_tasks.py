"""The Medical Segmentation Decathlon beyond Task01 and Task09: every task's replica in its published form, read
through the ``msd`` adapter, and the eight paper specs of Task02-08 and Task10 rehearsed end to end.

The eight specs rehearse here, one after another in one test (Ray stays up between them), instead of one
parametrized test each in tests/test_rehearse.py: their replicas are the same writer and adapter as
sweeps/ct-msd-spleen.yaml's (whose broken variants test_rehearse covers), so what each adds is its task's layout,
labels, channels and grid, and eight separate rehearsals would cost the suite minutes.
"""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import ROOT
from dinoscale import record
from dinoscale.data import prepare_dataset
from dinoscale.data.replicas import get_replica
from dinoscale.data.replicas.msd import GRIDS, TASKS
from dinoscale.spec import DatasetSpec

# sweeps/<modality>-msd-<task>.yaml of the tasks beyond Task01 (sweeps/mri.yaml) and Task09 (ct-msd-spleen.yaml)
TASK_SPECS = sorted(p for p in (ROOT / "sweeps").glob("*-msd-*.yaml") if p.stem != "ct-msd-spleen")
# The published file names of each task's cases (dataset.json's training entries)
CASE_NAME = {
    "Task01_BrainTumour": r"BRATS_\d{3}",
    "Task02_Heart": r"la_\d{3}",
    "Task03_Liver": r"liver_\d+",
    "Task04_Hippocampus": r"hippocampus_\d{3}",
    "Task05_Prostate": r"prostate_\d{2}",
    "Task06_Lung": r"lung_\d{3}",
    "Task07_Pancreas": r"pancreas_\d{3}",
    "Task08_HepaticVessel": r"hepaticvessel_\d{3}",
    "Task09_Spleen": r"spleen_\d+",
    "Task10_Colon": r"colon_\d{3}",
}


def test_the_task_specs_are_the_eight_tasks_beyond_01_and_09():
    subsets = {yaml.safe_load(p.read_text())["dataset"]["subset"] for p in TASK_SPECS}
    assert subsets == set(TASKS) - {"Task01_BrainTumour", "Task09_Spleen"}
    for p in TASK_SPECS:  # <modality>-msd-<task>: CT tasks ct-, MRI tasks mri-
        meta = TASKS[yaml.safe_load(p.read_text())["dataset"]["subset"]]
        assert p.stem.startswith("ct-" if meta["modality"] == {"0": "CT"} else "mri-"), p.stem


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_reads_with_its_labels_channels_and_grid(task, tmp_path):
    """The replica read through the adapter gives dataset.json's label names and channel names, the files are
    named and shaped as published (channels last for the multi-channel tasks) and carry the task's spacing."""
    import re

    rep = get_replica("msd").write(tmp_path / "msd", DatasetSpec(name="msd", root="x", subset=task))
    meta = json.loads((rep.root / task / "dataset.json").read_text())
    assert {k: meta[k] for k in ("tensorImageSize", "modality", "labels")} == {
        k: TASKS[task][k] for k in ("tensorImageSize", "modality", "labels")
    }
    ds = prepare_dataset(DatasetSpec(name="msd", root=str(rep.root), subset=task), tmp_path / "store")
    assert ds.mask_labels == {int(k): v for k, v in meta["labels"].items() if k != "0"}
    assert ds.channel_names == tuple(meta["modality"][k] for k in sorted(meta["modality"], key=int))
    assert len(ds.manifest) == meta["numTraining"] and set(ds.manifest["split"]) == {"train", "val", "test"}
    grid, n_channels = GRIDS[task], len(meta["modality"])
    for path, mask in zip(ds.manifest["path"], ds.manifest["mask_path"]):
        assert re.fullmatch(CASE_NAME[task] + r"\.nii\.gz", path.rsplit("/", 1)[1]), path
        img, lab = nib.load(path), nib.load(mask)
        assert img.ndim == (4 if n_channels > 1 else 3) and (n_channels == 1 or img.shape[3] == n_channels)
        assert img.shape[:3] == lab.shape
        sx, sy, sz = (float(z) for z in img.header.get_zooms()[:3])
        assert sx == pytest.approx(sy) and grid.in_plane[0] - 1e-3 <= sx <= grid.in_plane[1] + 1e-3, (path, sx)
        assert min(abs(sz - s) for s in grid.slices) < 1e-3, (path, sz)
        assert nib.aff2axcodes(img.affine)[:2] == (("L", "P") if grid.lps else ("R", "A"))
        # every structure dataset.json lists is in every training case
        assert set(np.unique(np.asarray(lab.dataobj))) == {int(k) for k in meta["labels"]}
    assert list((rep.root / task / "imagesTr").glob("._*"))  # the tarballs' resource forks, listed by no entry


@pytest.mark.parametrize("variant", ["mask_shape", "corrupt_file"])
def test_a_broken_two_channel_task_is_named_before_anything_runs(variant, tmp_path):
    """Task05's (x, y, z, 2) images against (x, y, z) label maps: a label map of another shape, a truncated image
    (the variants tests/test_rehearse.py runs on Task09's single-channel files)."""
    from dinoscale.data import DataError

    task = "Task05_Prostate"
    rep = get_replica("msd").write(tmp_path / "msd", DatasetSpec(name="msd", root="x", subset=task), variant)
    with pytest.raises(DataError) as e:
        prepare_dataset(DatasetSpec(name="msd", root=str(rep.root), subset=task), tmp_path / "store")
    assert rep.broken.split(":")[0] in str(e.value)


# One backbone at one resolution per task: what each task adds is its data (layout, labels, channels, window, grid);
# the lean 2 x 2 grid on a Decathlon replica is rehearsed by sweeps/ct-msd-spleen.yaml and sweeps/mri.yaml in
# tests/test_rehearse.py. One Tune trial is most of a rehearsal's time (~12 s on a loaded 2-core machine; four:
# ~30 s), so the full lean grid would cost the suite ~4 minutes for the eight.
ONE_CELL = ("resolutions=[224]", "backbones=[{name: dinov3-vits16, weights: hub}]")


@pytest.mark.slow
def test_every_msd_task_spec_rehearses_end_to_end(tmp_path, monkeypatch, ray_local):
    """Task02-08 and Task10, lean and on one cell each, one after another on one Ray, one store and one tracking
    database: every cell FINISHED, the Dice of every structure of dataset.json's labels recorded on the cells,
    the report written and labelled REHEARSAL."""
    from mlflow.tracking import MlflowClient

    from dinoscale.rehearse import rehearse

    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("DINOSCALE_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    timings = {}
    for spec in TASK_SPECS:
        start = time.perf_counter()
        r, out = rehearse(spec, lean=True, quiet=True, project_dir=tmp_path, overrides=ONE_CELL)
        timings[spec.stem] = round(time.perf_counter() - start, 1)
        assert [row["cell"] for row in out.rows if row["state"] != "FINISHED"] == [], spec.stem
        exp = client.get_experiment_by_name(r.spec.experiment_name)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        cells = [x for x in runs if x.data.tags.get(record.ROLE) == record.ROLE_CELL]
        assert len(cells) == len(out.plan.cells) == 1, spec.stem
        structures = [name for k, name in TASKS[r.spec.dataset.subset]["labels"].items() if k != "0"]
        for cell in cells:
            assert cell.data.tags[record.REHEARSAL] == "true"
            assert cell.data.tags[record.REHEARSAL_SOURCE_SPEC] == str(spec)
            for metric in ["test_dice", *(f"test_dice_{name}" for name in structures)]:
                assert np.isfinite(cell.data.metrics[metric]), (spec.stem, metric)
        for name in ("report.md", "report.html"):
            text = (out.report_dir / name).read_text()
            assert "REHEARSAL, NOT A RESULT" in text and "REHEARSAL REPLICA of MSD " + r.spec.dataset.subset in text
    print("rehearsal seconds:", timings)
