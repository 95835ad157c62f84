"""The front door where people type it: the README's first command and a lean rehearsal, run to completion
under a real pseudo-terminal (``pty``), where the live cell table and the extraction bar are drawn.

A pipe and a terminal take different paths (rich's ``Live`` is opened only on a terminal): before issue 23,
`make sweep MODALITY=xray` exited 0 in a pipe and crashed in a terminal, because Tune pickled the live table
with its callbacks. These tests run the same commands a user types, in a scratch project folder that links
the repository's Makefile, specs and installed ``.venv`` (what ``make test`` installed), so the record, the
store and the reports land in the scratch folder.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ARTIFACTS
from dinoscale import record

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")
NOISE = (
    "Token authentication is enabled",  # Ray's auth notice
    "Started a local Ray instance",
    "TensorBoard",  # Tune's hint (the record is MLflow)
    "Configuration for experiment",  # Tune's configuration box
    "View detailed results here",
    "INFO mlflow",  # MLflow's system-metrics and database lines
    "FutureWarning",
    "Traceback",
    "a bug in dinoscale",
)


def run_in_pty(argv: list[str], cwd: Path, timeout: float, columns: int = 120, rows: int = 40) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr (a terminal of ``columns`` x
    ``rows``); return its exit status and everything it drew, escape sequences removed."""
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader whose controlling terminal is the pty
        try:
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal (it exited)
                    break
                if not data:
                    break
                chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{' '.join(argv)} did not finish in {timeout:.0f}s under a pty:\n" + _text(chunks)[-3000:])
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), _text(chunks)


def _text(chunks: list[bytes]) -> str:
    return ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def _scratch_project(tmp_path: Path) -> Path:
    """A project folder as a user has it after `make install`: the Makefile, specs and the installed venv."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "dinoscale").exists():
        pytest.skip(f"needs the project's installed venv ({venv}, made by `make install` / `make test`)")
    for name in ("Makefile", "pyproject.toml", "constraints", "sweeps", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id], max_results=1000)
    return runs


def _assert_quiet(screen: str) -> None:
    shown = [n for n in NOISE if n in screen]
    assert shown == [], f"third-party noise on the terminal: {shown}\n{screen[-4000:]}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_sweep_xray_in_a_terminal(tmp_path):
    """The README's first command, typed in a terminal: exit 0, the live table and the extraction bar drawn,
    the summary and the answer on the screen, the libraries' noise in the log file instead."""
    project = _scratch_project(tmp_path)
    code, screen = run_in_pty(["make", "sweep", "MODALITY=xray"], project, timeout=1500)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "make_sweep_xray_pty.txt").write_text(screen)  # what the user saw, for a person to read
    assert code == 0, screen[-6000:]
    assert "DEMO" in screen and "Sweep finished in" in screen and "32/32 cells ok" in screen, screen[-4000:]
    assert "extraction" in screen and "images/s" in screen  # the bar, fed by the extraction tasks
    assert "32/32 cells done" in screen  # the live cell table's last frame
    assert "Answer" in screen and "## Answer" not in screen and "**" not in screen  # markdown rendered
    _assert_quiet(screen)
    log = re.search(r"Library logs and warnings \(Ray, Tune, MLflow, MONAI\): (\S+\.log)", screen.replace("\n", ""))
    assert log, screen[-3000:]
    kept = Path(log.group(1)).read_text()
    assert "Started a local Ray instance" in kept and "INFO mlflow" in kept  # kept off the screen, not lost
    runs = _runs(f"sqlite:///{project}/mlruns.db")
    cells = [r for r in runs if r.data.tags.get(record.ROLE) == record.ROLE_CELL]
    assert len(cells) == 32 and all(r.info.status == "FINISHED" for r in cells)


@pytest.mark.slow
def test_lean_rehearsal_in_a_terminal(tmp_path):
    """`dinoscale rehearse sweeps/xray.yaml --lean` in a terminal (the same Tune path as `make rehearse`)."""
    project = _scratch_project(tmp_path)
    dinoscale = str(project / ".venv" / "bin" / "dinoscale")
    code, screen = run_in_pty([dinoscale, "rehearse", str(ROOT / "sweeps/xray.yaml"), "--lean"], project, timeout=900)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "rehearse_xray_lean_pty.txt").write_text(screen)
    assert code == 0, screen[-6000:]
    assert "REHEARSAL" in screen and "Sweep finished in" in screen, screen[-4000:]
    _assert_quiet(screen)
    runs = _runs(f"sqlite:///{project}/mlruns.db")
    parents = [r for r in runs if r.data.tags.get(record.ROLE) == record.ROLE_SWEEP]
    cells = [r for r in runs if r.data.tags.get(record.ROLE) == record.ROLE_CELL]
    assert len(parents) == 1 and parents[0].data.tags[record.REHEARSAL] == "true"
    assert cells and all(r.info.status == "FINISHED" for r in cells)
    assert all(r.data.tags[record.REHEARSAL_SOURCE_SPEC] == str(ROOT / "sweeps/xray.yaml") for r in parents + cells)
    assert parents[0].data.params[record.REHEARSAL_PREFIX + "backbones"].startswith("dinov3-vit")
    (report,) = project.glob("reports/*-rehearsal/report.md")
    assert "REHEARSAL, NOT A RESULT" in report.read_text() and "REHEARSAL REPLICA of" in report.read_text()


def test_pty_runner_sees_a_terminal(tmp_path):
    """The harness itself: the child's stdout is a terminal of the size set (rich draws for it)."""
    code, screen = run_in_pty(
        [sys.executable, "-c", "import os, sys; print(sys.stdout.isatty(), os.get_terminal_size().columns)"],
        tmp_path,
        timeout=60,
        columns=97,
    )
    assert code == 0 and "True 97" in screen
