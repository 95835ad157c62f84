"""GPU check (one short script, no network, < 5 minutes on an H100/H200).

Measures extraction throughput of dinoscale's ``extract_features`` against a bare timm loop on CUDA
with bf16 autocast + channels-last, for DINOv3 ViT-S/B/L (random weights) at 224 and 512, then forces
an out-of-memory (a per-process memory cap + a huge batch) to check the batch back-off.

Fairness: both sides read the same in-memory preprocessed images through the same DataLoader
settings (batch, workers, pinned memory), run the same model object under inference_mode, bf16
autocast and channels-last, and return CLS ⊕ mean-patch features to the host. Runs are interleaved
(bare, dinoscale, dinoscale, bare) and the best of each is kept.

    python benchmarks/gpu_check.py            # writes $OUT/gpu_check.{json,md} when OUT is set
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [
    ("dinov3-vits16", 224, 128, 1024),
    ("dinov3-vits16", 512, 64, 256),
    ("dinov3-vitb16", 224, 128, 1024),
    ("dinov3-vitb16", 512, 64, 256),
    ("dinov3-vitl16", 224, 128, 512),
    ("dinov3-vitl16", 512, 32, 256),
]
WORKERS = 4


class Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def bare_loop(model, data: Images, batch: int, prefix: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, num_workers=WORKERS, pin_memory=True, prefetch_factor=4
    )
    out = []
    with torch.inference_mode():
        for x in loader:
            x = x.cuda(non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                t = model.forward_features(x)
            out.append(torch.cat([t[:, 0], t[:, prefix:].mean(1)], -1).float().cpu())
    return torch.cat(out)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, r


_LOADED: dict = {}


def _backbone(name: str):
    from dinoscale.models import load_backbone

    if name not in _LOADED:
        _LOADED.clear()  # one model on the GPU at a time
        torch.cuda.empty_cache()
        _LOADED[name] = load_backbone(name, "random", 0)
    return _LOADED[name]


def throughput(name: str, res: int, batch: int, n: int) -> dict:
    from dinoscale.features.extract import extract_features, recipe_for
    from dinoscale.models import gflops_per_image

    bb = _backbone(name)
    model = bb.model.cuda().eval().to(memory_format=torch.channels_last)
    data = Images(torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(0)))
    dev = torch.device("cuda")

    def ours():
        return torch.from_numpy(
            extract_features(
                bb, recipe_for(bb, res), data, batch_size=batch, device=dev, num_workers=WORKERS, progress=False
            )[0]
        )

    def bare():
        return bare_loop(model, data, batch, bb.num_prefix_tokens)

    warm = Images(data.x[: 2 * batch])
    extract_features(bb, recipe_for(bb, res), warm, batch_size=batch, device=dev, num_workers=0, progress=False)
    bare_loop(model, warm, batch, bb.num_prefix_tokens)
    t = {"bare": [], "dinoscale": []}
    outs = {}
    for who, fn in [("bare", bare), ("dinoscale", ours), ("dinoscale", ours), ("bare", bare)]:
        s, outs[who] = timed(fn)
        t[who].append(s)
    diff = (outs["bare"] - outs["dinoscale"]).abs().max().item()
    gf = gflops_per_image(name, res)
    best = {k: min(v) for k, v in t.items()}
    row = {
        "backbone": name,
        "resolution": res,
        "batch": batch,
        "images": n,
        "gflops_per_image": gf,
        "bare_img_s": n / best["bare"],
        "dinoscale_img_s": n / best["dinoscale"],
        "ratio": best["bare"] / best["dinoscale"],
        "dinoscale_tflops": n * gf / best["dinoscale"] / 1e3,
        "max_abs_diff": diff,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "runs_s": t,
    }
    torch.cuda.reset_peak_memory_stats()
    return row


def oom_backoff() -> dict:
    """Cap this process at ~4 GiB and ask for batch 256 of ViT-L @512: must back off, not fail."""
    from dinoscale.features.extract import extract_features, recipe_for

    bb = _backbone("dinov3-vitl16")
    dev = torch.device("cuda")
    data = Images(torch.randn(256, 3, 512, 512, generator=torch.Generator().manual_seed(1)))
    ref, _ = extract_features(
        bb, recipe_for(bb, 512), Images(data.x[:8]), batch_size=8, device=dev, num_workers=0, progress=False
    )
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 4 * 2**30 / total))
    try:
        t0 = time.perf_counter()
        feats, stats = extract_features(
            bb, recipe_for(bb, 512), data, batch_size=256, device=dev, num_workers=0, progress=False
        )
        seconds = time.perf_counter() - t0
        ok, err = True, ""
    except Exception as e:  # noqa: BLE001 - reported in the table
        ok, err, stats, feats, seconds = False, f"{type(e).__name__}: {e}"[:300], None, None, 0.0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    out = {
        "ok": ok and stats.oom_backoffs > 0,
        "error": err,
        "asked_batch": 256,
        "memory_cap_gib": 4.0,
        "seconds": seconds,
    }
    if stats is not None:
        out.update(
            final_batch=stats.batch_size,
            backoffs=stats.oom_backoffs,
            images=stats.images,
            max_abs_diff_vs_batch8=float(abs(feats[:8] - ref).max()),
        )
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    rows = []
    for cfg in CONFIGS:
        rows.append(throughput(*cfg))
        r = rows[-1]
        print(
            f"{r['backbone']:14s} @{r['resolution']:<4d} b{r['batch']:<4d} bare {r['bare_img_s']:8.1f} img/s  "
            f"dinoscale {r['dinoscale_img_s']:8.1f} img/s  ratio {r['ratio']:.3f}  {r['dinoscale_tflops']:.0f} TFLOP/s  "
            f"diff {r['max_abs_diff']:.2e}",
            flush=True,
        )
    oom = oom_backoff()
    print("OOM back-off:", json.dumps(oom), flush=True)
    dev = torch.cuda.get_device_name(0)
    md = [
        f"GPU check on {dev} (torch {torch.__version__}), bf16 autocast, channels-last, random weights, "
        f"{WORKERS} loader workers; {time.perf_counter() - t_start:.0f} s",
        "",
        "| backbone | res | batch | GFLOPs/img | bare timm img/s | dinoscale img/s | ratio | dinoscale TFLOP/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['backbone']} | {r['resolution']} | {r['batch']} | {r['gflops_per_image']:.1f} | {r['bare_img_s']:.0f} | "
        f"{r['dinoscale_img_s']:.0f} | {r['ratio']:.3f} | {r['dinoscale_tflops']:.0f} | {r['peak_mem_gib']:.1f} |"
        for r in rows
    ]
    md += [
        "",
        f"OOM back-off (4 GiB cap, ViT-L @512, batch 256 asked): {'OK' if oom['ok'] else 'FAILED'} - "
        f"final batch {oom.get('final_batch')}, {oom.get('backoffs')} back-offs, max |diff| vs batch 8 "
        f"{oom.get('max_abs_diff_vs_batch8')} {oom['error']}",
    ]
    text = "\n".join(md)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.json").write_text(
            json.dumps({"device": dev, "torch": torch.__version__, "rows": rows, "oom": oom}, indent=2)
        )
        Path(out, "gpu_check.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
