"""Paper scale on one node and on many (issue 14): memory that does not grow with the split, sharded
extraction over a simulated cluster, and the plan's predicted bytes against the store.

    python benchmarks/bench_scale.py rss      # peak RSS of extraction and of a segmentation trial at 1x, 4x, 16x volumes
    python benchmarks/bench_scale.py shards   # one feature set's shards on a 3-node vs a 1-node Ray cluster
    python benchmarks/bench_scale.py bytes    # predicted vs measured bytes of the demo datasets' feature sets
    python benchmarks/bench_scale.py bytes --spec sweeps/mri.yaml   # any spec whose data is present (rehearsals)

Each comparison is measured in one run, side by side with its baseline:
- ``rss``: dinoscale's streaming paths (extraction into shards, trials reading views of the store) against
  the previous in-memory paths, which the same code still takes when told to (an extraction into an
  in-memory array, as ``store.put`` needed; a trial whose ``features.resident_mb`` holds the whole split).
  Every configuration runs in a fresh process (spawn), so its peak resident set (``VmHWM``) is its own.
- ``shards``: the same extraction stage (``run_extraction_stage``) on ``ray.cluster_utils.Cluster``s of 1 and
  3 worker nodes of 1 CPU each, interleaved (1, 3, 3, 1), best of each.
Results: printed and written to benchmarks/results/scale_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20


def save(name: str, result: dict) -> None:
    from run import machine

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------- (1) peak RSS at 1x, 4x, 16x volumes


def _mri_spec(storage: Path, scale: int, resident_mb: int, resolution: int):
    from dinoscale.spec import parse_spec

    return parse_spec(
        {
            "name": f"mri-scale{scale}",
            "modality": "mri",
            "profile": "demo",
            "dataset": {
                "name": "phantom-mri",
                "phantom": {
                    "seed": 0,
                    "n_patients": 12 * scale,
                    "images_per_patient": [1, 1],
                    "image_size": 64,
                    "depth": 16,
                },
                "split": {"val_fraction": 0.2, "test_fraction": 0.3, "seed": 0},
            },
            "backbones": [{"name": "dinov3-demo-xs", "weights": "random"}],
            "resolutions": [resolution],
            "probes": [
                {"kind": "segmentation", "head": "linear", "n_classes": 4, "steps": 8, "batch_size": 4, "crop": 64}
            ],
            "features": {"tokens": "patch_grid", "dtype": "float16", "batch_size": 16, "resident_mb": resident_mb},
            "metrics": {"bootstrap": {"resamples": 200}},
            "tracking": {"uri": f"sqlite:///{storage}/mlruns.db"},
            "storage": {"path": str(storage)},
        }
    )


def _rss_child(kind: str, storage: str, scale: int, mode: str, resolution: int, queue) -> None:
    """One measurement in a fresh process: ``kind`` extraction | trial, ``mode`` streamed | in-memory."""
    import torch

    from dinoscale.memory import PeakRSS, current_rss
    from dinoscale.sweep.extraction import _extract_shard, plan_jobs, run_job
    from dinoscale.sweep.plan import build_plan

    torch.set_num_threads(1)
    resident = 64 if mode == "streamed" else 1 << 20
    plan = build_plan(_mri_spec(Path(storage), scale, resident, resolution), Path(storage))
    out = {"kind": kind, "scale": scale, "mode": mode, "volumes": len(plan.dataset.manifest)}
    fs_bytes = sum(f.nbytes for f in plan.feature_sets)
    out["feature_set_mib"] = fs_bytes / MiB
    if kind == "extraction":
        from dinoscale.features.extract import pick_device
        from dinoscale.models import load_backbone

        jobs = plan_jobs(plan)
        backbone = load_backbone(jobs[0].backbone, jobs[0].weights, jobs[0].weights_seed)  # imports, model
        out["rss_before_mib"] = current_rss() / MiB
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            for job in jobs:
                if mode == "streamed":
                    run_job(job, str(plan.storage / "features"))  # shards on disk, row batch by row batch
                else:  # the previous path: every split's rows in one array, then written whole
                    for s in job.shards:
                        _extract_shard(backbone, job, s, None, pick_device())
        out["seconds"] = time.perf_counter() - t0
        out["slices"] = int(plan.dataset.manifest["n_slices"].sum())
    else:
        from monai.losses import DiceCELoss  # noqa: F401  (imported before the measurement, as in a worker)

        from dinoscale.sweep.trial import SweepContext, evaluate_cell

        ds = plan.dataset
        ctx = SweepContext(
            {c.id: c for c in plan.cells},
            ds.classes,
            {s: ds.units(s) for s in ("train", "val", "test")},
            str(plan.storage / "features"),
            "",
            "",
            "",
            mask_labels=dict(ds.mask_labels),
        )
        conv = torch.nn.Conv2d(8, 8, 3)
        conv(torch.randn(2, 8, 8, 8)).sum().backward()
        out["rss_before_mib"] = current_rss() / MiB
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            m = evaluate_cell(plan.cells[0], ctx)["metrics"]
        out["seconds"] = time.perf_counter() - t0
        out["test_dice"] = m["test_dice"]
        out["predicted_peak_mib"] = plan.cells[0].memory.get("predicted_peak_bytes", 0) / MiB
    out["peak_rss_mib"] = peak.bytes / MiB
    out["peak_reset_refused"] = peak.since_start
    queue.put(out)


def _spawn(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        return q.get(timeout=3600)
    finally:
        p.join(120)


def bench_rss(scales: list[int], resolution: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="dinoscale-rss-"))
    rows = []
    for scale in scales:
        storage = str(root / f"x{scale}")
        for kind in ("extraction", "trial"):
            # the in-memory extraction writes nothing, the streamed one fills the store the trials read
            for mode in ("in-memory", "streamed") if kind == "extraction" else ("streamed", "in-memory"):
                r = _spawn(_rss_child, kind, storage, scale, mode, resolution)
                rows.append(r)
                print(json.dumps(r), flush=True)
    table = {}
    for r in rows:
        table.setdefault((r["kind"], r["mode"]), {})[r["scale"]] = r["peak_rss_mib"]
    ratios = {f"{k} / {m}": v[max(v)] / v[min(v)] for (k, m), v in table.items()}
    dice = {(r["scale"], r["mode"]): r.get("test_dice") for r in rows if r["kind"] == "trial"}
    same = all(dice[(s, "streamed")] == dice[(s, "in-memory")] for s in scales)
    return {"resolution": resolution, "rows": rows, "ratio_largest_to_smallest": ratios, "trial_dice_identical": same}


# ---------------------------------------------------------------- (2) sharded extraction on 1 vs 3 nodes


def _xray_spec(
    storage: Path, n_patients: int, shard_passes: int, backbone: str = "dinov3-demo-l", resolution: int = 448
):
    from dinoscale.spec import parse_spec

    return parse_spec(
        {
            "name": "xray-shards",
            "modality": "xray",
            "profile": "demo",
            "dataset": {
                "name": "phantom-xray",
                "phantom": {"seed": 0, "n_patients": n_patients, "images_per_patient": [3, 3], "image_size": 256},
            },
            "backbones": [{"name": backbone, "weights": "random"}],
            "resolutions": [resolution],
            "probes": [{"kind": "linear"}],
            "features": {"batch_size": 16, "shard_forward_passes": shard_passes},
            "tracking": {"uri": f"sqlite:///{storage}/mlruns.db"},
            "storage": {"path": str(storage)},
        }
    )


def _one_stage(plan, n_nodes: int, store_root: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from dinoscale.sweep.extraction import run_extraction_stage

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(n_nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        report = run_extraction_stage(plan, store_root, 1, 0)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {
        "nodes": n_nodes,
        "wall_s": wall,
        "tasks": len(report.per_job),
        "shards": report.shards_extracted,
        "images": report.images,
        "feature_sets": report.feature_sets_extracted,
        "task_seconds": sorted(round(j["wall_seconds"], 1) for j in report.per_job),
        "distinct_worker_nodes": len({j.get("node") for j in report.per_job}),
    }


def bench_shards(n_patients: int, shard_passes: int, order: list[int], backbone: str, resolution: int) -> dict:
    import numpy as np

    from dinoscale.features import FeatureStore
    from dinoscale.sweep.plan import build_plan

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    root = Path(tempfile.mkdtemp(prefix="dinoscale-shards-"))
    plan = build_plan(
        _xray_spec(root, n_patients, shard_passes, backbone, resolution), root
    )  # one phantom, fresh stores
    runs = []
    for i, n in enumerate(order):
        r = _one_stage(plan, n, root / f"features-run{i}-{n}nodes")
        runs.append(r)
        print(json.dumps(r), flush=True)
    a, b = (root / f"features-run{i}-{n}nodes" for i, n in list(enumerate(order))[:2])
    same = all(
        np.array_equal(np.asarray(FeatureStore(a).get(f.key).features), np.asarray(FeatureStore(b).get(f.key).features))
        for f in plan.feature_sets
    )
    best = {n: min(r["wall_s"] for r in runs if r["nodes"] == n) for n in set(order)}
    import subprocess

    load = subprocess.run(["cat", "/proc/loadavg"], capture_output=True, text=True).stdout.split()[:3]
    return {
        "backbone": backbone,
        "resolution": resolution,
        "load_average_after": load,
        "n_images": sum(f.n_images for f in plan.feature_sets),
        "shards_per_split": {f.split: len(f.shards) for f in plan.feature_sets},
        "runs": runs,
        "best_wall_s": best,
        "speedup_3_vs_1": best[1] / best[3] if 1 in best and 3 in best else None,
        "features_identical": same,
        "physical_cores": os.cpu_count(),
    }


# ---------------------------------------------------------------- (3) predicted vs measured bytes


DEMO_SPECS = ["xray", "ct", "ct-semireal", "mri", "em", "petct", "wsi"]


def bench_bytes(specs: list[str], storage: str | None) -> dict:
    from dinoscale.features import FeatureStore
    from dinoscale.spec import load_spec
    from dinoscale.sweep.extraction import plan_jobs, run_job
    from dinoscale.sweep.plan import build_plan

    rows = []
    for name in specs:
        path = Path(name) if name.endswith(".yaml") else ROOT / "sweeps" / "demo" / f"{name}.yaml"
        spec = load_spec(path)
        project = Path(storage) if storage else Path(tempfile.mkdtemp(prefix="dinoscale-bytes-"))
        if storage is None or not spec.storage.path.startswith("/"):
            os.environ["DINOSCALE_STORAGE"] = str(project / ".dinoscale")
        plan = build_plan(spec, project, require_data=True)
        t0 = time.perf_counter()
        for job in plan_jobs(plan):
            run_job(job, str(plan.storage / "features"))
        store = FeatureStore(plan.storage / "features")
        sets = [f for f in plan.feature_sets if not f.online]
        predicted = sum(f.nbytes for f in sets)
        measured = sum(store.nbytes(f.key.digest) for f in sets)
        rows.append(
            {
                "spec": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                "dataset": spec.dataset.name,
                "feature_sets": len(sets),
                "rows": sum(f.n_rows for f in sets),
                "predicted_bytes": predicted,
                "measured_bytes": measured,
                "ratio": measured / predicted if predicted else None,
                "worst_set_ratio": max(store.nbytes(f.key.digest) / f.nbytes for f in sets),
                "extraction_seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        os.environ.pop("DINOSCALE_STORAGE", None)
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rss", "shards", "bytes"])
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--resolution", type=int, default=None, help="rss: 512; shards: 448")
    ap.add_argument("--patients", type=int, default=200, help="shards: phantom patients (3 images each)")
    ap.add_argument("--shard-passes", type=int, default=60, help="shards: images per shard")
    ap.add_argument("--backbone", default="dinov3-demo-l", help="shards: the backbone")
    ap.add_argument("--order", default="1,3,3,1", help="shards: node counts, in the order run")
    ap.add_argument("--spec", action="append", help="bytes: a spec (default: the demo specs)")
    ap.add_argument("--storage", default=None, help="bytes: a project folder whose store to reuse")
    args = ap.parse_args()
    if args.what == "rss":
        save("scale_rss", bench_rss([int(s) for s in args.scales.split(",")], args.resolution or 512))
    elif args.what == "shards":
        order = [int(s) for s in args.order.split(",")]
        save(
            "scale_shards", bench_shards(args.patients, args.shard_passes, order, args.backbone, args.resolution or 448)
        )
    else:
        save("scale_bytes", bench_bytes(args.spec or DEMO_SPECS, args.storage))


if __name__ == "__main__":
    main()
