"""`dinoscale ui` (and `make ui`): a direct link to each sweep's runs table, then the MLflow UI itself.

MLflow 3.17's UI opens an experiment on its GenAI "Overview" page (traces, token usage: all empty for a
sweep) unless the browser was switched to "Model training" before; these links name that workflow, so
they land on the runs table, where each sweep's parent run expands into its cells.

    dinoscale ui [--tracking-uri URI] [--port 5000] [--host 127.0.0.1]
    python -m dinoscale.mlflow_ui TRACKING_URI UI_URL        (the links only)

``browse_hint`` is the sweep's closing line: a command that opens this store's runs table for this install.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from dinoscale import settings
from dinoscale.tracking import resolve_tracking_uri, runs_table_url

DEFAULT_PORT = 5000
DEFAULT_HOST = "127.0.0.1"


def describe(tracking_uri: str, ui_url: str) -> list[str]:
    from dinoscale.tracking import sweep_links

    links = sweep_links(tracking_uri, ui_url)
    if not links:
        return [f"MLflow UI at {ui_url}: no sweep recorded in {tracking_uri} yet (make sweep MODALITY=xray)"]
    lines = [f"MLflow UI at {ui_url} - open a sweep's runs table (each parent run expands into its cells):"]
    for name, runs, latest in links:
        lines += [f"  {name}: {runs}", f"    latest sweep (report under Artifacts > report): {latest}"]
    return lines


def browse_hint(tracking_uri: str, experiment_id: str, project_dir: Path | None = None) -> str:
    """How to open a sweep's runs table: on a tracking server, its own link; on a local store,
    `dinoscale ui` (with --tracking-uri when the store is not the one it opens by default), then the link."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"Browse: {runs_table_url(tracking_uri, experiment_id)}"
    default = resolve_tracking_uri(settings.DEFAULT_TRACKING_URI, project_dir)
    command = "dinoscale ui" + ("" if tracking_uri == default else f" --tracking-uri {shlex.quote(tracking_uri)}")
    link = runs_table_url(f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", experiment_id)
    return f"Browse with `{command}`, then open {link}"


def serve(tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Print the runs-table links, then become `mlflow ui` on the store (one worker, no job runner: ~0.5 GB
    and ~6 s to start instead of ~15 processes and ~3 GB). Does not return."""
    ui_url = f"http://{host}:{port}"
    try:
        print("\n".join(describe(tracking_uri, ui_url)), flush=True)
    except Exception as e:  # noqa: BLE001 - the links are a courtesy: the UI starts anyway
        print(f"(no sweep links: {type(e).__name__}: {e})", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m dinoscale.mlflow_ui TRACKING_URI UI_URL", file=sys.stderr)
        return 2
    try:
        print("\n".join(describe(*args)), flush=True)
    except Exception as e:  # noqa: BLE001 - the links are a courtesy: the UI starts anyway
        print(f"(no sweep links: {type(e).__name__}: {e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
