"""The one terminal console every stage prints through (a leaf: sweep and analysis both use it), and what
is kept off it.

Quiet by default: the libraries a sweep drives (Ray, Ray Tune, MLflow, MONAI, alembic...) log banners,
hints and warnings of their own (Ray's token-auth notice, Tune's "visualize with TensorBoard", MLflow's
system-metrics INFO lines, MONAI's FutureWarnings). ``capture_third_party`` routes them to a log file
under the sweep's storage, named in the summary; ``verbose=True`` (``--verbose``) keeps them on screen
as well. dinoscale's own output goes through ``console`` and is never filtered.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

# Logs and CI are not terminals: give tables room instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)

# Loggers of the libraries a sweep drives; Ray's own logger does not propagate to the root.
THIRD_PARTY_LOGGERS = ("ray", "mlflow", "monai", "alembic", "urllib3", "filelock", "py.warnings", "torch", "timm")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Capture:
    """The state of the routing: the log file (once known), the records held until then."""

    path: Path | None = None
    handler: logging.Handler | None = None
    verbose = False
    held: list[logging.LogRecord] = []


class _Hold(logging.Handler):
    """Keeps records until the log file is known (the storage path is read from the spec)."""

    def emit(self, record: logging.LogRecord) -> None:
        if len(_Capture.held) < 10_000:
            _Capture.held.append(record)


def capture_third_party(log_path: Path | str | None = None, verbose: bool = False) -> Path | None:
    """Route third-party logging and Python warnings to ``log_path`` (held in memory until a path is given;
    call again with the path once it is known, and after ``ray.init``, which installs Ray's own handlers).
    ``verbose``: keep them on the terminal too. Returns the log file, if any. Idempotent."""
    _Capture.verbose = _Capture.verbose or verbose
    if log_path is not None and (_Capture.path is None or Path(log_path) != _Capture.path):
        path = Path(log_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:  # an unwritable storage is reported by the pre-flight, not from here
            handler = _Hold()
        else:
            handler.setFormatter(logging.Formatter(_FORMAT))
            for record in _Capture.held:
                handler.handle(record)
            _Capture.held.clear()
            _Capture.path = path
        if _Capture.handler is not None:
            _Capture.handler.close()
        _Capture.handler = handler
    elif _Capture.handler is None:
        _Capture.handler = _Hold()
    logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger
    for name in THIRD_PARTY_LOGGERS:
        log = logging.getLogger(name)
        for h in list(log.handlers):
            if h is not _Capture.handler and not getattr(h, "dinoscale_echo", False):
                log.removeHandler(h)
        if _Capture.handler not in log.handlers:
            log.addHandler(_Capture.handler)
        if _Capture.verbose and not any(getattr(h, "dinoscale_echo", False) for h in log.handlers):
            echo = logging.StreamHandler(sys.stderr)
            echo.dinoscale_echo = True
            echo.setFormatter(logging.Formatter(_FORMAT))
            log.addHandler(echo)
        log.propagate = False
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    return _Capture.path


def log_file() -> Path | None:
    """The file third-party output went to in this process (None before ``capture_third_party`` had a path)."""
    return _Capture.path


def print_markdown(text: str) -> None:
    """Markdown (the answer, the verdicts) rendered on a terminal; plain text, without markup, in a pipe."""
    if console.is_terminal:
        console.print(Markdown(text))
    else:
        console.print(markdown_to_text(text), markup=False, highlight=False)


def markdown_to_text(text: str) -> str:
    """The plain reading of the little markdown the reports use: headings, emphasis, code, links."""
    out = []
    for line in text.splitlines():
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            title = _inline(heading.group(2))
            out += [title, ("=" if len(heading.group(1)) <= 2 else "-") * len(title)]
            continue
        out.append(_inline(line))
    return "\n".join(out)


def _inline(line: str) -> str:
    line = re.sub(r"\*\*(.+?)\*\*|__(.+?)__", lambda m: m.group(1) or m.group(2), line)
    line = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", line)
    line = re.sub(r"`([^`]*)`", r"\1", line)
    line = re.sub(r"!?\[([^\]]*)\]\(([^)]*)\)", r"\1 (\2)", line)
    return line
