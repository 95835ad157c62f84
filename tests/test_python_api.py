"""The README's Python section, executed as written: run a sweep, load its results as a DataFrame, analyse
them again. The code blocks are read from README.md (between '## Python' and the next section) and run in
one namespace, in a project folder whose sweeps/demo/xray.yaml is a tiny spec (its own tracking store and
storage), so what a notebook user copies is what the tests run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import tiny_spec_dict

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Python\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Python' section"
    return re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)


def test_the_readme_shows_a_sweep_its_results_and_a_report():
    blocks = readme_python_blocks()
    assert len(blocks) == 3
    assert "run_sweep(load_spec(" in blocks[0]
    assert "dinoscale.results(" in blocks[1]
    assert "write_report(" in blocks[2]


def test_import_dinoscale_stays_light():
    """The entry points import on first use: `import dinoscale` (the CLI's first step) does not load torch."""
    import subprocess
    import sys

    code = "import sys, dinoscale; print('torch' in sys.modules, callable(dinoscale.write_report))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.slow
def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch, ray_local, capsys):
    raw = tiny_spec_dict(
        tmp_path,
        name="xray-demo",
        backbones=[{"name": "dinov3-demo-xs", "weights": "random"}],
        resolutions=[32, 48],
        probes=[{"kind": "linear", "epochs": 20, "batch_size": 64}],
    )
    (tmp_path / "sweeps" / "demo").mkdir(parents=True)
    (tmp_path / "sweeps" / "demo" / "xray.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    t0 = time.perf_counter()
    for block in readme_python_blocks():
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code, as a user runs it
    wall = time.perf_counter() - t0

    out, df, folder = namespace["out"], namespace["df"], namespace["folder"]
    assert [r["state"] for r in out.rows] == ["FINISHED"] * 2
    assert out.report_dir == tmp_path / "reports" / "xray-demo" and (out.report_dir / "report.html").is_file()
    assert isinstance(df, pd.DataFrame) and len(df) == 2  # one row per cell run of the sweep just run
    assert df.attrs["parent_run_id"] == out.parent_run_id
    assert sorted(df["resolution"]) == [32, 48] and df["test_macro_auroc"].between(0, 1).all()
    assert folder == Path("reports/xray-demo-linear") and (tmp_path / folder / "report.html").is_file()
    verdicts = (tmp_path / folder / "verdicts.md").read_text()
    assert "## Answer" in verdicts and "xray" in verdicts
    report = (tmp_path / folder / "report.md").read_text()
    assert "PHANTOM" in report and f"xray-demo / {out.state.sweep_id}" in report  # the sweep's provenance and name
    printed = capsys.readouterr().out
    assert out.parent_run_id in printed and "test_macro_auroc" in printed and "## Answer" in printed
    print(f"README Python section: {wall:.0f}s")
