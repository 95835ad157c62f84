"""Intensity mapping as a protocol setting (issue 26): the range a 2D file declares, percentiles of the nonzero
values, own min-max or a CT window; one default per kind of data, stated with its reason; refused where it
cannot apply. Real files: PNG (8 and 16 bit), TIFF (float), pydicom's own DICOM test files."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import tiny_spec_dict
from dinoscale.data.errors import DataError
from dinoscale.data.preprocess import build_transform, intensity_scaler
from dinoscale.data.readers import declared_range
from dinoscale.features import FeatureRecipe
from dinoscale.features.recipe import resolve_intensity
from dinoscale.spec import SpecError, load_spec, parse_spec
from dinoscale.sweep.plan import NotRunnableError, build_plan
from dinoscale.sweep.protocol import protocol_data

BASE = FeatureRecipe("t", "w", 32, (0.0,) * 3, (1.0,) * 3)


def _png(path, arr):
    Image.fromarray(arr).save(path)
    return str(path)


def test_declared_range_of_real_files(tmp_path):
    assert declared_range(_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))) == (0.0, 255.0)
    assert declared_range(_png(tmp_path / "b.png", np.zeros((8, 8), np.uint16))) == (0.0, 65535.0)
    assert declared_range(_png(tmp_path / "c.png", np.zeros((8, 8, 3), np.uint8))) == (0.0, 255.0)
    # a DICOM's VOI window, as the linear VOI LUT function defines it (PS3.3 C.11.2.1.2): centre 600, width 1600
    assert declared_range(get_testdata_file("MR_small.dcm")) == (600 - 0.5 - 1599 / 2, 600 - 0.5 + 1599 / 2)
    # no window: its 16 stored bits (signed) through the rescale intercept -1024
    assert declared_range(get_testdata_file("CT_small.dcm")) == (-32768 - 1024.0, 32767 - 1024.0)
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: its encoding declares no value range.*dataset\.intensity"):
        declared_range(tmp_path / "f.tif")


def test_the_file_range_does_not_move_with_a_burnt_in_marker(tmp_path):
    """The issue's case: min-max rescales the whole image when a marker is burnt in; the declared range does not."""
    rng = np.random.default_rng(0)
    img = rng.integers(20, 180, (64, 64)).astype(np.uint8)
    marked = img.copy()
    marked[:4, :4] = 255  # a burnt-in 'R' marker
    a, b = _png(tmp_path / "a.png", img), _png(tmp_path / "b.png", marked)
    for intensity, same in (("range", True), ("minmax", False)):
        t = build_transform(BASE.with_(resolution=64, intensity=intensity))
        xa, xb = t(a), t(b)
        assert torch.allclose(xa[:, 8:, 8:], xb[:, 8:, 8:], atol=1e-5) is same, intensity
    x = build_transform(BASE.with_(resolution=64, intensity="range"))(a)
    assert abs(float(x[0, 8:, 8:].mean()) - img[8:, 8:].mean() / 255) < 0.01  # 8-bit / 255, as ToTensor


def test_percentiles_of_the_nonzero_values_ignore_the_background_and_outliers():
    x = torch.zeros(100, 100)
    x[20:80, 20:80] = torch.linspace(100, 200, 3600).reshape(60, 60)
    x[50, 50] = 10_000  # one hot voxel
    y = intensity_scaler(BASE.with_(intensity="percentiles", percentiles=(0.5, 99.5)))(x)
    body = y[20:80, 20:80]
    assert float(y[0, 0]) == 0.0 and float(body.max()) == 1.0
    assert 0.4 < float(body.median()) < 0.6  # the hot voxel did not squash the body to ~0, as min-max does
    assert float(intensity_scaler(BASE)(x)[20:80, 20:80].median()) < 0.03


