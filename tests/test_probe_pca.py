"""The width-fair linear probe (``pca: k``): k whitened principal components fitted on train, the same for
every encoder, computed block by block when a split is streamed."""

import numpy as np
import torch

from dinoscale.features.rows import Batches
from dinoscale.metrics import macro_auroc
from dinoscale.probes import Split, run_probe
from dinoscale.probes.linear import LinearProbeSpec, _rules, principal_axes


def _latent_splits(n=600, d=512, k=4, seed=0):
    """Labels from k latent factors spread over every one of d columns, plus independent noise per column."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    y = (z[:, :2] > 0).astype(np.float32)
    x = (z @ rng.normal(size=(k, d)) + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    parts = np.split(np.arange(n), [n // 2, 3 * n // 4])
    return [Split(x[p], y[p]) for p in parts]


def test_principal_axes_match_the_svd_and_the_streamed_split():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    x = (x - x.mean(0)).astype(np.float32)
    axes, scale = principal_axes(torch.as_tensor(x), 3)
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.abs(axes.T @ vt[:3].T), np.eye(3), atol=1e-4)  # same axes, up to sign
    np.testing.assert_allclose(scale, s[:3] / np.sqrt(299), rtol=1e-4)
    streamed, _ = principal_axes(Batches(x), 3)
    np.testing.assert_allclose(np.abs(streamed.T @ axes), np.eye(3), atol=1e-4)
    assert principal_axes(torch.as_tensor(x), 50)[0].shape == (12, 12)  # k above the width: the width


def test_a_probe_on_k_components_finds_the_signal_and_says_so():
    train, val, test = _latent_splits()
    spec = LinearProbeSpec(kind="linear", epochs=60, batch_size=64, pca=8)
    res = run_probe(spec, train, val, test)
    assert macro_auroc(test.y, res.test_scores) > 0.95
    full = run_probe(LinearProbeSpec(kind="linear", epochs=60, batch_size=64), train, val, test)
    assert abs(macro_auroc(test.y, res.test_scores) - macro_auroc(test.y, full.test_scores)) < 0.05
    assert "first 8 principal components fitted on train" in _rules(spec, "")["features"]
    assert "principal" not in _rules(LinearProbeSpec(kind="linear"), "")["features"]
