"""The MLflow UI as a person sees it: a real sweep, the UI started the way `make ui` starts it, and the
link `make ui` prints opened in headless Chromium (Playwright driving Debian's chromium; no browser
download). The link lands on the runs table (not MLflow 3.17's GenAI overview), the sweep's parent run
expands into its cells, the mirrored numeric axes are metric columns that sort as numbers, and the
report attached to the parent run opens. Screenshots are kept under test-artifacts/.

Why Playwright over raw DevTools-protocol calls: the runs table is an AG Grid React app that renders
asynchronously; Playwright's auto-waiting locators keep the test about what is on the screen instead
of about sleeps and polling. It drives the system's chromium (``executable_path``), so nothing is
downloaded, and the flags are the project's hermetic ones (conftest.CHROMIUM_FLAGS).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import ARTIFACTS, CHROMIUM_FLAGS, ROOT, free_port, tiny_spec_dict, wait_until_serving
from dinoscale import record
from dinoscale.spec import parse_spec
from dinoscale.sweep.runner import run_sweep

pytestmark = pytest.mark.slow

RESOLUTIONS = [48, 128]  # as text "128" sorts before "48": a numeric sort is visible


@pytest.fixture(scope="module")
def sweep(chromium, tmp_path_factory, ray_local):
    """A real 4-cell sweep (2 backbones x 2 resolutions, linear probe) with its report attached (only
    where there is a browser to look at it: without one the tests skip, or fail in CI, before the sweep)."""
    tmp = tmp_path_factory.mktemp("ui")
    raw = tiny_spec_dict(tmp, resolutions=RESOLUTIONS)
    raw["probes"] = [p for p in raw["probes"] if p["kind"] == "linear"]
    out = run_sweep(parse_spec(raw), project_dir=tmp, quiet=True)
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 4
    return out


@pytest.fixture(scope="module")
def make_ui(sweep):
    """`make ui` on the sweep's store (the Makefile's own recipe; its install step is taken as done), its
    printed lines, and the server it started; stopped at the end by its process group."""
    port = free_port()
    venv = Path(sys.executable).parent.parent
    cmd = [
        "make",
        "-s",
        "-o",
        str(venv / ".installed"),  # the venv running these tests is the installed one
        "ui",
        f"VENV={venv}",
        f"TRACKING_URI={sweep.tracking_uri}",
        f"PORT={port}",
    ]
    log = Path(sweep.plan.storage).parent / "make-ui.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, log, "make ui", 120)
        yield url, log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def page(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh: the UI's own defaults, as a new user meets them
            executable_path=chromium,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1800, "height": 1000},
        )
        context.set_default_timeout(60_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 20_000
    return path


def _column_in_row_order(page, col_id: str) -> list[str]:
    """A column's cells in the order the grid shows them (AG Grid's DOM order is not its visual order)."""
    return page.evaluate(
        """(col) => [...document.querySelectorAll('.ag-center-cols-container [role=row]')]
            .map(r => [Number(r.getAttribute('row-index')), r.querySelector(`[col-id="${col}"]`)])
            .filter(([, cell]) => cell).sort((a, b) => a[0] - b[0]).map(([, cell]) => cell.innerText.trim())""",
        col_id,
    )


def test_make_ui_link_lands_on_the_runs_table_where_the_sweep_expands_sorts_and_shows_its_report(sweep, make_ui, page):
    url, printed = make_ui
    client = MlflowClient(sweep.tracking_uri)
    exp = client.get_experiment(sweep.experiment_id)
    runs_link = re.search(rf"{exp.name}: (http\S+)", printed)
    parent_link = re.search(r"latest sweep \(report under Artifacts > report\): (http\S+)", printed)
    assert runs_link and parent_link, printed
    assert runs_link[1] == f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    parent = client.get_run(sweep.parent_run_id)
    children = client.search_runs(
        [exp.experiment_id], f"tags.`{record.PARENT_RUN_ID}` = '{sweep.parent_run_id}'", max_results=100
    )
    assert len(children) == 4

    # 1. the printed link opens the runs table, in the UI's model-training view, not the GenAI overview
    page.goto(runs_link[1])
    page.get_by_text(parent.info.run_name).first.wait_for()
    assert "/runs" in page.url and page.get_by_role("button", name="Columns", exact=True).is_visible()
    assert page.get_by_text("Token Usage").count() == 0  # the GenAI overview is not what opened
    rows = page.locator(".ag-center-cols-container [role=row]")
    assert rows.count() == 1  # the sweep's parent run, its cells folded under it
    assistant = page.get_by_role("button", name="Close", exact=True)
    if assistant.count():  # MLflow's assistant side panel: closed, as a person would, to see the table
        assistant.first.click()

    # 2. the parent run lists its children
    page.locator("[role=row] [col-id='attributes.`Run Name`'] button").first.click()
    for child in children:
        page.get_by_text(child.info.run_name).first.wait_for()
    assert rows.count() == 1 + len(children)
    _shot(page, "mlflow_ui_parent_expanded.png")

    # 3. the mirrored numeric axes are metric columns that sort as numbers
    page.get_by_role("button", name="Columns", exact=True).click()
    for axis in ("resolution", "n_params"):
        page.get_by_placeholder("Search columns").fill(axis)
        page.get_by_text(axis, exact=True).first.click()  # Metrics come before Parameters in the menu
    page.keyboard.press("Escape")
    for axis in ("resolution", "n_params"):
        header = page.locator(f".ag-header-cell[col-id='metrics.`{axis}`']")
        header.click()
        page.wait_for_url(re.compile(rf"orderByKey=metrics\.%60{axis}%60"))
        time.sleep(1)  # the grid re-renders after the sorted runs arrive
        values = [v for v in _column_in_row_order(page, f"metrics.`{axis}`") if v not in ("", "-")]
        assert len(values) == len(children), values
        numbers = [float(v) for v in values]
        order = "orderByAsc=true" in page.url
        assert numbers == sorted(numbers, reverse=not order), (axis, values)
        assert values != sorted(values, reverse=not order), (axis, values)  # text order would differ
    _shot(page, "mlflow_ui_runs_sorted_by_axis.png")

    # 4. the report attached to the parent run opens from the printed link
    page.goto(parent_link[1])
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("report", exact=True).first.click()
    page.get_by_text("report.html", exact=True).first.click()
    report = page.frame_locator("iframe").first
    report.get_by_text("Scaling report:").first.wait_for()
    assert report.locator("#answer").get_by_text("cheapest as good").count() >= 1
    assert report.get_by_text("DEMO RUN").count() >= 1
    _shot(page, "mlflow_ui_report.png")
