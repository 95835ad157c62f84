"""The feature recipe: one value says how a unit of data becomes features, its digest is the store key,
and it is all the extractor is told. Colour reaches the encoder as colour."""

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from dinoscale import record
from dinoscale.data import prepare_dataset
from dinoscale.data.readers import read_image
from dinoscale.data.volumes import VolumeGrid, VolumeInput, channel_map
from dinoscale.features import FeatureKey, FeatureRecipe
from dinoscale.features import extract as extract_mod
from dinoscale.features.extract import extract_features, recipe_for
from dinoscale.models import load_backbone
from dinoscale.spec import DatasetSpec, parse_spec
from dinoscale.sweep.extraction import ExtractionJob, ShardInputs

CPU = torch.device("cpu")
BASE = FeatureRecipe("vit_small_patch16_dinov3", "random-seed0", 64, (0.5,) * 3, (0.25,) * 3)
# one other value per field: each must give another recipe digest and another store key
CHANGED = {
    "backbone": "vit_base_patch16_dinov3",
    "weights_digest": "sha256:abc",
    "resolution": 128,
    "mean": (0.4, 0.5, 0.6),
    "std": (0.2, 0.2, 0.2),
    "color": "rgb",
    "intensity": ("window", (-160.0, 240.0)),  # a window comes with its intensity mapping
    "window": ("window", (-1000.0, 400.0)),
    "percentiles": (1.0, 99.0),
    "interpolation": "bilinear",
    "antialias": "gaussian",
    "volume": VolumeInput(channel_map(("FLAIR", "T1w", "t1gd", "T2w"))),
    "fusion": "pet",
    "view": "slices",
    "tokens": "cls",
    "pool": "max",
    "dtype": "float16",
    "extractor_version": "999",
}


def _changed(recipe: FeatureRecipe, name: str) -> FeatureRecipe:
    value = CHANGED[name]
    if name in ("intensity", "window"):
        return recipe.with_(intensity=value[0], window=value[1])
    if name == "pool":
        return recipe.with_(view="volumes", pool="max")
    if name == "percentiles":
        return recipe.with_(intensity="percentiles", percentiles=value)
    return recipe.with_(**{name: value})


def test_every_recipe_field_is_covered_here():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(FeatureRecipe)}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_recipe_field_changes_the_store_key(name):
    other = _changed(BASE, name)
    assert other.digest != BASE.digest
    assert FeatureKey(other, "rows").digest != FeatureKey(BASE, "rows").digest
    assert len({other, BASE}) == 2  # frozen and hashable
    if name == "window":  # a second window: another key than the first one too
        assert other.digest != _changed(BASE, "intensity").digest
    if name == "percentiles":  # other percentiles: another key than the first ones
        assert other.digest != BASE.with_(intensity="percentiles", percentiles=(0.5, 99.5)).digest
    grid = VolumeInput(channel_map(("image",)), VolumeGrid(spacing=(1.0, 1.0, 2.0), shape=(32, 32, 8)))
    if name == "volume":  # the common grid as much as the channel map
        assert BASE.with_(volume=grid).digest not in (BASE.digest, other.digest)


def test_the_same_recipe_is_the_same_key():
    again = FeatureRecipe("vit_small_patch16_dinov3", "random-seed0", 64, (0.5,) * 3, (0.25,) * 3)
    assert again.digest == BASE.digest and FeatureKey(again, "r").digest == FeatureKey(BASE, "r").digest
    assert FeatureKey(BASE, "r").digest != FeatureKey(BASE, "other rows").digest


def test_an_incoherent_recipe_is_refused():
    with pytest.raises(ValueError, match="colour model"):
        BASE.with_(color="cmyk")
    with pytest.raises(ValueError, match="window"):
        BASE.with_(intensity="window")
    with pytest.raises(ValueError, match="pooling"):
        BASE.with_(view="volumes")
    with pytest.raises(ValueError, match="percentiles"):
        BASE.with_(intensity="percentiles")
    with pytest.raises(ValueError, match="2D files"):
        BASE.with_(intensity="range", view="slices")


