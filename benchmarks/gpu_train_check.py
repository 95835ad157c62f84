"""GPU check of the strategies that train the encoder (lora / full) through dinoscale.train.finetune:
bf16 autocast on CUDA, LoRA trains adapters + head only, layer-wise decay for full, gradient
checkpointing, the out-of-memory back-off (a per-process memory cap forces it), a resumed run that
continues from its checkpoint, the 3D-classification and segmentation models, and for every run the
plan's memory estimate (``dinoscale.train.memory``) beside the measured peak. Random weights, random
images, no network; about two minutes on an H100/H200.

    python benchmarks/gpu_train_check.py            # writes $OUT/gpu_train_check.json when OUT is set
    python benchmarks/gpu_train_check.py --cpu-smoke  # the same code paths, tiny, on the CPU (no figures)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Labelled(torch.utils.data.Dataset):
    """Images (or volumes of ``slices``) with 4 labels, or label maps of 3 classes when ``seg``."""

    def __init__(self, n: int, res: int, seed: int, slices: int = 0, seg: bool = False):
        g = torch.Generator().manual_seed(seed)
        shape = (n, slices, 3, res, res) if slices else (n, 3, res, res)
        self.x = torch.randn(*shape, generator=g)
        if seg:
            self.y = (self.x[..., 0, :, :] > 0.5).long() + (self.x[..., 1, :, :] > 1.0).long()
        else:
            self.y = (torch.rand(n, 4, generator=g) < 0.4).float()
            self.x += self.y[:, :1].reshape(n, *[1] * (self.x.ndim - 1))  # learnable signal

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def run(
    strategy: str,
    backbone: str,
    res: int,
    grad_ckpt: bool,
    ckpt_dir: str | None,
    epochs: int,
    device: str = "cuda",
    n: int = 256,
    batch: int = 32,
    slices: int = 0,
    seg: bool = False,
    cap_gib: float | None = None,
) -> dict:
    from dinoscale.models import load_backbone
    from dinoscale.strategies import get_strategy
    from dinoscale.train import FinetuneConfig, build_model, finetune
    from dinoscale.train.memory import estimate_bytes, strategy_facts
    from dinoscale.train.objective import classification, segmentation

    cfg = FinetuneConfig(
        strategy=strategy,
        lr=1e-4 if strategy == "full" else 1e-3,
        epochs=epochs,
        batch_size=batch,
        patience=None,
        grad_checkpointing=grad_ckpt,
        amp=True,
        seed=0,
    )
    bb = load_backbone(backbone, "random", 0)
    head = (
        {"probe": "segmentation", "head": "conv3d" if slices else "conv", "n_classes": 3, "hidden_dim": 64}
        if seg
        else {"probe": "linear", "volume_pool": "mean"}
    )
    out_size = ((slices, res, res) if slices else (res, res)) if seg else None
    model = build_model(
        bb.model, cfg, head, 3 if seg else 4, bool(slices), bb.patch_size, bb.num_prefix_tokens, out_size
    )
    train, val = Labelled(n, res, 0, slices, seg), Labelled(max(8, n // 4), res, 1, slices, seg)
    facts, trained = strategy_facts(get_strategy(strategy).spec(), backbone, res)  # the strategy's defaults
    head_values = (3 * res * res * (slices or 1)) if seg else 0
    estimate = estimate_bytes(facts, batch, slices or 1, grad_ckpt, True, trained, head_values) / 2**30
    cuda = device == "cuda"
    if cuda:
        if cap_gib is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / torch.cuda.mem_get_info()[1]))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        res_ = finetune(
            model,
            train,
            val,
            cfg,
            checkpoint_dir=ckpt_dir,
            device=torch.device(device),
            objective=segmentation(3) if seg else classification(),
        )
    finally:
        if cuda and cap_gib is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in res_.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in res_.model.parameters())
    trained_epochs = res_.epochs_run - (0 if res_.resumed_from_epoch is None else res_.resumed_from_epoch + 1)
    return {
        "strategy": strategy,
        "backbone": backbone,
        "resolution": res,
        "slices": slices,
        "segmentation": seg,
        "batch": batch,
        "grad_checkpointing": grad_ckpt,
        "memory_cap_gib": cap_gib,
        "epochs_run": res_.epochs_run,
        "resumed_from_epoch": res_.resumed_from_epoch,
        "micro_batch_size": res_.micro_batch_size,
        "oom_backoffs": res_.oom_backoffs,
        "seconds": seconds,
        "train_samples_s": n * trained_epochs / seconds,
        "best_val": res_.best_val,
        "losses_finite": all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res_.history),
        "trainable_fraction": trainable / total,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "plan_estimate_gib": estimate,
    }


def main() -> None:
    smoke = "--cpu-smoke" in sys.argv
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_train_check: no CUDA device (use --cpu-smoke to check the code paths on the CPU)")
    if smoke:
        small = dict(device="cpu", n=8, batch=4)
        rows = [
            run("lora", "dinov3-demo-xs", 32, False, None, 1, **small),
            run("full", "dinov3-demo-xs", 32, True, None, 1, **small),
            run("lora", "dinov3-demo-xs", 32, True, None, 1, slices=3, **small),
            run("lora", "dinov3-demo-xs", 32, False, None, 1, seg=True, **small),
            run("full", "dinov3-demo-xs", 32, True, None, 1, slices=3, seg=True, **small),
        ]
    else:
        rows = [
            run("lora", "dinov3-vitb16", 224, False, None, 2),
            run("full", "dinov3-vitb16", 224, False, None, 2),
            run("lora", "dinov3-vitl16", 512, True, None, 1),
            run("full", "dinov3-vitl16", 224, True, None, 1),
            # the back-off: ViT-L @512, full, batch 64 without checkpointing under an 8 GiB cap
            run("full", "dinov3-vitl16", 512, False, None, 1, n=64, batch=64, cap_gib=8.0),
            # 3D classification (16 slices per volume) and 2D / 3D segmentation
            run("lora", "dinov3-vitb16", 224, True, None, 1, n=32, batch=4, slices=16),
            run("lora", "dinov3-vitb16", 224, False, None, 1, n=64, batch=16, seg=True),
            run("full", "dinov3-vits16", 224, True, None, 1, n=16, batch=2, slices=16, seg=True),
        ]
    with tempfile.TemporaryDirectory() as d:  # resume: 1 epoch, then the same run asked for 2 continues
        name, extra = ("dinov3-demo-xs", dict(device="cpu", n=8, batch=4)) if smoke else ("dinov3-vits16", {})
        rows.append(run("lora", name, 32 if smoke else 224, False, d, 1, **extra))
        rows.append(run("lora", name, 32 if smoke else 224, False, d, 2, **extra))
    for r in rows:
        print(json.dumps(r), flush=True)
    out = os.environ.get("OUT")
    if out and not smoke:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_train_check.json").write_text(
            json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1)
        )
    ok = all(r["losses_finite"] for r in rows) and rows[-1]["resumed_from_epoch"] == 0
    if not smoke:
        ok = ok and rows[4]["oom_backoffs"] > 0
    print("gpu_train_check:", "OK" if ok else "FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
