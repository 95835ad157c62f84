"""Ray Tune overhead per trial on the embedded local cluster.

per trial:  trial wall time seen by the driver (Tune's on_trial_start -> on_trial_complete)
            - the trial's own work (measured inside the trainable: MLflow record check, feature load,
              probe fit, bootstrap, MLflow logging)
amortised:  (trial-stage wall x concurrent slots - sum of own work) / trials, which also charges
            what happens outside a trial's start/complete window (actor start-up, scheduling,
            Tune's bookkeeping, the driver's fit() set-up and teardown)

Runs the demo spec (sweeps/demo/xray.yaml: 24 cells) in a temporary project folder. Features are
extracted once first (not timed), then the trial stage is timed. Target: median overhead <= 1 s.

    .venv/bin/python benchmarks/bench_ray_overhead.py [--spec sweeps/demo/xray.yaml] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "sweeps/demo/xray.yaml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()

    from dinoscale.spec import parse_spec
    from dinoscale.sweep.runner import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        raw = yaml.safe_load(Path(args.spec).read_text())
        raw["tracking"] = {"uri": f"sqlite:///{tmp}/mlruns.db"}
        raw["storage"] = {"path": f"{tmp}/store"}
        spec = parse_spec(raw)
        run_sweep(spec, project_dir=Path(tmp), quiet=True, analyze=False)  # warm-up: extraction, MLflow tables
        t0 = time.perf_counter()
        out = run_sweep(spec, project_dir=Path(tmp), quiet=True, analyze=False)
        wall = time.perf_counter() - t0
        import ray
        from mlflow.tracking import MlflowClient

        stage_wall = MlflowClient(out.tracking_uri).get_run(out.parent_run_id).data.metrics["trials_wall_seconds"]
        slots = int(ray.cluster_resources().get("CPU", 1) // spec.resources.cpus_per_trial)
    rows = [r for r in out.rows if r["trial_wall_s"] is not None and r["time_own_work_s"] is not None]
    overhead = [r["trial_wall_s"] - r["time_own_work_s"] for r in rows]
    own = [r["time_own_work_s"] for r in rows]
    result = {
        "benchmark": "ray_tune_overhead_per_trial",
        "spec": str(Path(args.spec).relative_to(ROOT)) if Path(args.spec).is_relative_to(ROOT) else args.spec,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
        "trials": len(rows),
        "overhead_median_s": statistics.median(overhead),
        "overhead_max_s": max(overhead),
        "own_work_median_s": statistics.median(own),
        "trial_stage_wall_s": stage_wall,
        "concurrent_slots": slots,
        "overhead_amortised_s": (stage_wall * slots - sum(own)) / len(rows),
        "second_sweep_wall_s": wall,
        "target_median_s": 1.0,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ray_overhead.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