def test_extraction_receives_only_the_recipe_and_the_rows():
    """The extractor's signatures: backbone, recipe, rows (+ slice counts / PET for volumes), device, sink,
    and keyword-only knobs that decide speed, never values. The extraction job carries no loose setting."""
    speed = {"batch_size", "num_workers", "progress"}
    for fn, rows in (
        (extract_mod.extract_features, ["rows"]),
        (extract_mod.extract_volume_features, ["rows"]),
        (extract_mod.extract_volume_slices, ["rows", "n_slices", "pet_paths"]),
    ):
        params = inspect.signature(fn).parameters
        positional = [n for n, p in params.items() if p.kind != p.KEYWORD_ONLY]
        assert positional == ["backbone", "recipe", *rows, "device", "out"], fn.__name__
        assert {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY} == speed, fn.__name__
    job_fields = {f.name for f in dataclasses.fields(ExtractionJob)} | {f.name for f in dataclasses.fields(ShardInputs)}
    assert not job_fields & {"interpolation", "window", "volume_pool", "tokens", "view", "mean", "std", "color"}


# ---------------------------------------------------------------- colour


def _square(path, colour, size=32, side=12, at=(10, 10)):
    img = np.zeros((size, size, 3), np.uint8)
    img[at[0] : at[0] + side, at[1] : at[1] + side] = colour
    Image.fromarray(img, mode="RGB").save(path)
    return str(path)


@pytest.fixture(scope="module")
def xs():
    return load_backbone("dinov3-demo-xs", "random", seed=0)


def test_readers_return_the_files_channels(tmp_path):
    red = read_image(_square(tmp_path / "red.png", (180, 0, 0)))
    assert red.shape == (32, 32, 3) and red[15, 15].tolist() == [180, 0, 0]
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (8, 8, 4)  # alpha is the recipe's to drop
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").shape == (8, 8)


def test_hue_reaches_the_encoder_and_the_colour_model_is_a_new_extraction(xs, tmp_path):
    """Two images of equal mean intensity, different in hue: different features under RGB; under the grey
    model (colour averaged) the very same features. RGBA: alpha dropped."""
    red = _square(tmp_path / "red.png", (180, 0, 0))
    green = _square(tmp_path / "green.png", (0, 180, 0))
    assert read_image(red).mean() == read_image(green).mean()
    rgb = recipe_for(xs, 32, color="rgb")
    f, _ = extract_features(xs, rgb, [red, green], device=CPU, num_workers=0)
    assert np.abs(f[0] - f[1]).max() > 1e-2
    grey, _ = extract_features(xs, rgb.with_(color="grey"), [red, green], device=CPU, num_workers=0)
    np.testing.assert_array_equal(grey[0], grey[1])
    assert rgb.digest != rgb.with_(color="grey").digest
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[10:22, 10:22] = (180, 0, 0, 255)
    rgba[..., 3] = np.where(rgba[..., 3] > 0, 255, 90)  # a partly transparent background: dropped, not blended
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "red_alpha.png")
    with_alpha, _ = extract_features(xs, rgb, [str(tmp_path / "red_alpha.png")], device=CPU, num_workers=0)
    np.testing.assert_allclose(with_alpha[0], f[0], atol=1e-5)


def test_a_grey_image_under_rgb_is_the_grey_pipeline(xs, tmp_path):
    """Grey files under the RGB model are replicated exactly as the grey model does: grey data keep their numbers."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / f"g{i}.png")
        paths.append(str(tmp_path / f"g{i}.png"))
    a, _ = extract_features(xs, recipe_for(xs, 32), paths, device=CPU, num_workers=0)
    b, _ = extract_features(xs, recipe_for(xs, 32, color="rgb"), paths, device=CPU, num_workers=0)
    np.testing.assert_array_equal(a, b)


def test_recipe_fields_are_extractions_of_their_own(xs, tmp_path):
    """Interpolation, intensity mapping and resolution each give other features (so other keys matter)."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8)).save(tmp_path / "x.png")
    rows = [str(tmp_path / "x.png")]
    base = recipe_for(xs, 32)
    ref, _ = extract_features(xs, base, rows, device=CPU, num_workers=0)
    for other in (base.with_(interpolation="bilinear"), base.with_(intensity="window", window=(0.0, 100.0))):
        got, _ = extract_features(xs, other, rows, device=CPU, num_workers=0)
        assert np.abs(got - ref).max() > 1e-4, other


