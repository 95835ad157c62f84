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


def test_micro_batches_accumulate_to_the_full_batch_step():
    """A batch of 8 in micro-batches of 3 (3 + 3 + 2) gives the weights of one step on all 8 at once."""
    train = _data(16, 0)
    states = []
    for micro in (None, 3):
        cfg = FinetuneConfig("full", lr=1e-3, epochs=1, batch_size=8, micro_batch_size=micro, patience=None)
        res = finetune(build_classifier(_backbone(), 2, cfg), train, _data(8, 1), cfg)
        assert res.micro_batch_size == (micro or 8) and res.oom_backoffs == 0
        states.append({k: v.clone() for k, v in res.model.state_dict().items()})
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=2e-6, rtol=1e-5, msg=k)


class _SmallGpu(torch.nn.Module):
    """Stands in for a GPU that holds at most ``limit`` samples per forward (no GPU here): raises the
    exception CUDA raises when memory runs out."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.refused = model, limit, 0

    def forward(self, x):
        if self.training and len(x) > self.limit:
            self.refused += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(x)} samples")
        return self.model(x)


def test_out_of_memory_halves_the_micro_batch_and_redoes_the_batch():
    train, val = _data(16, 0), _data(8, 1)
    cfg = FinetuneConfig("lora", lr=5e-3, epochs=2, batch_size=8, patience=None, lora_rank=2)
    plain = finetune(build_classifier(_backbone(), 2, cfg), train, val, cfg)
    small = _SmallGpu(build_classifier(_backbone(), 2, cfg), limit=3)
    res = finetune(small, train, val, cfg)
    # 8 refused -> 4 refused -> 2 fits, for the rest of the run; the result is the full-batch one
    assert res.micro_batch_size == 2 and res.oom_backoffs == 2 and small.refused == 2
    assert [h["val_metric"] for h in res.history] == pytest.approx([h["val_metric"] for h in plain.history], abs=1e-6)
    with pytest.raises(torch.OutOfMemoryError):  # nothing left to halve: the error is the run's
        finetune(_SmallGpu(build_classifier(_backbone(), 2, cfg), limit=0), train, val, cfg)


def test_a_compacted_checkpoint_gives_back_the_result_without_training(tmp_path):
    from dinoscale.train import compact_checkpoint
    from dinoscale.train.loop import load_best_weights

    train, val = _data(), _data(12, seed=1)
    cfg = FinetuneConfig("lora", lr=5e-3, epochs=2, batch_size=8, patience=None, lora_rank=2)
    first = finetune(build_classifier(_backbone(), 2, cfg), train, val, cfg, checkpoint_dir=tmp_path)
    full_size = (tmp_path / CHECKPOINT).stat().st_size
    compact_checkpoint(tmp_path)
    assert (tmp_path / CHECKPOINT).stat().st_size < full_size  # no optimizer state, no last weights
    calls = []
    again = finetune(
        build_classifier(_backbone(), 2, cfg),
        train,
        val,
        cfg,
        checkpoint_dir=tmp_path,
        on_epoch=lambda *a: calls.append(a),
    )
    assert not calls and again.best_val == first.best_val and again.history == first.history
    np.testing.assert_allclose(predict(again.model, val), predict(first.model, val), atol=1e-6)
    restored = build_classifier(_backbone(), 2, cfg)
    assert load_best_weights(restored, tmp_path)["best_epoch"] == first.best_epoch
    np.testing.assert_allclose(predict(restored, val), predict(first.model, val), atol=1e-6)


def test_volume_classifier_and_segmenter_train_the_encoder_under_their_head():
    """3D classification (slice features pooled per volume) and 2D / 3D segmentation (patch-token grid ->
    decoder -> logits at the label maps' size): one LoRA epoch changes the encoder's adapters."""
    from torch.utils.data import TensorDataset

    from dinoscale.train import build_model
    from dinoscale.train.objective import segmentation

    g = torch.Generator().manual_seed(0)
    cfg = FinetuneConfig("lora", lr=1e-2, epochs=1, batch_size=4, patience=None, lora_rank=2)
    vols = torch.randn(8, 5, 3, 32, 32, generator=g)
    labels = (vols[:, :, 0].mean((1, 2, 3)) > 0).float()[:, None]
    model = build_model(_backbone(), cfg, {"probe": "linear", "volume_pool": "mean_max"}, 1, True, 16, 5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    res = finetune(model, TensorDataset(vols, labels), TensorDataset(vols, labels), cfg)
    assert res.epochs_run == 1 and model(vols[:2]).shape == (2, 1)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)

    masks = (torch.rand(8, 5, 40, 40, generator=g) > 0.7).long() * 2
    for volumetric, head in ((True, "conv3d"), (True, "linear"), (False, "conv")):
        x, y = (vols, masks) if volumetric else (vols[:, 0], masks[:, 0])
        seg = build_model(
            _backbone(),
            cfg,
            {"probe": "segmentation", "head": head, "n_classes": 3, "hidden_dim": 8},
            3,
            volumetric,
            16,
            5,
            tuple(y.shape[1:]),
        )
        assert seg(x[:2]).shape == (2, 3, *y.shape[1:])
        res = finetune(seg, TensorDataset(x, y), TensorDataset(x, y), cfg, objective=segmentation(3))
        assert 0.0 <= res.best_val <= 1.0 and res.history[0]["train_loss"] > 0


@pytest.mark.slow
def test_the_gpu_training_check_runs_its_code_paths_on_the_cpu():
    """benchmarks/gpu_train_check.py is run on a GPU box only; its --cpu-smoke mode keeps it working here."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_train_check.py"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "gpu_train_check: OK" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_volumes_of_different_depths_train_in_one_batch():
    """3D classification on volumes of 3, 5 and 4 slices: batched as a list, every slice through the encoder
    in one pass, pooled per volume exactly as each volume alone."""
    from dinoscale.train import build_model
    from dinoscale.train.data import collate_units

    g = torch.Generator().manual_seed(0)
    vols = [torch.randn(n, 3, 32, 32, generator=g) for n in (3, 5, 4)]
    labels = [torch.tensor([float(v.mean() > 0)]) for v in vols]
    x, y = collate_units(list(zip(vols, labels)))
    assert isinstance(x, list) and y.shape == (3, 1)
    cfg = FinetuneConfig("lora", lr=1e-2, epochs=1, batch_size=2, patience=None, lora_rank=2)
    model = build_model(_backbone(), cfg, {"probe": "linear", "volume_pool": "max"}, 1, True, 16, 5).eval()
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(v[None]) for v in vols])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    data = list(zip(vols, labels))
    res = finetune(model, data, data, cfg)
    assert res.epochs_run == 1 and np.isfinite(res.history[0]["train_loss"])
