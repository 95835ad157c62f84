"""The analysis knows encoder families: size curves hold the family fixed, and families are compared per
resolution by paired bootstrap differences on the same test patients."""

import numpy as np
import pandas as pd

from dinoscale.analysis import bootstrap_cells
from dinoscale.analysis.compare import (
    compare_families,
    compare_families_at_compute,
    family_verdict,
    summarize_families,
)
from dinoscale.analysis.curves import build_curves
from dinoscale.metrics import macro_auroc, patient_bootstrap
from dinoscale.models.families import family_of

LADDERS = {  # backbone -> (params, signal): DINOv3's ladder a little stronger at every size
    "dinov3-demo-xs": (4e5, 0.8),
    "dinov3-demo-s": (1.1e6, 1.0),
    "dinov3-demo-m": (2.8e6, 1.2),
    "dinov2-demo-xs": (5e5, 0.5),
    "dinov2-demo-s": (1.3e6, 0.6),
    "dinov2-demo-m": (3.0e6, 0.7),
}


def _runs(resolutions=(112, 224)):
    """Every run predicts the same 150 test patients (2 images each) with the same noise: paired cells."""
    rng = np.random.default_rng(0)
    pid = np.repeat([f"p{i}" for i in range(150)], 2)
    base = pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(pid))], "patient_id": pid})
    labels = {c: rng.integers(0, 2, len(pid)) for c in ("a", "b")}
    noise = {c: rng.normal(0, 1, len(pid)) for c in ("a", "b")}
    runs, preds = [], {}
    for res in resolutions:
        for name, (n, signal) in LADDERS.items():
            p = base.copy()
            for c in ("a", "b"):
                p[f"label_{c}"] = labels[c]
                p[f"score_{c}"] = labels[c] * signal * (res / 224) ** 0.2 + noise[c]
            y, s = p[["label_a", "label_b"]].to_numpy(), p[["score_a", "score_b"]].to_numpy()
            ci = patient_bootstrap(y, s, p["patient_id"].to_numpy(), resamples=200)
            rid = f"{name}@{res}"
            preds[rid] = p
            runs.append(
                dict(
                    run_id=rid,
                    modality="xray",
                    dataset="toy",
                    backbone=name,
                    n_params=int(n),
                    resolution=res,
                    probe="linear",
                    strategy="frozen",
                    seed=0,
                    test_macro_auroc=macro_auroc(y, s),
                    test_macro_auroc_ci_low=ci.low,
                    test_macro_auroc_ci_high=ci.high,
                )
            )
    return pd.DataFrame(runs), preds


def test_no_size_curve_mixes_families():
    runs, preds = _runs()
    curves, _ = build_curves(bootstrap_cells(runs, preds, resamples=300))
    size = [c for c in curves if c.axis == "params"]
    assert len(size) == 4  # 2 families x 2 resolutions
    for c in size:
        backbones = [label.split("@")[0] for point in c.point_labels for label in point.split(" + ")]
        assert len({family_of(b) for b in backbones}) == 1, c.point_labels
        assert len(c.x) == 3
    assert sorted(c.at for c in size) == [
        "resolution=112 (dinov2-demo)",
        "resolution=112 (dinov3-demo)",
        "resolution=224 (dinov2-demo)",
        "resolution=224 (dinov3-demo)",
    ]
    # the resolution curve is per backbone (within its family); the compute axis pools every family
    assert all(c.at.startswith("backbone=") for c in curves if c.axis == "resolution")
    assert [c.at for c in curves if c.axis == "gflops"] == []  # no GFLOPs or tokens logged: no compute axis


def test_families_compared_per_resolution_by_paired_differences():
    runs, preds = _runs()
    cd = bootstrap_cells(runs, preds, resamples=400)
    cmp = compare_families(cd)
    assert list(cmp.resolution) == [112, 224]
    for _, r in cmp.iterrows():
        assert (r.family, r.backbone, r.other_family, r.other_backbone) == (
            "dinov3-demo",
            "dinov3-demo-m",
            "dinov2-demo",
            "dinov2-demo-m",
        )
        assert r.paired == "paired over patients"
        assert 0 < r.delta_low < r.delta < r.delta_high  # a consistent gain on the same patients
        assert r.verdict == "dinov3-demo-m better than dinov2-demo-m"
    lines = summarize_families(cmp)
    assert any("dinov3-demo-m − dinov2-demo-m: +0." in x and "[+0." in x for x in lines)
    verdict = family_verdict(cd)
    assert verdict[0] == "xray toy: the best cell is dinov3-demo-m (family dinov3-demo)"
    assert "DINOv3's best vs the best other family: dinov3-demo-m@224 − dinov2-demo-m@224: +0." in verdict[1]
    assert verdict[1].endswith("better than dinov2-demo-m@224")


def test_unpaired_cells_say_so():
    runs, _ = _runs(resolutions=(224,))
    cmp = compare_families(bootstrap_cells(runs, None, resamples=300))
    assert (cmp.paired == "unpaired (independent draws)").all()


def test_families_compared_at_matched_compute():
    runs, preds = _runs()
    runs["tokens_per_image"] = [
        1 + (r // 14) ** 2 if b.startswith("dinov2") else 5 + (r // 16) ** 2
        for b, r in zip(runs.backbone, runs.resolution)
    ]
    cd = bootstrap_cells(runs, preds, resamples=300)
    cmp = compare_families_at_compute(cd)
    assert len(cmp) > 0 and (cmp.paired == "paired over patients").all()
    ratio = np.maximum(cmp.gflops, cmp.other_gflops) / np.minimum(cmp.gflops, cmp.other_gflops)
    assert (ratio <= 1.5).all()
    # dinov3-demo-m@112 (2.8M params x 54 tokens) meets the nearest cost of the other family, dinov2-demo-xs@224
    # (0.5M x 257: 1.2x less), not dinov2-demo-m@112 (3.0M x 65: 1.3x more)
    row = cmp.set_index("backbone").loc["dinov3-demo-m@112"]
    assert row.other_backbone == "dinov2-demo-xs@224" and row.delta_low > 0
    assert (cmp.family == "dinov3-demo").all()
