"""Known-answer tests for the metric, the bootstrap and the probes."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import separable_splits as _separable
from dinoscale.metrics import auroc_per_class, macro_auroc, patient_bootstrap
from dinoscale.probes import run_probe
from dinoscale.probes.knn import KnnProbeSpec, knn_scores
from dinoscale.probes.linear import LinearProbeSpec


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (300, 3))
    s = np.round(rng.normal(size=(300, 3)) + y, 1)  # rounding creates ties
    ours = auroc_per_class(y, s)
    ref = [roc_auc_score(y[:, j], s[:, j]) for j in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert macro_auroc(y, s) == pytest.approx(np.mean(ref))


def test_undefined_class_is_skipped_not_zero():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.1], [0.2, 0.5], [0.8, 0.3]])
    assert np.isnan(auroc_per_class(y, s)[1])
    assert macro_auroc(y, s) == 1.0


def test_bootstrap_interval_covers_truth_at_about_nominal_rate():
    """Simulated cohorts with a known population AUROC; the 90% interval should cover it ~90% of the time."""
    rng = np.random.default_rng(1)
    shift = 1.0
    from scipy.stats import norm

    true_auc = norm.cdf(shift / np.sqrt(2))
    covered = 0
    reps = 60
    for r in range(reps):
        n_pat = 60
        pat = np.repeat(np.arange(n_pat), 2)
        y = np.repeat(rng.integers(0, 2, n_pat), 2)[:, None]  # label is a patient trait
        s = (y[:, 0] * shift + np.repeat(rng.normal(size=n_pat), 2) * 0.0 + rng.normal(size=len(y)))[:, None]
        ci = patient_bootstrap(y, s, pat, resamples=300, level=0.9, seed=r)
        covered += ci.low <= true_auc <= ci.high
    assert 0.75 <= covered / reps <= 0.99


def test_bootstrap_resamples_patients_not_images():
    """Ten copies of each patient's image: a patient-level interval stays wide, an image-level one would not."""
    rng = np.random.default_rng(0)
    n_pat = 30
    y = rng.integers(0, 2, n_pat)
    s = y + rng.normal(size=n_pat)
    pat = np.repeat(np.arange(n_pat), 10)
    ci_pat = patient_bootstrap(np.repeat(y, 10)[:, None], np.repeat(s, 10)[:, None], pat, resamples=400)
    ci_img = patient_bootstrap(np.repeat(y, 10)[:, None], np.repeat(s, 10)[:, None], np.arange(len(pat)), resamples=400)
    assert (ci_pat.high - ci_pat.low) > 2 * (ci_img.high - ci_img.low)


def test_linear_probe_on_separable_data_reaches_auroc_1():
    train, val, test = _separable()
    res = run_probe(LinearProbeSpec(kind="linear", epochs=100, batch_size=32), train, val, test)
    assert macro_auroc(test.y, res.test_scores) == 1.0
    assert res.candidates == 16 * 6 and set(res.selected) == {"lr", "weight_decay"}


def test_linear_heads_are_independent_and_selected_on_val():
    """A grid containing a useless lr (0) must never win, and adding it must not change the others."""
    train, val, test = _separable(seed=3)
    a = run_probe(
        LinearProbeSpec(kind="linear", learning_rates=[1e-2], weight_decays=[0.0], epochs=5), train, val, test
    )
    b = run_probe(
        LinearProbeSpec(kind="linear", learning_rates=[0.0, 1e-2], weight_decays=[0.0], epochs=5), train, val, test
    )
    assert b.selected["lr"] == 1e-2
    np.testing.assert_allclose(a.test_scores, b.test_scores, atol=1e-6)


def test_knn_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    tx, qx = rng.normal(size=(200, 8)), rng.normal(size=(30, 8))
    ty = rng.integers(0, 2, (200, 2)).astype(np.float32)
    ours = knn_scores(tx, ty, qx, [10, 20], temperature=0.07, chunk=7)
    tn = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    qn = qx / np.linalg.norm(qx, axis=1, keepdims=True)
    for k in (10, 20):
        ref = np.zeros((30, 2))
        for i in range(30):
            sim = tn @ qn[i]
            nn = np.argsort(-sim)[:k]
            w = np.exp(sim[nn] / 0.07)
            ref[i] = (w[:, None] * ty[nn]).sum(0) / w.sum()
        np.testing.assert_allclose(ours[k], ref, atol=1e-5)


def test_knn_probe_selects_k_on_val_and_clips_to_train_size():
    train, val, test = _separable(n=80)
    res = run_probe(KnnProbeSpec(kind="knn", ks=[5, 10, 500]), train, val, test)
    assert res.selected["k"] in (5, 10, 40)
    assert res.candidates == 3
    assert macro_auroc(test.y, res.test_scores) > 0.95
