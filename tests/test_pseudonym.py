"""Identifiers leave the data root only pseudonymised (dinoscale.pseudonym, tracking.pseudonymize)."""

from __future__ import annotations

import stat

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_spec_dict
from dinoscale import pseudonym, record
from dinoscale.spec import parse_spec


def _spec(tmp_path, **tracking):
    d = tiny_spec_dict(tmp_path)
    d["tracking"].update(tracking)
    return parse_spec(d)


def test_auto_is_off_for_phantoms_and_public_datasets_on_for_user_data(tmp_path):
    assert not pseudonym.enabled(_spec(tmp_path))  # phantom-xray
    assert pseudonym.enabled(_spec(tmp_path, pseudonymize="on"))
    user = tiny_spec_dict(tmp_path)
    user["dataset"] = {"name": "manifest", "root": str(tmp_path), "classes": ["a", "b"]}
    assert pseudonym.enabled(parse_spec(user))  # the generic manifest: a hospital's own data
    user["tracking"]["pseudonymize"] = "off"
    assert not pseudonym.enabled(parse_spec(user))
    nih = tiny_spec_dict(tmp_path)
    nih["dataset"] = {"name": "nih-chestxray14", "root": str(tmp_path)}
    assert not pseudonym.enabled(parse_spec(nih))  # a registered public dataset


def test_key_beside_the_data_root_created_once_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.delenv("DINOSCALE_PSEUDONYM_KEY", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    user = tiny_spec_dict(tmp_path)
    user["dataset"] = {"name": "manifest", "root": str(root), "classes": ["a", "b"]}
    spec = parse_spec(user)
    key = pseudonym.key_for(spec, tmp_path / "store")
    path = root / pseudonym.KEY_FILE
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pseudonym.key_for(spec, tmp_path / "store") == key and len(key) == 32
    ids = pseudonym.pseudonymize_ids(["MRN-0042", "MRN-0042", "MRN-0043"], key)
    assert ids[0] == ids[1] != ids[2] and all(i.startswith("p-") and "0042" not in i for i in ids)
    assert pseudonym.pseudonymize_ids(["MRN-0042"], b"another key" * 3) != ids[:1]
    monkeypatch.setenv("DINOSCALE_PSEUDONYM_KEY", str(tmp_path / "keys" / "lab.key"))  # a key kept elsewhere
    assert pseudonym.key_for(spec, tmp_path / "store") != key and (tmp_path / "keys" / "lab.key").is_file()


@pytest.mark.slow
def test_sweep_logs_pseudonymised_predictions_that_join_back_with_the_key(tmp_path, monkeypatch):
    from dinoscale.sweep.runner import run_sweep

    monkeypatch.delenv("DINOSCALE_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("DINOSCALE_STORAGE", raising=False)
    d = tiny_spec_dict(tmp_path, backbones=[{"name": "dinov3-demo-xs", "weights": "random"}], resolutions=[32])
    d["probes"] = [d["probes"][0]]
    d["tracking"]["pseudonymize"] = "on"
    spec = parse_spec(d)
    out = run_sweep(spec, project_dir=tmp_path, quiet=True, analyze=False)
    assert [r["state"] for r in out.rows] == ["FINISHED"]
    client = MlflowClient(d["tracking"]["uri"])
    exp = client.get_experiment_by_name(f"dinoscale-{d['name']}")
    (child,) = client.search_runs([exp.experiment_id], f"tags.`{record.ROLE}` = '{record.ROLE_CELL}'")
    text = client.download_artifacts(child.info.run_id, record.PREDICTIONS, str(tmp_path / "dl"))
    preds = pd.read_csv(text, dtype={"sample_id": str, "patient_id": str})
    assert preds["sample_id"].str.startswith("p-").all() and preds["patient_id"].str.startswith("p-").all()
    # joined back locally, with the key kept in the storage path (a phantom has no data root)
    key = pseudonym.load_key(tmp_path / "store" / pseudonym.STORAGE_KEY_FILE)
    from dinoscale.sweep.plan import build_plan

    test = build_plan(spec, tmp_path).dataset.units("test")
    assert sorted(preds["sample_id"]) == sorted(pseudonym.pseudonymize_ids(test.sample_ids, key))
    assert set(preds["patient_id"]) == set(pseudonym.pseudonymize_ids(test.patient_ids, key))
    assert not set(map(str, test.sample_ids)) & set(preds["sample_id"])
