"""LoRA and full fine-tuning on the demo-ladder backbone (random weights, 32x32 images, CPU, seconds)."""

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import TensorDataset

from dinoscale.models import load_backbone
from dinoscale.train import FinetuneConfig, apply_lora, build_classifier, finetune, llrd_param_groups, predict
from dinoscale.train.loop import CHECKPOINT


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, 2), generator=g).float()
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[:, 0, :16] += (2 * y[:, 0] - 1)[:, None, None]  # label 0 in the top half of channel 0
    x[:, 1, 16:] += (2 * y[:, 1] - 1)[:, None, None]
    return TensorDataset(x, y)


def _backbone():
    return load_backbone("dinov3-demo-xs", "random", seed=0).model


def test_lora_changes_outputs_and_trains_only_adapter_and_head():
    cfg = FinetuneConfig("lora", lr=1e-2, epochs=1, batch_size=8, lora_rank=4, patience=None)
    model = build_classifier(_backbone(), 2, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(".attn.qkv.lora_A" in n for n in trainable) and any(".attn.proj.lora_B" in n for n in trainable)
    assert not any("patch_embed" in n for n in trainable)  # the ['qkv','proj'] name trap
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = _data()[:4][0]
    model.eval()
    with torch.no_grad():
        feats0 = model.features(x)
    finetune(model, _data(), _data(12, seed=1), cfg)
    model.eval()
    with torch.no_grad():
        feats1 = model.features(x)
    assert (feats1 - feats0).abs().max() > 1e-4  # the adapter changed the backbone's output
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), n


def test_lora_is_not_bypassed_on_qkvb_variants():
    """timm's _qkvb attention calls F.linear on the raw weight unless qkv_bias_separate is set."""
    torch.manual_seed(0)
    bb = timm.create_model(
        "vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, embed_dim=64, depth=2, num_heads=2
    )
    bb = apply_lora(bb, rank=2, targets=["qkv"])
    for name, p in bb.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # peft initialises B to 0: make the adapter non-trivial
        if "gamma_" in name:
            torch.nn.init.ones_(p)  # layer scale starts near 0 in a random init, hiding the attention branch
    x = torch.randn(1, 3, 32, 32)
    bb.eval()
    with torch.no_grad():
        on = bb.forward_features(x)
        for m in bb.modules():
            if hasattr(m, "qkv_bias_separate"):
                m.qkv_bias_separate = False  # the trap: adapters silently skipped
        off = bb.forward_features(x)
    assert (on - off).abs().max() > 0.05


def test_full_finetune_llrd_gives_each_layer_its_learning_rate():
    cfg = FinetuneConfig("full", lr=1e-3, layer_decay=0.5)
    model = build_classifier(_backbone(), 2, cfg)
    groups = llrd_param_groups(model, cfg.lr, cfg.layer_decay, weight_decay=0.05)
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    depth = len(model.backbone.blocks)  # 3: layers 0 (stem) .. 4 (norm + head)
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of["backbone.norm.weight"] == pytest.approx(1e-3)
    for i in range(depth):
        assert lr_of[f"backbone.blocks.{i}.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5 ** (depth - i))
    assert lr_of["backbone.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5 ** (depth + 1))
    assert lr_of["backbone.cls_token"] == pytest.approx(1e-3 * 0.5 ** (depth + 1))
    assert wd_of["backbone.blocks.0.attn.qkv.weight"] == 0.05
    assert wd_of["backbone.blocks.0.norm1.weight"] == 0.0 and wd_of["backbone.cls_token"] == 0.0
    assert set(lr_of) == {n for n, _ in model.named_parameters()}  # every parameter is trained, once


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, strategy):
    train, val = _data(), _data(12, seed=1)
    cfg = FinetuneConfig(strategy, lr=5e-3, epochs=3, warmup_epochs=1, batch_size=8, patience=None, lora_dropout=0.1)
    straight = finetune(build_classifier(_backbone(), 2, cfg), train, val, cfg, checkpoint_dir=tmp_path / "a")

    def crash_after_two(epoch, record):
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(
            build_classifier(_backbone(), 2, cfg),
            train,
            val,
            cfg,
            checkpoint_dir=tmp_path / "b",
            on_epoch=crash_after_two,
        )
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)  # tensors and numbers only
    resumed = finetune(build_classifier(_backbone(), 2, cfg), train, val, cfg, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from_epoch == 1 and straight.resumed_from_epoch is None
    assert [h["val_metric"] for h in resumed.history] == pytest.approx([h["val_metric"] for h in straight.history])
    np.testing.assert_allclose(predict(resumed.model, val), predict(straight.model, val), atol=1e-6)


def test_early_stopping_on_val_keeps_the_best_epoch():
    cfg = FinetuneConfig(
        "lora", lr=0.0, epochs=6, batch_size=8, patience=2, warmup_epochs=0
    )  # lr 0: val never improves
    res = finetune(build_classifier(_backbone(), 2, cfg), _data(), _data(12, seed=1), cfg)
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 0
