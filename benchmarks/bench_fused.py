"""Fused extraction against one read per feature set (issue 31), side by side in one run.

    python benchmarks/bench_fused.py                      # NIH-like: 1024 px 8-bit PNGs, 3 tiny encoders x 3 resolutions
    python benchmarks/bench_fused.py --n 48 --reps 1      # smaller / faster

A decode-bound case on this machine: N grey 1024 x 1024 PNGs (a smooth phantom with noise, compressing like a
radiograph: the calibration's image) described by a ``manifest`` CSV, swept with 3 demo-ladder encoders
(random weights, dinov3-demo-xs / s / m) at 3 resolutions: 9 feature sets per split. Both paths are the
extraction stage's own tasks run in this process, back to back (no Ray: its start-up is the same for both):
``plan_jobs`` + ``run_job`` (one task per backbone x resolution, each reading its files) and
``plan_fused_jobs`` + ``run_fused_job`` (each file decoded once for every set). Runs are interleaved (unfused,
fused, fused, unfused ...) and the best of each is kept. Decodes are counted at the reader
(``readers.read_image``, in this process: the CPU loads inline). Features are compared byte for byte.
Results: printed and written to benchmarks/results/fused.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

from dinoscale.data import readers  # noqa: E402
from dinoscale.features import FeatureStore  # noqa: E402
from dinoscale.spec import parse_spec  # noqa: E402
from dinoscale.sweep.calibrate import _image  # noqa: E402
from dinoscale.sweep.extraction import plan_fused_jobs, plan_jobs, run_fused_job, run_job  # noqa: E402
from dinoscale.sweep.plan import build_plan  # noqa: E402

BACKBONES = ("dinov3-demo-xs", "dinov3-demo-s", "dinov3-demo-m")


def write_dataset(folder: Path, n: int, side: int) -> Path:
    """N PNGs of ``side`` px and their manifest (70 / 10 / 20 % train / val / test, one image per patient)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,patient_id,split,labels"]
    for i in range(n):
        Image.fromarray(_image(rng, side)).save(folder / "images" / f"{i:05d}.png")
        split = "train" if i % 10 < 7 else "val" if i % 10 < 8 else "test"
        rows.append(f"images/{i:05d}.png,P{i:05d},{split},{'Nodule' if i % 2 else ''}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


def make_plan(data: Path, storage: Path, resolutions: list[int], backbones=BACKBONES):
    spec = {
        "name": "bench-fused",
        "modality": "xray",
        "profile": "demo",
        "dataset": {"name": "manifest", "root": str(data), "classes": ["Nodule"]},
        "backbones": [{"name": b, "weights": "random"} for b in backbones],
        "resolutions": resolutions,
        "probes": [{"kind": "knn"}],
        "features": {"batch_size": 32},
        "tracking": {"uri": f"sqlite:///{storage}/mlruns.db"},
        "storage": {"path": str(storage)},
    }
    return build_plan(parse_spec(spec), storage)


def make_ct_plan(storage: Path, n: int, side: int, depth: int, resolutions: list[int], backbones=BACKBONES):
    """A CT-RATE-like volume set: ``n`` phantom chest CTs (HU NIfTI.gz, ``side`` x ``side`` x ``depth``), lung
    window, slice features pooled per volume."""
    spec = yaml.safe_load((ROOT / "sweeps" / "demo" / "ct.yaml").read_text())
    spec["dataset"]["phantom"].update({"n_patients": n, "images_per_patient": [1, 1], "image_size": side})
    spec["dataset"]["phantom"]["depth"] = depth
    spec.update(
        {
            "backbones": [{"name": b, "weights": "random"} for b in backbones],
            "resolutions": resolutions,
            "tracking": {"uri": f"sqlite:///{storage}/mlruns.db"},
            "storage": {"path": str(storage)},
        }
    )
    return build_plan(parse_spec(spec), storage)


def run(plan, store: Path, fused: bool, reads: Counter) -> dict:
    """The stage's tasks of one path, in order; wall seconds, decodes per file, the tasks' own figures."""
    shutil.rmtree(store, ignore_errors=True)
    reads.clear()
    t0 = time.perf_counter()
    jobs = plan_fused_jobs(plan, FeatureStore(store)) if fused else plan_jobs(plan, FeatureStore(store))
    out = [(run_fused_job if fused else run_job)(j, str(store)) for j in jobs]
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "tasks": len(jobs),
        "decodes": sum(reads.values()),
        "decodes_counted_by_tasks": sum(r["decodes"] for r in out),  # in the loader workers too (a GPU)
        "files": len(reads),
        "decodes_per_file": sum(reads.values()) / max(1, len(reads)),
        "max_reads_of_a_file": max(reads.values(), default=0),
        "decode_share": (sum(r.get("decode_seconds", 0.0) for r in out) / wall) if fused else None,
        "encoder_inputs": sum(r["slices"] for r in out),
        "encoder_inputs_per_s": sum(r["slices"] for r in out) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60, help="images")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--reps", type=int, default=2, help="runs of each path, interleaved")
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), help="random weights (a GPU: dinov3-vits16 ...)")
    ap.add_argument("--case", choices=["xray", "ct"], default="xray", help="ct: phantom NIfTI.gz volumes, pooled")
    ap.add_argument("--depth", type=int, default=64, help="ct: slices per volume")
    args = ap.parse_args()
    reads: Counter = Counter()

    def counted(path, *a, **k):
        reads[str(path)] += 1
        return real(path, *a, **k)

    reader = "read_volume" if args.case == "ct" else "read_image"
    real = getattr(readers, reader)
    setattr(readers, reader, counted)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.case == "ct":
            plan = make_ct_plan(tmp / "storage", args.n, args.side, args.depth, args.resolutions, args.backbones)
        else:
            plan = make_plan(
                write_dataset(tmp / "data", args.n, args.side), tmp / "storage", args.resolutions, args.backbones
            )
        run(plan, tmp / "warm", True, reads)  # imports (MONAI), model builds, page cache: off both timings
        runs: dict[str, list[dict]] = {"unfused": [], "fused": []}
        order = ["unfused", "fused", "fused", "unfused"] * ((args.reps + 1) // 2)
        for name in order[: 2 * args.reps]:
            runs[name].append(run(plan, tmp / name, name == "fused", reads))
            print(name, json.dumps(runs[name][-1]), flush=True)
        a, b = FeatureStore(tmp / "unfused"), FeatureStore(tmp / "fused")
        identical = all(
            np.asarray(a.get(f.key).features).tobytes() == np.asarray(b.get(f.key).features).tobytes()
            for f in plan.missing
        )
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    result = {
        "case": (
            f"{args.n} phantom CT NIfTI.gz {args.side} x {args.side} x {args.depth}"
            if args.case == "ct"
            else f"{args.n} grey {args.side} px PNGs"
        )
        + f", {len(args.backbones)} encoders x {len(args.resolutions)} resolutions ({', '.join(args.backbones)} at "
        f"{args.resolutions}), {len(plan.missing)} feature sets",
        "feature_sets": len(plan.missing),
        "unfused": best["unfused"],
        "fused": best["fused"],
        "all_runs": runs,
        "wall_ratio_unfused_over_fused": best["unfused"]["wall_s"] / best["fused"]["wall_s"],
        "features_identical": identical,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    from run import machine

    result = {"benchmark": "fused", "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    (RESULTS / ("fused_ct.json" if args.case == "ct" else "fused.json")).write_text(
        json.dumps(result, indent=2, default=str)
    )
    print(json.dumps({k: v for k, v in result.items() if k != "all_runs"}, indent=2, default=str))


if __name__ == "__main__":
    main()
