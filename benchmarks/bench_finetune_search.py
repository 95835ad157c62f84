"""The fine-tuning search with early stopping (ASHA within each cell) against the same search without it,
in one run: configuration-epochs trained, wall time, and the selected configuration's val metric with its
patient-level interval.

Both sides are real sweeps through the package (plan, Ray Tune trials, MLflow, selection), on one embedded
Ray, with the same spec apart from ``finetuning.early_stopping.enabled``: the same cells, the same
configurations (the plan samples them from the same seed), the same data. Sides alternate (A B B A ...) so
that load from other work on the machine falls on both.

    .venv/bin/python benchmarks/bench_finetune_search.py [--repeats 1]   # -> benchmarks/results/finetune_search.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _spec(tmp: Path, name: str, early_stopping: bool) -> dict:
    from conftest import tiny_spec_dict

    raw = tiny_spec_dict(
        tmp,
        name=name,
        strategies=["lora", "full"],
        resolutions=[96],
        backbones=[{"name": "dinov3-demo-s", "weights": "random"}],
        probes=[{"kind": "linear"}],
        search={"n_trials": 8, "seed": 0},
        resources={"cpus_per_trial": 1},
    )
    raw["dataset"] = copy.deepcopy(raw["dataset"])
    raw["dataset"]["phantom"].update({"n_patients": 100, "images_per_patient": [2, 4], "image_size": 128})
    raw["metrics"] = {"bootstrap": {"resamples": 1000, "level": 0.95, "seed": 0}}
    raw["finetuning"] = {
        "lora": {"epochs": 6, "batch_size": 32, "patience": None},
        "full": {"epochs": 6, "batch_size": 32, "patience": None},
        "early_stopping": {"enabled": early_stopping, "grace_epochs": 1, "reduction_factor": 3},
    }
    return raw


def _side(tmp: Path, early_stopping: bool, run: int) -> dict:
    from mlflow.tracking import MlflowClient

    from dinoscale import record
    from dinoscale.spec import parse_spec
    from dinoscale.sweep.runner import run_sweep

    name = f"ft-{'asha' if early_stopping else 'fifo'}-{run}"
    spec = parse_spec(_spec(tmp, name, early_stopping))
    t0 = time.perf_counter()
    out = run_sweep(spec, project_dir=tmp, quiet=True, analyze=False)
    wall = time.perf_counter() - t0
    client = MlflowClient(out.tracking_uri)
    trials_wall = client.get_run(out.parent_run_id).data.metrics["trials_wall_seconds"]
    cells = []
    for r in out.rows:
        run_ = client.get_run(r["mlflow_run_id"])
        m, t = run_.data.metrics, run_.data.tags
        cells.append(
            {
                "cell": r["cell"],
                "strategy": r["strategy"],
                "state": r["state"],
                "selected_configuration": int(t[record.SELECTED_CONFIGURATION]),
                "val_macro_auroc": m["val_macro_auroc"],
                "val_ci": [m["val_macro_auroc_ci_low"], m["val_macro_auroc_ci_high"]],
                "test_macro_auroc": m["test_macro_auroc"],
                "test_ci": [m["test_macro_auroc_ci_low"], m["test_macro_auroc_ci_high"]],
                "configuration_epochs": int(m[record.CONFIGURATION_EPOCHS]),
                "configuration_epochs_budget": int(m[record.CONFIGURATION_EPOCHS_BUDGET]),
                "configurations_stopped": int(m[record.CONFIGURATIONS_STOPPED]),
            }
        )
    return {
        "side": "asha" if early_stopping else "no early stopping",
        "run": run,
        "sweep_wall_s": wall,
        "trial_stage_wall_s": trials_wall,
        "configuration_epochs": sum(c["configuration_epochs"] for c in cells),
        "cells": cells,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs, alternating A B / B A")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune_search.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    import torch

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for rep in range(args.repeats):
            order = (True, False) if rep % 2 == 0 else (False, True)
            for es in order:
                runs.append(_side(tmp, es, rep))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "cells"}), flush=True)
    ray.shutdown()

    def best(side: str, key: str) -> float:
        return min(r[key] for r in runs if r["side"] == side)

    summary = {
        "configuration_epochs": {
            s: [r["configuration_epochs"] for r in runs if r["side"] == s] for s in ("asha", "no early stopping")
        },
        "best_sweep_wall_s": {s: best(s, "sweep_wall_s") for s in ("asha", "no early stopping")},
        "best_trial_stage_wall_s": {s: best(s, "trial_stage_wall_s") for s in ("asha", "no early stopping")},
    }
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        },
        "runs": runs,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
