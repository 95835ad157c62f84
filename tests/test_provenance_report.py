"""One provenance decider: a report on a results table is labelled DEMO by ``Provenance``, as a sweep is.

Phantom data seen through pretrained (hub) weights is a demo: the numbers are about generated images. The
table says so by its ``dataset`` column (a dataset dinoscale generates) or its ``data.source`` column.
"""

from __future__ import annotations

import pandas as pd
import pytest

from dinoscale import record
from dinoscale.analysis import write_report
from dinoscale.provenance import DEMO_HEADLINE, PHANTOM, REAL, Provenance


def _rows(dataset: str, weights: str, **extra) -> pd.DataFrame:
    rows = []
    for i, (name, n) in enumerate((("s", 1e6), ("m", 4e6), ("l", 1.6e7))):
        m = 0.7 + 0.05 * i
        rows.append(
            {
                "modality": "xray",
                "dataset": dataset,
                "weights": weights,
                "backbone": name,
                "n_params": int(n),
                "resolution": 64,
                "probe": "linear",
                "strategy": "frozen",
                "seed": 0,
                "test_macro_auroc": m,
                "test_macro_auroc_ci_low": m - 0.02,
                "test_macro_auroc_ci_high": m + 0.02,
                **extra,
            }
        )
    return pd.DataFrame(rows)


def _report(tmp_path, df: pd.DataFrame, lines=None) -> tuple[str, str]:
    out = write_report(df, tmp_path / "report", "a results table", lines, resamples=200)
    return (out / "report.md").read_text(), (out / "report.html").read_text()


@pytest.mark.parametrize(
    "df",
    [
        _rows("phantom-xray", "hub"),  # a dataset dinoscale generates, named by the registry
        _rows("my-phantoms", "hub", **{record.DATA_SOURCE: PHANTOM}),  # the table's own data.source column
    ],
    ids=["registry", "column"],
)
def test_phantom_data_with_hub_weights_is_labelled_demo(tmp_path, df):
    md, html = _report(tmp_path, df, ["results table: exported by hand"])
    assert DEMO_HEADLINE in md and "data: PHANTOM" in md
    assert 'class="provenance demo"' in html and DEMO_HEADLINE in html


def test_real_data_with_hub_weights_is_not_labelled(tmp_path):
    md, html = _report(tmp_path, _rows("nih-cxr14", "hub"))
    assert DEMO_HEADLINE not in md and 'class="provenance demo"' not in html
    assert "data: nih-cxr14 (as named in the results; origin not recorded)" in md


def test_random_weights_on_real_data_are_labelled_demo(tmp_path):
    md, _ = _report(tmp_path, _rows("nih-cxr14", "random"))
    assert DEMO_HEADLINE in md and "weights: RANDOM init" in md


def test_the_table_rule_is_provenances():
    """The report asks the same object the banner and the MLflow tags ask."""
    assert Provenance.from_table({"x": PHANTOM}, ["hub"]).demo
    assert Provenance.from_table({"x": "semi-synthetic", "y": REAL}, ["file"]).demo
    assert not Provenance.from_table({"x": REAL}, ["hub"]).demo
    assert not Provenance.from_table({"x": None}, ["hub"]).demo  # origin unknown: not claimed either way
    tags = Provenance.from_table({"x": PHANTOM}, ["hub"]).tags()
    assert tags[record.DEMO] == "true" and tags[record.DATA_SOURCE] == PHANTOM


def test_the_caption_label_says_what_is_not_real():
    """The words the sweep's summary puts after its caption come from the same decider (lead: runner.py:281-285)."""
    assert Provenance("paper", {record.DATA_SOURCE: PHANTOM}, ("hub",)).label == "DEMO (phantom data)"
    assert Provenance("paper", {record.DATA_SOURCE: REAL}, ("random",)).label == "DEMO (random weights)"
    assert Provenance("demo", {record.DATA_SOURCE: REAL}, ("hub",)).label == "DEMO (demo profile)"
    assert Provenance("paper", {record.DATA_SOURCE: REAL}, ("hub",)).label == ""
    assert Provenance("rehearsal", {}, ("random",)).label.startswith("REHEARSAL")