def test_each_kind_of_data_has_a_stated_default():
    assert resolve_intensity("auto", "images", "xray", None)[0] == {"intensity": "range"}
    assert resolve_intensity("auto", "volumes", "mri", None)[0] == {
        "intensity": "percentiles",
        "percentiles": (0.5, 99.5),
    }
    assert resolve_intensity("auto", "slices", "ct", (-1000.0, 400.0))[0] == {
        "intensity": "window",
        "window": (-1000.0, 400.0),
    }
    assert resolve_intensity("auto", "volumes", "em", None)[0] == {"intensity": "minmax"}
    fields, why = resolve_intensity("minmax", "images", "xray", None)
    assert fields == {"intensity": "minmax"} and why == "the spec's dataset.intensity"
    assert "ToTensor" in resolve_intensity("auto", "images", "xray", None)[1]


def test_the_plan_and_the_protocol_carry_the_mapping_and_its_reason(tmp_path):
    spec = parse_spec(tiny_spec_dict(tmp_path))
    plan = build_plan(spec, tmp_path)
    assert {fs.recipe.intensity for fs in plan.feature_sets} == {"range"}
    words = protocol_data(plan)["data and splits"]["intensity mapping"]
    assert "8-bit / 255" in words and "default for 2D images" in words
    other = build_plan(parse_spec(tiny_spec_dict(tmp_path) | {"name": "p"}), tmp_path)
    assert other.feature_sets[0].key.digest == plan.feature_sets[0].key.digest
    d = tiny_spec_dict(tmp_path)
    d["dataset"]["intensity"] = "percentiles"
    d["dataset"]["percentiles"] = [1, 99]
    p2 = build_plan(parse_spec(d), tmp_path)
    assert p2.feature_sets[0].recipe.percentiles == (1.0, 99.0)
    assert p2.feature_sets[0].key.digest != plan.feature_sets[0].key.digest  # another extraction
    assert "the spec's dataset.intensity" in protocol_data(p2)["data and splits"]["intensity mapping"]


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"intensity": "window"}, "intensity 'window' needs dataset.window"),
        ({"window": "lung", "intensity": "percentiles"}, "dataset.window is set but dataset.intensity"),
        ({"intensity": "percentiles", "percentiles": [99, 1]}, "percentiles must be"),
    ],
)
def test_incoherent_settings_are_refused_when_the_spec_is_read(tmp_path, dataset, message):
    d = tiny_spec_dict(tmp_path)
    d["dataset"].update(dataset)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError, match=message):
        load_spec(tmp_path / "s.yaml")


def test_the_file_range_on_volumes_is_refused_by_the_plan(tmp_path):
    d = yaml.safe_load(open("sweeps/demo/mri.yaml"))
    d["dataset"]["intensity"] = "range"
    d["storage"] = {"path": str(tmp_path / "store")}
    with pytest.raises(NotRunnableError, match="'range'.*is for 2D images"):
        build_plan(parse_spec(d), tmp_path)


def test_images_that_barely_use_their_declared_range_are_said_before_the_sweep(tmp_path):
    """12-bit-like data in 16-bit PNGs (values up to 1000 of 65535) under 'range': the pre-flight check names the
    share used and the setting to change; 8-bit images spanning their range pass."""
    import pandas as pd

    from dinoscale.data import prepare_dataset
    from dinoscale.data.checks import range_barely_used
    from dinoscale.spec import DatasetSpec

    rng = np.random.default_rng(0)
    for name, dtype, top in (("deep", np.uint16, 1000), ("full", np.uint8, 255)):
        root = tmp_path / name
        (root / "img").mkdir(parents=True)
        rows = []
        for i in range(12):
            _png(root / "img" / f"{i}.png", rng.integers(0, top, (16, 16)).astype(dtype))
            rows.append({"path": f"img/{i}.png", "patient_id": f"P{i}", "a": i % 2})
        pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
        ds = prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["a"]), tmp_path / name)
        flat = range_barely_used(ds)
        if name == "deep":
            assert flat is not None and flat[0] < 0.02 and flat[1].endswith(".png")
        else:
            assert flat is None
