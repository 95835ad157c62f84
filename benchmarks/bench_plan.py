"""The plan's budget against what ran: predicted / measured wall time per stage (extraction, trials).

Each spec is run for real through the front door (`dinoscale sweep` for a demo spec, `dinoscale rehearse` for
a paper spec: its replica, scaled down, on this machine), into a throw-away store and MLflow database. The
runner logs the plan's prediction of each stage on the parent run (``sweep/budget.py:predicted_metrics``)
beside what it measured (``extraction_wall_seconds``, ``trials_wall_seconds``); this script reads both back.
By default it first runs ``dinoscale calibrate`` so the prediction uses this machine's figures under its
current load (the development machines are shared: the load average is reported with each row).

    .venv/bin/python benchmarks/bench_plan.py                       # the demo + three rehearsals
    .venv/bin/python benchmarks/bench_plan.py --demo sweeps/demo/xray.yaml --rehearse ''
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DINOSCALE = str(Path(sys.executable).with_name("dinoscale"))
STAGES = {
    "extraction": ("predicted_extraction_wall_seconds", "extraction_wall_seconds"),
    "trials": ("predicted_trials_wall_seconds", "trials_wall_seconds"),
}


def _run(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as f:
        subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=log.parent)
    return time.perf_counter() - t0


def _parent_metrics(uri: str) -> list[tuple[str, dict]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], "metrics.predicted_extraction_wall_seconds >= 0")
        if runs:
            out.append((exp.name.removeprefix("dinoscale-"), runs[0].data.metrics))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", nargs="*", default=["sweeps/demo/xray.yaml"])
    ap.add_argument("--rehearse", nargs="*", default=["sweeps/medmnist-2d.yaml", "sweeps/medmnist-3d.yaml"])
    ap.add_argument("--no-calibrate", action="store_true", help="predict with the shipped table")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    uri = f"sqlite:///{work / 'm.db'}"
    env = {**os.environ, "DINOSCALE_STORAGE": str(work / "store"), "RAY_AUTH_MODE": "disabled"}
    log = work / "log.txt"
    if not args.no_calibrate:
        cal = work / "cal.json"
        _run([DINOSCALE, "calibrate", "--seconds", "0.3", "--out", str(cal)], env, log)
        env["DINOSCALE_CALIBRATION"] = str(cal)
    loads = {}
    for spec in args.demo:
        load0 = os.getloadavg()[0]
        _run([DINOSCALE, "sweep", str(ROOT / spec), "--tracking-uri", uri, "--no-analysis"], env, log)
        loads[spec] = (load0, os.getloadavg()[0])
    for spec in args.rehearse:
        load0 = os.getloadavg()[0]
        _run([DINOSCALE, "rehearse", str(ROOT / spec), "--tracking-uri", uri, "--no-analysis"], env, log)
        loads[spec] = (load0, os.getloadavg()[0])
    rows = []
    for name, m in _parent_metrics(uri):
        for stage, (pred, meas) in STAGES.items():
            if pred in m and meas in m:
                rows.append(
                    {
                        "sweep": name,
                        "stage": stage,
                        "predicted_s": m[pred],
                        "measured_s": m[meas],
                        "ratio": m[pred] / max(m[meas], 1e-9),
                    }  # fmt: skip
                )
    print(f"{'sweep':<28} {'stage':<11} {'predicted':>10} {'measured':>10} {'pred/meas':>9}")
    for r in rows:
        print(
            f"{r['sweep']:<28} {r['stage']:<11} {r['predicted_s']:>9.0f}s {r['measured_s']:>9.0f}s {r['ratio']:>9.2f}"
        )
    calibration = json.loads(Path(env["DINOSCALE_CALIBRATION"]).read_text()) if "DINOSCALE_CALIBRATION" in env else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rows": rows, "load_average": loads, "cpus": os.cpu_count(), "calibration": calibration}, indent=1)
    )
    print(f"load average (start, end) per run: {loads}; written {args.out}; logs: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
