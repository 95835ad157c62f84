"""What the driver shows while a sweep runs, and what it keeps off the screen (issue 23): the live cell table
never crosses into Ray, the extraction bar speaks in the dataset's unit, third-party noise goes to a log file,
and markdown is rendered for a terminal and flattened for a pipe."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from ray import cloudpickle
from rich.console import Console

from dinoscale import console as console_module
from dinoscale.sweep import display


@pytest.fixture
def terminal(monkeypatch):
    """The display's console as a terminal (rich opens its Live only there), writing to a buffer."""
    buf = io.StringIO()
    fake = Console(file=buf, force_terminal=True, width=100)
    monkeypatch.setattr(display, "console", fake)
    return buf


def test_the_tune_callbacks_pickle_while_the_live_table_is_open(terminal):
    """Tune pickles its callbacks into the experiment state: with the live table open (a terminal), they
    must still pickle, and an event from an unpickled copy reaches the table the driver has open."""
    from dinoscale.sweep.runner import _ProgressCallback, _TrialTimer

    class Trial:
        config = {"unit": "cell-a"}
        last_result = {"test_macro_auroc": 0.75, "test_macro_auroc_ci_low": 0.7, "test_macro_auroc_ci_high": 0.8}

    with display.SweepProgress(["cell-a", "cell-b"]) as table:
        assert table.live is not None  # a terminal: the rich Live (with its lock) is open
        copy = cloudpickle.loads(cloudpickle.dumps([_TrialTimer(), _ProgressCallback()]))[1]
        copy.on_trial_start(0, [], Trial())
        assert table.cells["cell-a"]["state"] == "RUNNING"
        copy.on_trial_complete(0, [], Trial())
    assert table.cells["cell-a"]["state"] == "FINISHED" and "0.750 [0.700, 0.800]" in table.cells["cell-a"]["auroc"]
    assert table.done == 1
    display.progress_event("cell-a", "FAILED")  # no table open any more: nothing happens, nothing fails


def test_extraction_progress_in_a_log_says_count_rate_and_eta(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=buf, force_terminal=False, width=200))
    now = [0.0]
    bar = display.ExtractionProgress("slices", every=30)
    bar._time = lambda: now[0]
    bar._t0 = bar._last_line = 0.0
    with bar:
        now[0] = 10.0
        bar(0, 1000)  # within the interval: silent
        now[0] = 31.0
        bar(0, 1000)  # workers still starting
        now[0] = 100.0
        bar(500, 1000)
        now[0] = 110.0
        bar(550, 1000)  # within 30 s of the last line: silent
    lines = buf.getvalue().rstrip().splitlines()
    assert lines == [
        "  extraction: 0/1,000 slices (0%), the workers are starting",
        "  extraction: 500/1,000 slices (50%), 5.0 slices/s, ETA 1m40s",
    ]


def test_extraction_progress_on_a_terminal_draws_a_bar(terminal):
    with display.ExtractionProgress("images") as bar:
        bar(40, 100)
        bar(100, 100)
    out = terminal.getvalue()
    assert "extraction" in out and "100/100" in out and "images/s" in out


def test_the_unit_follows_the_dataset(tmp_path):
    from conftest import tiny_spec_dict
    from dinoscale.spec import parse_spec
    from dinoscale.sweep.plan import build_plan

    plan = build_plan(parse_spec(tiny_spec_dict(tmp_path, resolutions=[32])), tmp_path)
    assert display.extraction_unit(plan) == "images"


def test_third_party_output_goes_to_the_log_file(tmp_path, capsys, monkeypatch):
    for name, value in (("path", None), ("handler", None), ("held", [])):  # a fresh process: nothing routed yet
        monkeypatch.setattr(console_module._Capture, name, value)
    path = tmp_path / "logs" / "sweep.log"
    logging.getLogger("ray.tune").info("held before the file is known")
    logging.captureWarnings(False)  # pytest records each test's warnings: route them anew, as a fresh process does
    console_module.capture_third_party(None)
    logging.getLogger("mlflow.system_metrics").info("Started monitoring system metrics.")
    assert console_module.capture_third_party(path) == path
    logging.getLogger("ray.tune.tune").info("To visualize your results with TensorBoard, run: ...")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("monai: a FutureWarning", FutureWarning, stacklevel=1)
    for h in logging.getLogger("ray").handlers:
        h.flush()
    err = capsys.readouterr()
    assert "TensorBoard" not in err.err + err.out and "monitoring" not in err.err + err.out
    text = path.read_text()
    assert "Started monitoring system metrics." in text and "TensorBoard" in text and "FutureWarning" in text
    assert console_module.log_file() == path


def test_markdown_is_flattened_for_a_pipe():
    md = "## Answer\n\n- **best**: `demo-s@96`, see [report](report.html)\n### Verdicts\n*no* trend"
    assert console_module.markdown_to_text(md) == (
        "Answer\n======\n\n- best: demo-s@96, see report (report.html)\nVerdicts\n--------\nno trend"
    )
