"""Worker start-up: what a Ray worker imports before its first item, and the sweep with and without preloading it.

Two measurements, each side by side in one run (issue 31, item 3):

1. **imports** - a fresh interpreter imports each worker entry point (``dinoscale.sweep.extraction``: the
   extraction task; ``dinoscale.sweep.trial``: a Tune trial), ``--repeats`` times interleaved; the wall time
   and the libraries that take it (``python -X importtime``, cumulative, top level only).
2. **sweep** - a small demo sweep (``sweeps/demo/xray.yaml`` with its first backbone) in a fresh process and a
   fresh embedded Ray each time: as dinoscale starts it (``off``), and with Ray's experimental
   ``preload_python_modules`` importing both entry points in every worker as it starts (``on``), interleaved;
   the sweep's wall time and its extraction and trial stages. (Measured and rejected: see BENCHMARKS.md.)

Every run is in the JSON; the table reads the best (minimum) of each side, as the other benchmarks do.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ("dinoscale.sweep.extraction", "dinoscale.sweep.trial")

SWEEP = """
import json, sys, time
from pathlib import Path
import yaml
from dinoscale.spec import parse_spec
import ray
from dinoscale.sweep import runner
if sys.argv[2] == "on":
    _init = ray.init
    preload = {"preload_python_modules": ["dinoscale.sweep.extraction", "dinoscale.sweep.trial"]}
    ray.init = lambda *a, **k: _init(*a, **{**k, "_system_config": preload})
raw = yaml.safe_load(Path(sys.argv[1]).read_text())
t0 = time.perf_counter()
out = runner.run_sweep(parse_spec(raw), project_dir=Path(sys.argv[3]), quiet=True, analyze=False)
wall = time.perf_counter() - t0
from mlflow.tracking import MlflowClient
m = MlflowClient(out.tracking_uri).get_run(out.parent_run_id).data.metrics
print(json.dumps({"wall_s": wall, "extraction_s": m["extraction_wall_seconds"], "trials_s": m["trials_wall_seconds"],
                  "cells": len(out.rows), "finished": sum(r["state"] == "FINISHED" for r in out.rows)}))
"""


def import_run(module: str) -> dict:
    """One fresh interpreter importing ``module``: wall seconds and the top-level libraries by cumulative time."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    libs = {}  # each library's own import (the line naming the bare package), cumulative, wherever it nests
    for line in res.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].strip()
            if "." not in name and not name.startswith("_") and name != "dinoscale":
                libs[name] = max(libs.get(name, 0.0), int(parts[1]) / 1e6)
    top = dict(sorted(libs.items(), key=lambda kv: -kv[1])[:6])
    return {"wall_s": wall, "libraries_s": top}


def sweep_spec(tmp: Path) -> Path:
    raw = yaml.safe_load((ROOT / "sweeps/demo/xray.yaml").read_text())
    raw["name"] = "startup-bench"
    raw["backbones"] = [raw["backbones"][0]]
    raw["tracking"] = {"uri": f"sqlite:///{tmp}/mlruns.db"}
    raw["storage"] = {"path": str(tmp / "store")}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_run(mode: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run(
            [sys.executable, "-c", SWEEP, str(sweep_spec(tmp)), mode, str(tmp)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        if res.returncode != 0:
            raise SystemExit(f"sweep ({mode}) failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    imports = {m: [] for m in ENTRIES}
    sweeps = {"off": [], "on": []}
    for _ in range(args.repeats):
        for m in ENTRIES:
            imports[m].append(import_run(m))
        for mode in ("off", "on"):
            sweeps[mode].append(sweep_run(mode))
    best = {mode: min(runs, key=lambda r: r["wall_s"]) for mode, runs in sweeps.items()}
    result = {
        "benchmark": "worker_startup",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "imports": {m: {"best_wall_s": min(r["wall_s"] for r in runs), "runs": runs} for m, runs in imports.items()},
        "sweep": {
            "spec": "sweeps/demo/xray.yaml with its first backbone (4 cells)",
            "best": best,
            "ratio_preload_over_today": best["on"]["wall_s"] / best["off"]["wall_s"],
            "runs": sweeps,
        },
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "startup.json").write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "imports"}
            | {"imports_best": {m: v["best_wall_s"] for m, v in result["imports"].items()}},
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
