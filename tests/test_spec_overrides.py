"""`--set key.path=value` and `extends: other.yaml`: a variant of a spec without copying it, validated like
the YAML, shown by `validate --show` and recorded on the sweep's parent run."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import ROOT, tiny_spec_dict
from dinoscale import record
from dinoscale.cli import app
from dinoscale.spec import SpecError, load_spec, parse_spec
from dinoscale.specfile import load_raw, merge

DEMO = ROOT / "sweeps" / "demo" / "xray.yaml"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dinoscale.cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------- --set


def test_set_changes_the_resolved_spec_with_yaml_values_and_list_indices():
    base = load_spec(DEMO)
    s = load_spec(DEMO, ["resolutions=[224]", "probes.0.epochs=10", "dataset.split.seed=3", "description='a b: c'"])
    assert s.resolutions == [224] and s.probes[0].epochs == 10 and s.dataset.split.seed == 3
    assert s.description == "a b: c" and s.probes[1] == base.probes[1] and s.digest() != base.digest()
    assert load_spec(DEMO, ["search.n_trials=4"]).search.n_trials == 4  # a section the file does not write


def test_validate_shows_the_effective_spec():
    r = cli("validate", DEMO, "--set", "resolutions=[224]", "--set", "probes.0.epochs=10", "--show")
    assert r.returncode == 0, r.stderr
    header, *body = r.stdout.splitlines()
    assert header.startswith(f"# {DEMO} --set resolutions=[224] --set probes.0.epochs=10")
    shown = yaml.safe_load("\n".join(body[:-1]))
    assert shown["resolutions"] == [224] and shown["probes"][0]["epochs"] == 10
    digest = load_spec(DEMO, ["resolutions=[224]", "probes.0.epochs=10"]).digest()
    assert body[-1].endswith(f"ok - sweep 'xray-demo' (xray, demo profile), spec digest {digest}")


def test_a_misspelt_key_in_set_is_named_like_one_in_the_yaml():
    r = cli("validate", DEMO, "--set", "probes.1.temprature=0.1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "probes.1.temprature: unknown key 'temprature' (did you mean 'temperature'?)" in r.stderr
    assert f"{DEMO} --set probes.1.temprature=0.1" in r.stderr  # where it came from


@pytest.mark.parametrize(
    "bad, says",
    [
        ("resolutions", "expected key.path=value"),
        ("=3", "expected key.path=value"),
        ("resolutions=[224", "the value is not valid YAML"),
    ],
)
def test_bad_set_syntax_is_one_line_exit_2_before_the_spec_is_read(bad, says):
    r = cli("sweep", DEMO, "--set", bad)
    assert r.returncode == 2 and r.stderr.startswith(f"spec error: --set {bad!r}: {says}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_set_through_a_value_or_past_the_end_of_a_list_is_refused():
    with pytest.raises(SpecError, match=r"'name' is a value \('xray-demo'\), not a mapping"):
        load_spec(DEMO, ["name.first=x"])
    with pytest.raises(SpecError, match=r"probes is a list of 2; give an index 0-1"):
        load_spec(DEMO, ["probes.2.epochs=1"])


# ---------------------------------------------------------------- extends


def test_extends_merges_mappings_replaces_lists_and_is_relative_to_the_spec(tmp_path):
    base = tiny_spec_dict(tmp_path)
    write(tmp_path / "base" / "base.yaml", base)
    overlay = {
        "extends": "../base/base.yaml",
        "name": "overlay",
        "resolutions": [32],
        "dataset": {"split": {"seed": 5}},
    }
    s = load_spec(write(tmp_path / "variants" / "overlay.yaml", overlay))
    assert s.name == "overlay" and s.resolutions == [32]  # a list replaced, not appended to
    assert s.dataset.split.seed == 5 and s.dataset.split.val_fraction == base["dataset"]["split"]["val_fraction"]
    assert s.dataset.phantom.n_patients == 34  # the rest of the mapping inherited
    full = merge(base, {k: v for k, v in overlay.items() if k != "extends"})
    assert s.digest() == parse_spec(full).digest()  # `extends` itself is no part of the spec


def test_extends_chains_and_set_applies_last(tmp_path):
    write(tmp_path / "a.yaml", tiny_spec_dict(tmp_path))
    write(tmp_path / "b.yaml", {"extends": "a.yaml", "resolutions": [32], "seeds": [0, 1]})
    c = write(tmp_path / "c.yaml", {"extends": "b.yaml", "seeds": [7]})
    s = load_spec(c, ["seeds=[8]"])
    assert s.resolutions == [32] and s.seeds == [8] and "extends" not in load_raw(c)


def test_an_extends_cycle_and_a_missing_base_are_refused(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml", "name": "b"})
    r = cli("validate", tmp_path / "a.yaml")
    assert r.returncode == 2 and "'extends' makes a cycle" in r.stderr and "b.yaml" in r.stderr
    assert "Traceback" not in r.stderr
    write(tmp_path / "c.yaml", {"extends": "nowhere.yaml"})
    with pytest.raises(SpecError, match=r"extends 'nowhere.yaml', but .*nowhere.yaml is not a file"):
        load_spec(tmp_path / "c.yaml")


# The xray-strategies demo as it was written before it became an overlay of the xray demo: the overlay
# must resolve to exactly this spec (same digest), whatever the defaults of the day are.
XRAY_STRATEGIES_BEFORE = """
name: xray-strategies-demo
modality: xray
profile: demo
description: Phantom chest X-ray, frozen vs LoRA vs full fine-tuning at equal search budget, 2 small backbones x 1 resolution
dataset:
  name: phantom-xray
  phantom: {seed: 0, n_patients: 60, images_per_patient: [2, 4], image_size: 256}
  split: {val_fraction: 0.2, test_fraction: 0.3, seed: 0}
