"""Time to report an unreachable MLflow tracking server: the pre-flight vs MLflow's own client.

baseline:   what a sweep did before the pre-flight: its first MLflow call (``get_experiment_by_name``,
            as ``ensure_experiment`` makes it) with MLflow's default HTTP policy (retries with backoff,
            a 120 s request timeout), until it raises
candidate:  ``dinoscale.sweep.preflight.check_tracking`` (a TCP connect within 5 s, then one MLflow request
            with a 5 s timeout and no retries), until it raises ``TrackingError``

Three servers, all on this machine so that the run needs no network:
  refused   nothing listens on the port (a server that is down)
  dropped   the host never completes the TCP handshake (an unroutable address, a firewall dropping
            packets): a listener whose accept queue is full, so the kernel drops the SYNs
  hung      the connection is accepted and nothing ever answers (a hung server or proxy)

The baseline runs only on ``refused`` by default (about 4 minutes here): on ``dropped`` and ``hung``
each of MLflow's attempts waits for its full request timeout, i.e. many minutes; ``--baseline-all`` runs
them too. MLflow's policy, as read from its own settings, is written with the results.

    .venv/bin/python benchmarks/bench_tracking.py [--out benchmarks/results] [--baseline-all]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def server(kind: str):
    """A tracking URI that is refused, dropped or hung, for as long as the block runs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    filler = None
    if kind == "refused":
        srv.close()  # the port is free again: connections are refused
    elif kind == "dropped":
        srv.listen(0)
        filler = socket.create_connection(("127.0.0.1", port), timeout=2)  # fills the accept queue
    else:
        srv.listen(8)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if filler is not None:
            filler.close()
        if kind != "refused":
            srv.close()


def time_until_error(fn) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is how long until it fails
        lines = [x for x in str(e).splitlines() if x.strip()]
        return time.perf_counter() - t0, f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
    return time.perf_counter() - t0, "no error"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--baseline-all", action="store_true", help="also time MLflow's client on dropped and hung")
    args = ap.parse_args()

    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )
    from mlflow.tracking import MlflowClient

    from dinoscale.sweep.preflight import check_tracking

    policy = {
        "max_retries": MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(),
        "backoff_factor": MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
        "request_timeout_s": MLFLOW_HTTP_REQUEST_TIMEOUT.get(),
    }
    rows = []
    for kind in ("refused", "dropped", "hung"):
        with server(kind) as uri:
            cand_s, cand_err = time_until_error(lambda u=uri: check_tracking(u, "dinoscale-bench"))
        row = {"server": kind, "preflight_s": round(cand_s, 2), "preflight_error": cand_err}
        if kind == "refused" or args.baseline_all:
            with server(kind) as uri:
                base_s, base_err = time_until_error(lambda u=uri: MlflowClient(u).get_experiment_by_name("x"))
            row.update(mlflow_client_s=round(base_s, 1), mlflow_client_error=base_err)
        rows.append(row)
        print(json.dumps(row))
    result = {
        "benchmark": "tracking_unreachable",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "mlflow_default_http_policy": policy,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking_unreachable.json").write_text(json.dumps(result, indent=1))
    print(f"\nMLflow's default HTTP policy: {policy}")
    print(f"{'server':10s} {'pre-flight':>12s} {'MLflow client':>15s}")
    for r in rows:
        base = f"{r['mlflow_client_s']:.1f} s" if "mlflow_client_s" in r else "-"
        print(f"{r['server']:10s} {r['preflight_s']:10.2f} s {base:>15s}")


if __name__ == "__main__":
    main()
