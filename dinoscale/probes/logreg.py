"""Logistic-regression probe: one L2-regularised binary model per label (scikit-learn, lbfgs) for
multi-label tasks, one multinomial (softmax) model for multiclass tasks; a sweep over C warm-started from
the strongest regularisation; the C with the best val macro AUROC is reported on test. The problem is
convex and the solver deterministic: there is no initialisation to seed, so a replicate changes the
result only through its train / val split."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
from pydantic import Field

from dinoscale.metrics import selection_metric
from dinoscale.probes.linear import _standardise
from dinoscale.probes.registry import ProbeDef, ProbeResult, ProbeSpecBase, Split, grid_edges, register_probe
from dinoscale.tasks import CLASSIFICATION, selection_words

# Decades from 1e-5 to 10, a subset of DINOv3's logistic-regression sweep (C = 10^linspace(-6, 5, 45)): on
# standardised 384-1024-d features with 3,000 train rows and NIH-like prevalences the C tuned on val is 1e-3 to
# 3e-3, the bottom of the former [1e-3 .. 10]. The sweep is warm-started from the smallest C, whose fits are the
# cheapest, so the low end costs little.
DEFAULT_CS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]


class LogRegProbeSpec(ProbeSpecBase):
    """L2-regularised logistic regression (scikit-learn, one binary model per label), C chosen on val."""

    kind: Literal["logreg"] = "logreg"
    cs: list[float] = Field(
        default_factory=lambda: list(DEFAULT_CS),
        min_length=1,
        description="inverse regularisation strengths compared on val (C multiplies the summed loss)",
    )
    max_iter: int = Field(1000, ge=10)


def logreg_scores(
    train: Split, queries: list[np.ndarray], cs: list[float], max_iter: int = 1000
) -> dict[float, list[np.ndarray]]:
    """For each C: the (n, C_labels) positive-class probabilities of each query array."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xtr, *qs = _standardise(train.x.astype(np.float32), *(q.astype(np.float32) for q in queries))
    out = {c: [np.full((len(q), train.y.shape[1]), 0.5) for q in qs] for c in cs}
    if getattr(train, "exclusive", False):  # multiclass: one multinomial model, class probabilities
        return _multinomial(xtr, np.asarray(train.y), qs, cs, max_iter, out)
    for j in range(train.y.shape[1]):
        yj = train.y[:, j].astype(int)
        if yj.min() == yj.max():  # one class only in train: constant score
            continue
        model = LogisticRegression(C=cs[0], max_iter=max_iter, warm_start=True)
        for c in sorted(cs):
            model.set_params(C=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(xtr, yj)
            for i, q in enumerate(qs):
                out[c][i][:, j] = model.predict_proba(q)[:, 1]
    return out


def _multinomial(xtr, y, qs, cs, max_iter, out):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    labels = y.argmax(1)
    present = np.unique(labels)
    if len(present) < 2:
        return out
    model = LogisticRegression(C=cs[0], max_iter=max_iter, warm_start=True)
    for c in sorted(cs):
        model.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xtr, labels)
        for i, q in enumerate(qs):
            p = np.zeros((len(q), y.shape[1]))
            p[:, model.classes_] = model.predict_proba(q)
            out[c][i] = p
    return out


def fit_logreg(spec, train: Split, val: Split, test: Split, seed: int = 0) -> ProbeResult:
    scores = logreg_scores(train, [val.x, test.x], list(spec.cs), spec.max_iter)
    metric = selection_metric(val.select)
    val_metric = {c: metric(val.y, s[0]) for c, s in scores.items()}
    # ties broken towards stronger regularisation (smaller C)
    best = max(val_metric, key=lambda c: (np.nan_to_num(val_metric[c], nan=-1), -c))
    return ProbeResult(
        test_scores=scores[best][1],
        val_metric=float(val_metric[best]),
        val_scores=scores[best][0],
        selected={"C": best},
        candidates=len(val_metric),
        edges=grid_edges({"C": list(spec.cs)}, {"C": best}),
    )


def _rules(spec, task: str) -> dict:
    from dinoscale.tasks import get_task

    exclusive = get_task(task).exclusive if task else False
    return {
        "model": "one multinomial (softmax) model" if exclusive else "one binary model per label",
        "solver": f"scikit-learn lbfgs, L2, max_iter {spec.max_iter}, warm-started from the smallest C",
        "features": "standardised with the train split's mean and std",
        "regularisation": f"L2, C in {list(spec.cs)} (C multiplies the summed loss: wd = 1 / (C n_train)); "
        "source: decades of DINOv3's logistic-regression sweep 10^-6 .. 10^5",
        "selection": f"C on val {selection_words(task)} (ties: smaller C); a choice on an edge of the grid is tagged",
        "init": "none (convex, deterministic): replicates differ by their train / val split only",
    }


def _space(trial, spec) -> dict:
    return {"cs": [trial.suggest_float("C", 1e-4, 1e2, log=True)]}


register_probe(
    ProbeDef(
        "logreg",
        LogRegProbeSpec,
        fit_logreg,
        tasks=CLASSIFICATION,
        input="vector",
        space=_space,
        description="logistic regression per label (multinomial for multiclass; scikit-learn), C chosen on val",
        rules=_rules,
    )
)
