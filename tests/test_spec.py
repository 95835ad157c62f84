"""The spec: every shipped profile validates; bad specs fail naming the key path."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dinoscale.cli import app
from dinoscale.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "sweeps").rglob("*.yaml")))
def test_shipped_specs_validate(path):
    spec = load_spec(ROOT / path)
    modalities = ("xray", "ct", "mri", "wsi", "em", "petct")
    stem = Path(path).stem.split("-")[0]
    # a spec named after a modality (sweeps/xray.yaml, demo/ct-semireal.yaml) is of that modality; others are
    # named after their dataset (sweeps/rsna.yaml, sweeps/medmnist-3d.yaml)
    assert spec.modality == stem or stem not in modalities
    assert spec.profile == ("demo" if "/demo/" in path else "paper")


def test_defaults_are_visible_in_resolved_spec():
    spec = load_spec(ROOT / "sweeps/demo/xray.yaml")
    resolved = yaml.safe_load(spec.resolved_yaml())
    assert resolved["probes"][1]["temperature"] == 0.07
    assert resolved["metrics"]["bootstrap"]["level"] == 0.95
    assert resolved["features"]["tokens"] == "cls_mean_patch"
    assert len(resolved["probes"][0]["learning_rates"]) == 16  # the DINOv2 grid extended up to 1.0


def _demo_raw():
    return yaml.safe_load((ROOT / "sweeps/demo/xray.yaml").read_text())


def test_misspelt_nested_key_names_its_path_and_suggests():
    raw = _demo_raw()
    raw["probes"][1]["temprature"] = raw["probes"][1].pop("temperature")
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    msg = str(e.value)
    assert "probes.1.temprature: unknown key 'temprature'" in msg
    assert "did you mean 'temperature'" in msg
    assert "allowed here: kind, ks, temperature" in msg


def test_unknown_top_level_and_backbone_keys():
    raw = _demo_raw()
    raw["resolution"] = [64]
    raw["backbones"][0]["wieghts"] = "random"
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert "resolution: unknown key 'resolution' (did you mean 'resolutions'?)" in str(e.value)
    assert "backbones.0.wieghts: unknown key" in str(e.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda r: r.update(resolutions=[100]),
            "resolutions must be multiples of dinov3-demo-xs's patch size 16, got [100]",
        ),
        (lambda r: r["backbones"].append({"name": "dinov3-vitz16"}), "unknown backbone 'dinov3-vitz16'"),
        (
            lambda r: r["dataset"].update(name="nih-chestxray"),
            "unknown dataset 'nih-chestxray' (did you mean 'nih-chestxray14'?)",
        ),
        (lambda r: r.update(strategies=["adapter"]), "strategies.0"),
        (lambda r: r["probes"].append({"kind": "svm"}), "probes.2"),
        (lambda r: r.pop("modality"), "modality: required field is missing"),
    ],
)
def test_bad_values_are_named(mutate, expected):
    raw = _demo_raw()
    mutate(raw)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert expected.replace("Value error, ", "") in str(e.value)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text((ROOT / "sweeps/demo/xray.yaml").read_text() + "\nresolutions: [32]\n")
    with pytest.raises(SpecError, match="duplicate key 'resolutions'"):
        load_spec(p)


def test_yaml_tags_are_not_executed(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)


def test_cli_validate_exit_codes(tmp_path):
    raw = _demo_raw()
    raw["dataset"]["phantom"]["n_patiens"] = 10
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "dataset.phantom.n_patiens: unknown key 'n_patiens' (did you mean 'n_patients'?)" in res.output
    ok = runner.invoke(app, ["validate", str(ROOT / "sweeps/demo/xray.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "ok - sweep 'xray-demo'" in ok.output
