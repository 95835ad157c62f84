"""Any results table in, never a traceback out: `dinoscale analyze --csv` on tables as people publish
them (no intervals, blank resolutions, percentages, mistyped cells, single rows, repeated cells,
metrics dinoscale does not know) gives a report, or one clear message with exit status 2.

The property test draws its tables with Hypothesis (derandomized: the same 100 tables on every run)."""

import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dinoscale.analysis.sources import NO_INTERVALS
from dinoscale.cli import app

SIZES = (("vit-s", 21.6e6), ("vit-b", 85.6e6), ("vit-l", 303e6))
RESOLUTIONS = (224, 512, 1024)
METRIC = "test_macro_auroc"


def _published(strategies=("frozen",), probes=("linear",), resolutions=RESOLUTIONS, seeds=(0,)) -> pd.DataFrame:
    """A paper-like table: AUROC rising with size and resolution, 95% intervals of +-0.01."""
    rows = []
    for strategy in strategies:
        for probe in probes:
            for res in resolutions:
                for seed in seeds:
                    for name, n in SIZES:
                        m = 0.70 + 0.04 * np.log10(n / 2e7) + 0.02 * np.log2(res / 224) + 0.003 * seed
                        m += 0.01 if strategy == "lora" else 0
                        rows.append(
                            {
                                "backbone": name,
                                "n_params": int(n),
                                "resolution": res,
                                "probe": probe,
                                "strategy": strategy,
                                "seed": seed,
                                METRIC: round(m, 4),
                                f"{METRIC}_ci_low": round(m - 0.01, 4),
                                f"{METRIC}_ci_high": round(m + 0.01, 4),
                            }
                        )
    return pd.DataFrame(rows)


def _analyze(csv: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["analyze", "--csv", str(csv), "--out", str(out), *extra])


def _verdict_bullets(verdicts_md: str) -> list[str]:
    section = verdicts_md.split("## Verdicts", 1)[1].split("## Strategies", 1)[0]
    return [line for line in section.splitlines() if line.startswith("- ")]


