"""GPU check of the strategies that train the encoder (lora / full) through dinoscale.train.finetune:
bf16 autocast on CUDA, LoRA trains adapters + head only, layer-wise decay for full, gradient
checkpointing, and a resumed run that continues from its checkpoint. Random weights, random images,
no network; about a minute on an H100/H200.

    python benchmarks/gpu_train_check.py      # writes $OUT/gpu_train_check.json when OUT is set
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
    def __init__(self, n: int, res: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.rand(n, 4, generator=g) < 0.4).float()
        self.x = torch.randn(n, 3, res, res, generator=g) + self.y[:, :1, None, None]  # learnable signal

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def run(strategy: str, backbone: str, res: int, grad_ckpt: bool, ckpt_dir: str | None, epochs: int) -> dict:
    from dinoscale.models import load_backbone
    from dinoscale.train import FinetuneConfig, build_classifier, finetune

    cfg = FinetuneConfig(
        strategy=strategy,
        lr=1e-4 if strategy == "full" else 1e-3,
        epochs=epochs,
        batch_size=32,
        patience=None,
        grad_checkpointing=grad_ckpt,
        amp=True,
        seed=0,
    )
    bb = load_backbone(backbone, "random", 0)
    model = build_classifier(bb.model, 4, cfg, num_prefix_tokens=bb.num_prefix_tokens)
    train, val = Labelled(256, res, 0), Labelled(64, res, 1)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res_ = finetune(model, train, val, cfg, checkpoint_dir=ckpt_dir, device=torch.device("cuda"))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in res_.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in res_.model.parameters())
    return {
        "strategy": strategy,
        "backbone": backbone,
        "resolution": res,
        "grad_checkpointing": grad_ckpt,
        "epochs_run": res_.epochs_run,
        "resumed_from_epoch": res_.resumed_from_epoch,
        "seconds": seconds,
        "train_img_s": 256
        * (res_.epochs_run - (-1 if res_.resumed_from_epoch is None else res_.resumed_from_epoch) - 1)
        / seconds,
        "best_val_auroc": res_.best_val,
        "losses_finite": all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res_.history),
        "trainable_fraction": trainable / total,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_train_check: no CUDA device")
    rows = [
        run("lora", "dinov3-vitb16", 224, False, None, 2),
        run("full", "dinov3-vitb16", 224, False, None, 2),
        run("lora", "dinov3-vitl16", 512, True, None, 1),
        run("full", "dinov3-vitl16", 224, True, None, 1),
    ]
    with tempfile.TemporaryDirectory() as d:  # resume: 1 epoch, then the same run asked for 2 continues
        rows.append(run("lora", "dinov3-vits16", 224, False, d, 1))
        rows.append(run("lora", "dinov3-vits16", 224, False, d, 2))
    for r in rows:
        print(json.dumps(r), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_train_check.json").write_text(
            json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
