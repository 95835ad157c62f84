"""`dinoscale cache ls | verify | rm` on a real store."""

import dataclasses

import numpy as np
from typer.testing import CliRunner

from dinoscale.cli import app
from dinoscale.features import FeatureKey, FeatureRecipe, FeatureStore

KEY = FeatureKey(
    FeatureRecipe("vit_small_patch16_dinov3", "random-seed0", 64, (0.5,) * 3, (0.25,) * 3, dtype="float16"), "abc"
)
OTHER = dataclasses.replace(KEY, recipe=KEY.recipe.with_(resolution=128))


def _store(tmp_path):
    store = FeatureStore(tmp_path / "features")
    store.put(
        KEY, np.ones((3, 4), np.float32), list("abc"), extra={"backbone_name": "dinov3-demo-xs", "split": "train"}
    )
    store.put(
        OTHER, np.ones((3, 4), np.float32), list("abc"), extra={"backbone_name": "dinov3-demo-xs", "split": "val"}
    )
    return store


def test_ls_verify_rm(tmp_path):
    store, run = _store(tmp_path), CliRunner()
    root = str(tmp_path / "features")
    out = run.invoke(app, ["cache", "ls", "--store", root])
    assert out.exit_code == 0 and KEY.digest in out.output and OTHER.digest in out.output and "2 entries" in out.output
    assert run.invoke(app, ["cache", "verify", "--store", root]).exit_code == 0

    data = next((tmp_path / "features" / KEY.digest[:2] / KEY.digest).glob("shard-*.npy"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = run.invoke(app, ["cache", "verify", "--store", root])
    assert out.exit_code == 1 and f"{KEY.digest}  BAD" in out.output and "1 ok, 1 damaged" in out.output

    out = run.invoke(app, ["cache", "rm", "--damaged", "--store", root])
    assert out.exit_code == 0 and not store.has(KEY) and store.has(OTHER)
    assert run.invoke(app, ["cache", "rm", KEY.digest, "--store", root]).exit_code == 1  # not there any more
    out = run.invoke(app, ["cache", "rm", "--all", "--yes", "--store", root])
    assert out.exit_code == 0 and store.entries() == []


def test_rm_stale_leftovers_and_object_store_url(tmp_path):
    store, run = _store(tmp_path), CliRunner()
    leftover = tmp_path / "features" / KEY.digest[:2] / ".tmp-killed-writer"
    leftover.mkdir()
    out = run.invoke(app, ["cache", "rm", "--stale", "0", "--store", str(tmp_path / "features")])
    assert out.exit_code == 0 and not leftover.exists() and store.has(KEY)

    mem = FeatureStore("memory://cli-test/features")
    mem.put(KEY, np.zeros((2, 2), np.float32), ["a", "b"])
    out = run.invoke(app, ["cache", "ls", "--store", "memory://cli-test/features"])
    assert out.exit_code == 0 and KEY.digest in out.output
    assert run.invoke(app, ["cache", "rm", KEY.digest, "--store", "memory://cli-test/features"]).exit_code == 0
    assert not mem.has(KEY)