def test_a_table_without_intervals_gives_a_report_whose_verdicts_all_say_so(tmp_path):
    t = _published(strategies=("frozen", "lora")).drop(columns=[f"{METRIC}_ci_low", f"{METRIC}_ci_high"])
    t.to_csv(tmp_path / "paper.csv", index=False)
    res = _analyze(tmp_path / "paper.csv", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    verdicts = (tmp_path / "rep" / "verdicts.md").read_text()
    bullets = _verdict_bullets(verdicts)
    assert len(bullets) >= 4 and all(NO_INTERVALS in b for b in bullets), bullets
    assert "cheapest as good: cannot tell (no intervals: point estimates only)" in verdicts
    strategies = verdicts.split("## Strategies", 1)[1]
    assert NO_INTERVALS in strategies and "better in" not in strategies  # no reliability claimed
    assert "better at larger model size at every resolution (no intervals: point estimates only)" in verdicts
    fits = pd.read_csv(tmp_path / "rep" / "fits.csv")
    assert fits.alpha.isna().all()  # no exponent from points alone
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("<img ") >= 4 and "no intervals: point estimates only" in html


def test_blank_resolutions_are_left_out_of_that_axis_only_and_said(tmp_path):
    """The matplotlib crash of before ('Data cannot be log-scaled'): a paper states no resolution for a task."""
    t = _published()
    t["resolution"] = t["resolution"].astype(object)
    t.loc[t.resolution == 1024, "resolution"] = ""  # one resolution's rows: not stated
    t.to_csv(tmp_path / "paper.csv", index=False)
    res = _analyze(tmp_path / "paper.csv", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    verdicts = (tmp_path / "rep" / "verdicts.md").read_text()
    assert "resolution: not stated in 3 rows (lines 8, 9, 10); left out of the resolution axis only" in verdicts
    fits = pd.read_csv(tmp_path / "rep" / "fits.csv")
    resolution = fits[fits.axis == "resolution"]
    assert (resolution.n_points == 2).all()  # 224 and 512 only
    params = fits[fits.axis == "params"].set_index("at")
    assert params.loc["resolution=not stated", "n_points"] == 3  # the size axis still uses those rows


def test_percentages_zero_width_intervals_and_an_unknown_metric_with_only_a_direction(tmp_path):
    t = _published().rename(columns=lambda c: c.replace(METRIC, "test_f1"))
    for c in ("test_f1", "test_f1_ci_low", "test_f1_ci_high"):
        t[c] = (t[c] * 100).round(2)  # published as percentages
    t.loc[0, "test_f1_ci_high"] = t.loc[0, "test_f1_ci_low"] = t.loc[0, "test_f1"]  # a zero-width interval
    t.to_csv(tmp_path / "f1.csv", index=False)
    res = _analyze(tmp_path / "f1.csv", tmp_path / "x")
    assert res.exit_code == 2 and "say whether higher or lower is better (analyze --goal max|min)" in res.output
    res = _analyze(tmp_path / "f1.csv", tmp_path / "rep", "--goal", "max")
    assert res.exit_code == 0, res.output
    verdicts = (tmp_path / "rep" / "verdicts.md").read_text()
    assert "test_f1 read as percentages (values up to" in verdicts and "divided by 100" in verdicts
    assert "1 row with a zero-width interval, treated as unknown (line 2): point estimates only there" in verdicts
    cells = pd.read_csv(tmp_path / "rep" / "results.csv")
    assert cells.metric.max() < 1 and cells.low.isna().sum() == 1


# ---------------------------------------------------------------- the property: any table, a report or one message

COLUMNS = [
    "backbone",
    "n_params",
    "resolution",
    "probe",
    "strategy",
    "seed",
    METRIC,
    f"{METRIC}_ci_low",
    f"{METRIC}_ci_high",
]
JUNK = ["", " ", "n/a", "abc", "-1", "0", "224px", "21.6M", "1e400", "nan", "[wsi]", "1,024"]


@st.composite
def tables(draw):
    t = _published(
        strategies=draw(st.sampled_from([("frozen",), ("frozen", "lora")])),
        probes=draw(st.sampled_from([("linear",), ("linear", "knn")])),
        resolutions=draw(st.sampled_from([(224,), (224, 512), RESOLUTIONS])),
        seeds=draw(st.sampled_from([(0,), (0, 1)])),
    )
    keep = draw(st.lists(st.integers(0, len(t) - 1), min_size=1, max_size=min(len(t), 12), unique=True))
    t = t.iloc[sorted(keep)].reset_index(drop=True).astype(object)
    extra: list[str] = []
    for op in draw(st.lists(st.sampled_from(OPS), max_size=4)):
        t, extra = op(draw, t, extra)
    return t, extra


def _drop(draw, t, extra):
    return t.drop(columns=[draw(st.sampled_from(list(t.columns)))]), extra


def _blank(draw, t, extra):
    if t.empty:
        return t, extra
    col = draw(st.sampled_from(list(t.columns)))
    t[col] = t[col].astype(object)
    rows = draw(st.lists(st.integers(0, len(t) - 1), min_size=1, max_size=len(t), unique=True))
    t.loc[t.index[rows], col] = draw(st.sampled_from(["", None]))
    return t, extra


def _mistype(draw, t, extra):
    if t.empty:
        return t, extra
    col = draw(st.sampled_from(list(t.columns)))
    t[col] = t[col].astype(object)
    t.loc[t.index[draw(st.integers(0, len(t) - 1))], col] = draw(st.sampled_from(JUNK))
    return t, extra


def _duplicate(draw, t, extra):
    if t.empty:
        return t, extra
    return pd.concat([t, t.iloc[[draw(st.integers(0, len(t) - 1))]]], ignore_index=True), extra


def _single_row(draw, t, extra):
    if t.empty:
        return t, extra
    return t.iloc[[draw(st.integers(0, len(t) - 1))]].reset_index(drop=True), extra


def _no_rows(draw, t, extra):
    return t.iloc[0:0], extra


def _zero_width(draw, t, extra):
    if METRIC in t and f"{METRIC}_ci_low" in t and f"{METRIC}_ci_high" in t:
        t[f"{METRIC}_ci_low"] = t[f"{METRIC}_ci_high"] = t[METRIC]
    return t, extra


def _percent(draw, t, extra):
    for c in (METRIC, f"{METRIC}_ci_low", f"{METRIC}_ci_high"):
        if c in t:
            t[c] = pd.to_numeric(t[c], errors="coerce") * 100
    return t, extra


def _swap_interval(draw, t, extra):
    if f"{METRIC}_ci_low" in t and f"{METRIC}_ci_high" in t:
        t[[f"{METRIC}_ci_low", f"{METRIC}_ci_high"]] = t[[f"{METRIC}_ci_high", f"{METRIC}_ci_low"]].to_numpy()
    return t, extra


def _unknown_metric(draw, t, extra):
    t = t.rename(columns=lambda c: c.replace(METRIC, "test_score"))
    if draw(st.booleans()):
        extra = [*extra, "--goal", "max"]
    return t, extra


def _messy_names(draw, t, extra):
    return t.rename(columns=lambda c: f" {c.title()} " if c in ("resolution", "backbone", "seed") else c), extra


OPS = [
    _drop,
    _blank,
    _blank,
    _mistype,
    _mistype,
    _duplicate,
    _single_row,
    _no_rows,
    _zero_width,
    _percent,
    _swap_interval,
    _unknown_metric,
    _messy_names,
]
SEEN = {"report": 0, "error": 0, "no_intervals": 0}


@pytest.mark.slow
@settings(
    max_examples=60,  # 82 s at 100 on CI; 60 still sees every generator (the test below checks the outcomes)
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tables())
def test_any_table_gives_a_report_or_one_clear_error(case):
    table, extra = case
    with tempfile.TemporaryDirectory(prefix="dinoscale-table-") as tmp:
        csv, out = Path(tmp) / "table.csv", Path(tmp) / "report"
        table.to_csv(csv, index=False)
        res = _analyze(csv, out, *extra)
        assert "Traceback" not in res.output
        assert res.exit_code in (0, 2), f"exit {res.exit_code}: {res.exception!r}\n{csv.read_text()}"
        if res.exit_code == 2:
            SEEN["error"] += 1
            message = res.output.strip()
            assert message and "table.csv" in message and len(message.splitlines()) == 1, message
            return
        SEEN["report"] += 1
        for f in ("report.html", "report.md", "verdicts.md", "results.csv"):
            assert (out / f).stat().st_size > 0, f
        cells = pd.read_csv(out / "results.csv")
        if cells.low.isna().all():  # not one interval survived: every verdict must say so
            SEEN["no_intervals"] += 1
            bullets = _verdict_bullets((out / "verdicts.md").read_text())
            assert all(NO_INTERVALS in b or b == "- a single configuration: nothing to compare" for b in bullets)
        assert not re.search(r"\bnan\b", (out / "verdicts.md").read_text().lower())


@pytest.mark.slow
def test_the_generated_tables_covered_reports_and_errors():
    """Runs after the property test (file order): it must have seen both outcomes, or it tested little."""
    if sum(SEEN.values()) == 0:
        pytest.skip("the property test did not run in this session (-k or -m deselected it)")
    print(f"generated tables: {SEEN}")
    assert SEEN["report"] >= 30 and SEEN["error"] >= 3 and SEEN["no_intervals"] >= 3, SEEN
