"""3D volumes: real NIfTI files through MONAI, slice by slice, pooled per volume, streamed."""

import weakref

import nibabel as nib
import numpy as np
import pytest
import torch

from dinoscale.features.extract import extract_features, extract_volume_features, recipe_for
from dinoscale.models import load_backbone

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def xs():
    return load_backbone("dinov3-demo-xs", "random", seed=0)


def _volumes(tmp_path, n=3, hu=False):
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        a = rng.normal(size=(40, 36, 5 + i)).astype(np.float32)
        if hu:
            a = a * 800 - 200
        p = tmp_path / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(p))
        paths.append(str(p))
    return paths


def VOL(backbone, pool, **fields):
    """The recipe of pooled volume features at 32 px."""
    return recipe_for(backbone, 32, view="volumes", pool=pool, antialias="gaussian", **fields)


class Slices(torch.utils.data.Dataset):
    """The reference: every slice of one volume, preprocessed exactly as the streamed path does."""

    def __init__(self, path, backbone, res, window=None):
        from dinoscale.data.preprocess import build_volume_transform

        load, self.tf = build_volume_transform(
            recipe_for(backbone, res, window=window, view="slices", antialias="gaussian")
        )
        self.vol = load(path)

    def __len__(self):
        return self.vol.shape[-1]

    def __getitem__(self, k):
        return self.tf(self.vol[..., k])


def test_volume_features_pool_their_slices(xs, tmp_path):
    paths = _volumes(tmp_path)
    feats, stats = extract_volume_features(xs, VOL(xs, "mean_max"), paths, batch_size=4, device=CPU)
    assert feats.shape == (3, 2 * 192) and stats.images == 3 and stats.slices == 5 + 6 + 7
    for v, p in enumerate(paths):
        per_slice, _ = extract_features(xs, recipe_for(xs, 32), Slices(p, xs, 32), batch_size=8, device=CPU)
        np.testing.assert_allclose(feats[v, :192], per_slice.mean(0), atol=1e-4)
        np.testing.assert_allclose(feats[v, 192:], per_slice.max(0), atol=1e-4)
    mean, _ = extract_volume_features(xs, VOL(xs, "mean"), paths, batch_size=4, device=CPU)
    np.testing.assert_allclose(mean, feats[:, :192], atol=1e-5)


def test_workers_split_volumes_and_results_do_not_change(xs, tmp_path):
    paths = _volumes(tmp_path, n=4)
    a, _ = extract_volume_features(xs, VOL(xs, "max"), paths, batch_size=3, device=CPU, num_workers=0)
    b, _ = extract_volume_features(xs, VOL(xs, "max"), paths, batch_size=3, device=CPU, num_workers=2)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_memory_is_one_volume_at_a_time(xs, tmp_path, monkeypatch):
    import dinoscale.data.preprocess as pre

    live, peak, real = [0], [0], pre.build_volume_transform

    def counting(*args, **kw):
        load, tf = real(*args, **kw)

        def load_counted(path):
            vol = load(path)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(vol, lambda: live.__setitem__(0, live[0] - 1))
            return vol

        return load_counted, tf

    monkeypatch.setattr(pre, "build_volume_transform", counting)
    paths = _volumes(tmp_path, n=6)
    extract_volume_features(xs, VOL(xs, "mean"), paths, batch_size=4, device=CPU, num_workers=0)
    assert peak[0] <= 2  # the volume being sliced (+ at most the previous one awaiting collection), never all 6


def test_ct_window_clips_hounsfield_units(xs, tmp_path):
    from dinoscale.data.preprocess import build_volume_transform

    p = _volumes(tmp_path, n=1, hu=True)[0]
    load, _ = build_volume_transform(recipe_for(xs, 32, window=(-1000, 400)))
    vol = load(p)
    raw = nib.load(p).get_fdata()
    assert float(vol.min()) == 0.0 and float(vol.max()) == 1.0
    np.testing.assert_allclose(vol.numpy(), np.clip((raw + 1000) / 1400, 0, 1), atol=1e-5)
    feats, _ = extract_volume_features(xs, VOL(xs, "mean", window=(-1000, 400)), [p], device=CPU)
    assert feats.shape == (1, 192) and np.isfinite(feats).all()


def test_a_broken_volume_names_its_file(xs, tmp_path):
    from dinoscale.data import DataError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="broken.nii.gz"):
        extract_volume_features(xs, VOL(xs, "mean"), [str(bad)], device=CPU)