backbones:
  - {name: dinov3-demo-xs, weights: random}
  - {name: dinov3-demo-s, weights: random}
resolutions: [64]
probes:
  - {kind: linear, epochs: 60, batch_size: 64}
strategies: [frozen, lora, full]
search: {n_trials: 4, seed: 0}
finetuning:
  lora:
    {rank: 8, alpha: 16, lr: 1.0e-3, epochs: 4, batch_size: 32, patience: 2,
     space: {lr: [3.0e-4, 1.0e-2], rank: [4, 8], alpha: [8, 16]}}
  full:
    {lr: 3.0e-4, layer_decay: 0.75, epochs: 4, batch_size: 32, patience: 2,
     space: {lr: [1.0e-4, 3.0e-3]}}
  early_stopping: {grace_epochs: 1, reduction_factor: 2}
seeds: [0]
metrics:
  bootstrap: {resamples: 1000, level: 0.95, seed: 0}
resources: {cpus_per_trial: 1, cpus_per_extraction: 1}
tracking: {uri: "sqlite:///mlruns.db"}
storage: {path: .dinoscale}
"""


def test_the_strategies_demo_overlay_resolves_to_the_spec_it_replaced():
    overlay = ROOT / "sweeps" / "demo" / "xray-strategies.yaml"
    assert yaml.safe_load(overlay.read_text())["extends"] == "xray.yaml"
    assert load_spec(overlay).digest() == parse_spec(yaml.safe_load(XRAY_STRATEGIES_BEFORE)).digest()


# ---------------------------------------------------------------- recorded on the parent run


@pytest.mark.slow
def test_a_sweep_records_its_overrides_and_the_effective_spec(tmp_path, ray_local, monkeypatch):
    raw = tiny_spec_dict(tmp_path)
    raw["backbones"] = raw["backbones"][:1]
    write(tmp_path / "base.yaml", raw)
    spec = write(tmp_path / "variant.yaml", {"extends": "base.yaml", "name": "xray-overrides"})
    monkeypatch.chdir(tmp_path)
    sets = ["resolutions=[32]", "probes=[{kind: knn, ks: [5]}]"]
    res = CliRunner().invoke(app, ["sweep", str(spec), "--no-analysis", *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name(load_spec(spec, sets).experiment_name)
    [parent] = client.search_runs([exp.experiment_id], f"tags.`{record.ROLE}` = '{record.ROLE_SWEEP}'")
    assert parent.data.tags[record.SPEC_OVERRIDES] == "\n".join(sets)
    assert parent.data.tags[record.SPEC_FILE] == f"{spec} < {tmp_path / 'base.yaml'}"
    resolved = yaml.safe_load(
        Path(client.download_artifacts(parent.info.run_id, record.RESOLVED_SPEC, tmp_path)).read_text()
    )
    assert resolved["resolutions"] == [32] and [p["kind"] for p in resolved["probes"]] == ["knn"]
    assert parent.data.tags[record.SPEC_DIGEST] == load_spec(spec, sets).digest()
    assert "Browse with `dinoscale ui`" in res.output  # the default store of this folder: no flag needed


def test_a_rehearsal_reads_an_overlay_and_its_overrides(tmp_path, monkeypatch):
    """`dinoscale rehearse` rewrites the paper spec it reads: it reads the effective one (`extends`, `--set`)."""
    from dinoscale.rehearse import prepare

    monkeypatch.setenv("DINOSCALE_STORAGE", str(tmp_path / "store"))
    overlay = write(tmp_path / "mine.yaml", {"extends": str(ROOT / "sweeps" / "xray.yaml"), "name": "xray-mine"})
    r = prepare(overlay, overrides=["probes.0.epochs=2"])
    assert r.spec.dataset.name == "nih-chestxray14" and r.spec.name.startswith("xray-mine")  # from the base
    assert r.spec.probes[0].epochs == 2 and r.spec.profile == "rehearsal"
