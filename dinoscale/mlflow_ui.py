"""What `make ui` prints before it starts the MLflow UI: a direct link to each sweep's runs table.

MLflow 3.17's UI opens an experiment on its GenAI "Overview" page (traces, token usage: all empty for a
sweep) unless the browser was switched to "Model training" before; these links name that workflow, so
they land on the runs table, where each sweep's parent run expands into its cells.

    python -m dinoscale.mlflow_ui TRACKING_URI UI_URL
"""

from __future__ import annotations

import sys


def describe(tracking_uri: str, ui_url: str) -> list[str]:
    from dinoscale.tracking import sweep_links

    links = sweep_links(tracking_uri, ui_url)
    if not links:
        return [f"MLflow UI at {ui_url}: no sweep recorded in {tracking_uri} yet (make sweep MODALITY=xray)"]
    lines = [f"MLflow UI at {ui_url} - open a sweep's runs table (each parent run expands into its cells):"]
    for name, runs, latest in links:
        lines += [f"  {name}: {runs}", f"    latest sweep (report under Artifacts > report): {latest}"]
    return lines


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
