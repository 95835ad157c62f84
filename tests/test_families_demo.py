"""The two-family CPU demo (sweeps/demo/compare-xray.yaml): phantom chest X-rays, the DINOv3 and DINOv2 demo
ladders with random weights, swept through the CLI; the report has one size curve per family and resolution,
and the families are compared per resolution by paired differences on the same test patients."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dinoscale.analysis.compare import compare_families, family_verdict, summarize_families
from dinoscale.analysis.resample import bootstrap_cells
from dinoscale.analysis.sources import results_from_mlflow, tidy_results
from dinoscale.spec import load_spec

SPEC = "sweeps/demo/compare-xray.yaml"


@pytest.mark.slow
def test_two_family_demo_has_per_family_curves_and_a_paired_comparison(tmp_path):
    text = Path(SPEC).read_text()
    assert "RANDOM WEIGHTS" in text and yaml.safe_load(text)["profile"] == "demo"
    uri = f"sqlite:///{tmp_path}/m.db"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "dinoscale.cli", "sweep", os.path.abspath(SPEC), "--tracking-uri", uri),
            # the demo as shipped, on fewer and smaller phantom images (CI's time: the comparison is the point)
            *("--set", "dataset.phantom.n_patients=40", "--set", "dataset.phantom.image_size=112"),
            *("--set", "dataset.phantom.images_per_patient=[1,2]"),
            *("--set", "probes.0.epochs=20", "--set", "metrics.bootstrap.resamples=300"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DINOSCALE_STORAGE": str(tmp_path / "store")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = tmp_path / "reports" / "compare-xray-demo"

    fits = pd.read_csv(report / "fits.csv")
    size = fits[fits.axis == "params"]
    assert sorted(size["at"]) == [
        "resolution=112 (dinov2-demo)",
        "resolution=112 (dinov3-demo)",
        "resolution=224 (dinov2-demo)",
        "resolution=224 (dinov3-demo)",
    ]
    assert (size.n_points == 3).all()  # each family's own ladder, never pooled
    html = (report / "report.html").read_text()
    assert "resolution=112 (dinov3-demo)" in html and "resolution=112 (dinov2-demo)" in html
    assert (report / "auroc_vs_params.png").stat().st_size > 0
    md = (report / "report.md").read_text()
    assert "RANDOM" in md  # labelled as random weights
    # the comparison the report makes: its own section, each resolution's paired difference, the file beside it
    assert "## Encoder families" in md and md.count("paired over patients") >= 2
    assert "<h2>Encoder families</h2>" in html
    assert (report / "families.csv").is_file() and "families.csv" in md

    spec = load_spec(SPEC)
    df, info = results_from_mlflow(uri, spec.experiment_name, None, with_predictions=True, spec_name=spec.name)
    runs = tidy_results(df, info["headline"]).drop(columns=["_line"], errors="ignore")
    cd = bootstrap_cells(runs, info["predictions"], resamples=1000, headline=info["headline"])
    cmp = compare_families(cd)
    assert list(cmp.resolution) == [112, 224]
    assert (cmp.family == "dinov3-demo").all() and (cmp.other_family == "dinov2-demo").all()
    assert (cmp.paired == "paired over patients").all()
    assert np.isfinite(cmp[["delta_low", "delta_high"]].to_numpy()).all()
    assert ((cmp.delta_low <= cmp.delta) & (cmp.delta <= cmp.delta_high)).all()
    lines = summarize_families(cmp, info["headline"])
    assert sum(" − " in x and "[" in x and "paired over patients" in x for x in lines) == 2
    assert "DINOv3's best vs the best other family" in family_verdict(cd)[1]