def test_datasets_declare_their_colour_and_the_spec_can_override(tmp_path):
    from dinoscale.data import dataset_color

    assert dataset_color(DatasetSpec(name="wsi-tiles", root="x")) == "rgb"
    assert dataset_color(DatasetSpec(name="phantom-wsi")) == "rgb"
    assert dataset_color(DatasetSpec(name="phantom-xray")) == "grey"
    assert dataset_color(DatasetSpec(name="manifest", root="x")) == "grey"
    assert dataset_color(DatasetSpec(name="manifest", root="x", color="rgb")) == "rgb"
    assert dataset_color(DatasetSpec(name="medmnist", root="x", subset="pathmnist_64")) == "rgb"
    assert dataset_color(DatasetSpec(name="medmnist", root="x", subset="chestmnist")) == "grey"
    assert dataset_color(DatasetSpec(name="wsi-tiles", root="x", color="grey")) == "grey"


def test_medmnist_colour_sets_are_rgb_images_not_volumes(tmp_path):
    from dinoscale.data.replicas import get_replica

    spec = DatasetSpec(name="medmnist", root=str(tmp_path / "mm"), subset="dermamnist_28")
    (tmp_path / "mm").mkdir()
    get_replica("medmnist").write(tmp_path / "mm", spec)
    ds = prepare_dataset(spec, tmp_path)
    assert ds.color == "rgb" and not ds.volumetric
    img = read_image(ds.sources("train").items[0])
    assert img.shape == (28, 28, 3) and np.abs(img[..., 0] - img[..., 1]).max() > 0  # colour, not grey x 3


# ---------------------------------------------------------------- end to end: red vs green through the CLI


def _red_green_manifest(root, n=60, size=32):
    """Squares of one hue on black, equal mean intensity in both classes; position and size vary."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        red = i % 2 == 0
        side = int(rng.integers(8, 16))
        at = tuple(int(v) for v in rng.integers(0, size - side, 2))
        colour = (150, 0, 0) if red else (0, 150, 0)
        _square(root / "img" / f"{i}.png", colour, size, side, at)
        rows.append({"path": f"img/{i}.png", "patient_id": f"P{i}", "red": int(red)})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_a_grey_pipeline_meeting_colour_files_is_said_before_the_sweep(tmp_path):
    from dinoscale.data.checks import colour_files_under_grey

    root = _red_green_manifest(tmp_path / "rg", n=12)
    grey = prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["red"]), tmp_path)
    assert grey.color == "grey" and colour_files_under_grey(grey)
    rgb = prepare_dataset(DatasetSpec(name="manifest", root=str(root), classes=["red"], color="rgb"), tmp_path)
    assert rgb.color == "rgb" and colour_files_under_grey(rgb) == []


@pytest.mark.slow
def test_a_sweep_sees_colour_red_against_green(tmp_path):
    root = _red_green_manifest(tmp_path / "rg")
    spec = {
        "name": "red-green",
        "modality": "wsi",
        "profile": "demo",
        "dataset": {
            "name": "manifest",
            "root": str(root),
            "classes": ["red"],
            "color": "rgb",
            "split": {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0},
        },
        "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
        "resolutions": [32],
        "probes": [{"kind": "linear", "epochs": 40, "batch_size": 16}],
        "strategies": ["frozen"],
        "seeds": [0],
        "features": {"dtype": "float32"},
        "metrics": {"bootstrap": {"resamples": 100, "level": 0.95, "seed": 0}},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db"},
        "storage": {"path": str(tmp_path / "store")},
        "ray": {"num_cpus": 2},
    }
    experiment = parse_spec(spec).experiment_name  # valid before it runs
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [sys.executable, "-m", "dinoscale.cli", "sweep", str(tmp_path / "spec.yaml"), "--no-analysis"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # a client of its own: mlflow.set_tracking_uri would set MLFLOW_TRACKING_URI for every later test
    client = MlflowClient(spec["tracking"]["uri"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    cells = [r for r in runs if r.data.tags.get(record.ROLE) == "cell"]
    assert len(cells) == 1
    cell = cells[0]
    assert cell.data.metrics["test_macro_auroc"] >= 0.95, cell.data.metrics
    parent = next(r for r in runs if r.data.tags.get(record.ROLE) == "sweep")
    recipes = json.loads(
        Path(client.download_artifacts(parent.info.run_id, record.FEATURE_RECIPES, str(tmp_path))).read_text()
    )
    digest = cell.data.tags[record.RECIPE_DIGEST]
    assert recipes[digest]["color"] == "rgb" and recipes[digest]["resolution"] == 32
