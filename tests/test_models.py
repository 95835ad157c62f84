"""Backbones: real timm DINOv3 architectures, parameter counts from the model, safe weight loading."""

import pytest
import torch

from dinoscale.models import WeightsError, load_backbone
from dinoscale.sweep.plan import backbone_info


def test_demo_ladder_is_dinov3_architecture_and_grows():
    counts = []
    for name in ["dinov3-demo-xs", "dinov3-demo-s", "dinov3-demo-m", "dinov3-demo-l"]:
        bb = load_backbone(name, "random", seed=0)
        assert type(bb.model).__name__ == "Eva" and bb.model.pos_embed is None  # timm's DINOv3: RoPE, no learned pos-embed
        assert bb.num_prefix_tokens == 5  # CLS + 4 registers
        with torch.inference_mode():
            tokens = bb.model.forward_features(torch.randn(2, 3, 64, 64))
        assert tokens.shape == (2, 5 + 16, bb.model.embed_dim)
        assert bb.n_params == sum(p.numel() for p in bb.model.parameters())
        counts.append(bb.n_params)
    assert counts == sorted(counts) and counts[-1] > 10 * counts[0]


@pytest.mark.parametrize("name, expected", [("dinov3-vits16", 21_586_944), ("dinov3-vitb16", 85_641_216), ("dinov3-vitl16", 303_079_424)])
def test_paper_backbone_parameter_counts_measured_on_meta_device(name, expected):
    assert backbone_info(name, "random", 0).n_params == expected


def test_random_init_is_seeded():
    a = load_backbone("dinov3-demo-xs", "random", seed=1).model.state_dict()
    b = load_backbone("dinov3-demo-xs", "random", seed=1).model.state_dict()
    c = load_backbone("dinov3-demo-xs", "random", seed=2).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_local_safetensors_and_pth_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = load_backbone("dinov3-demo-xs", "random", seed=5).model
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pth")
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = src.forward_features(x)
    for f in ("w.safetensors", "w.pth"):
        bb = load_backbone("dinov3-demo-xs", str(tmp_path / f))
        assert bb.weights["kind"] == "file" and bb.weights["digest"].startswith("sha256:")
        with torch.inference_mode():
            assert torch.allclose(bb.model.forward_features(x), ref)


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    torch.save({"model": argparse.Namespace(cmd="arbitrary object")}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused to load"):
        load_backbone("dinov3-demo-xs", str(tmp_path / "evil.pth"))


def test_dropped_qkv_bias_is_detected(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in load_backbone("dinov3-demo-xs", "random").model.state_dict().items()}
    sd["blocks.0.attn.qkv.bias"] = torch.full((3 * 96,), 0.1)
    save_file(sd, tmp_path / "biased.safetensors")
    with pytest.raises(WeightsError, match="_qkvb"):
        load_backbone("dinov3-demo-xs", str(tmp_path / "biased.safetensors"))


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors' not found"):
        load_backbone("dinov3-demo-xs", str(tmp_path / "nope.safetensors"))
