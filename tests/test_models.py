"""Backbones: real timm DINOv3 architectures, parameter counts from the model, safe weight loading."""

import pytest
import torch

from dinoscale.models import WeightsError, load_backbone
from dinoscale.sweep.plan import backbone_info


def test_demo_ladder_is_dinov3_architecture_and_grows():
    counts = []
    for name in ["dinov3-demo-xs", "dinov3-demo-s", "dinov3-demo-m", "dinov3-demo-l"]:
        bb = load_backbone(name, "random", seed=0)
        assert (
            type(bb.model).__name__ == "Eva" and bb.model.pos_embed is None
        )  # timm's DINOv3: RoPE, no learned pos-embed
        assert bb.num_prefix_tokens == 5  # CLS + 4 registers
        with torch.inference_mode():
            tokens = bb.model.forward_features(torch.randn(2, 3, 64, 64))
        assert tokens.shape == (2, 5 + 16, bb.model.embed_dim)
        assert bb.n_params == sum(p.numel() for p in bb.model.parameters())
        counts.append(bb.n_params)
    assert counts == sorted(counts) and counts[-1] > 10 * counts[0]


@pytest.mark.parametrize(
    "name, expected", [("dinov3-vits16", 21_586_944), ("dinov3-vitb16", 85_641_216), ("dinov3-vitl16", 303_079_424)]
)
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
    with pytest.raises(
        WeightsError, match=r"evil.pth: refused: the file pickles a Python object \(argparse.Namespace\)"
    ):
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


# ---------------------------------------------------------------- any timm model, measured facts


def test_any_timm_model_by_name_with_its_token_layout():
    from dinoscale.models import backbone_facts, get_backbone, is_backbone

    conv = backbone_facts("timm:convnext_atto")
    assert (conv.output, conv.has_cls, conv.num_prefix_tokens, conv.patch_size, conv.embed_dim) == (
        "spatial",
        False,
        0,
        32,
        320,
    )
    assert get_backbone("timm:convnext_atto").hub_tag == "d2_in1k"  # timm's default pretrained tag
    v2 = backbone_facts("dinov2-vits14")
    assert (v2.has_cls, v2.num_registers, v2.num_prefix_tokens, v2.patch_size) == (True, 0, 1, 14)
    assert backbone_facts("dinov2-vits14-reg").num_registers == 4
    s = backbone_facts("dinov3-vits16")
    assert (s.n_params, s.num_registers, s.patch_size, s.mean) == (21_586_944, 4, 16, (0.485, 0.456, 0.406))
    assert is_backbone("timm:vit_small_patch14_dinov2.lvd142m") and not is_backbone("timm:no_such_net")
    with pytest.raises(KeyError, match="no pretrained tag 'nope'"):
        get_backbone("timm:convnext_atto.nope")


def test_gflops_are_measured_and_match_a_real_forward():
    from torch.utils.flop_counter import FlopCounterMode

    from dinoscale.models import gflops_per_image

    s224 = gflops_per_image("dinov3-vits16", 224)
    assert 9.0 < s224 < 9.8  # ViT-S/16 @224 is ~4.6 GMACs = ~9.2 GFLOPs (+ 4 registers, attention)
    lo, hi = gflops_per_image("dinov3-demo-xs", 64), gflops_per_image("dinov3-demo-xs", 128)
    tokens = (5 + 64) / (5 + 16)  # 4 times the patches, plus CLS and 4 registers
    assert tokens < hi / lo < tokens**2  # linear layers grow with the tokens, attention with their square
    bb = load_backbone("dinov3-demo-xs")
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        bb.model.forward_features(torch.randn(1, 3, 64, 64))
    # The CPU flash-attention kernel is not in torch's FLOP table, so a real CPU forward misses exactly
    # the attention matmuls (4 N^2 D per block) that the meta-device count includes.
    attention = 3 * 4 * (5 + 16) ** 2 * 96
    assert fc.get_total_flops() + attention == pytest.approx(lo * 1e9)
    assert gflops_per_image("timm:convnext_atto", 224) == pytest.approx(1.094, rel=0.01)


# ---------------------------------------------------------------- official DINOv3 key format


def _official_dinov3_state_dict(model) -> dict:
    """timm Eva names -> the names of facebookresearch/dinov3 checkpoints (what timm's converter reads)."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone().contiguous()
    d = model.embed_dim
    out["mask_token"] = torch.zeros(1, d)  # pretraining only
    out["rope_embed.periods"] = torch.arange(d // (4 * model.blocks[0].attn.num_heads), dtype=torch.float32)
    for i in range(len(model.blocks)):  # official checkpoints of the plain models carry an all-zero qkv bias + mask
        out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * d)
    assert "storage_tokens" in out and "blocks.0.ls1.gamma" in out
    return out


def test_official_dinov3_format_loads_with_identical_outputs(tmp_path):
    from safetensors.torch import save_file

    src = load_backbone("dinov3-demo-s", "random", seed=3).model
    save_file(_official_dinov3_state_dict(src), tmp_path / "official.safetensors")
    torch.save(_official_dinov3_state_dict(src), tmp_path / "official.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = src.forward_features(x)
    for f in ("official.safetensors", "official.pth"):
        bb = load_backbone("dinov3-demo-s", str(tmp_path / f), seed=99)
        with torch.inference_mode():
            assert torch.equal(bb.model.forward_features(x), ref)


def test_official_format_with_a_real_qkv_bias_is_refused_not_dropped(tmp_path):
    from safetensors.torch import save_file

    sd = _official_dinov3_state_dict(load_backbone("dinov3-demo-xs").model)
    sd["blocks.1.attn.qkv.bias"] = torch.full((3 * 96,), 0.05)  # timm's converter would skip it silently
    save_file(sd, tmp_path / "official_biased.safetensors")
    with pytest.raises(WeightsError, match="_qkvb"):
        load_backbone("dinov3-demo-xs", str(tmp_path / "official_biased.safetensors"))


# ---------------------------------------------------------------- hub weights, offline-first


def test_hub_offline_fails_at_once_with_what_to_do(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_never_logged")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE") as e:
        load_backbone("dinov3-vits16", "hub")
    assert time.perf_counter() - t0 < 5
    assert "timm/vit_small_patch16_dinov3.lvd1689m" in str(e.value) and "SECRET" not in str(e.value)


def test_hub_unreachable_fails_at_once(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="cannot be reached"):
        load_backbone("dinov3-vits16", "hub")
    assert time.perf_counter() - t0 < 5


def test_hub_weights_come_from_the_local_cache_offline(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from dinoscale.models import backbone_facts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--timm--vit_small_patch16_dinov3.lvd1689m"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    src = load_backbone("dinov3-vits16", "random", seed=4).model
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, snap / "model.safetensors")
    bb = load_backbone("dinov3-vits16", "hub")
    assert bb.weights["kind"] == "hub" and bb.weights["digest"] == "hub:vit_small_patch16_dinov3.lvd1689m"
    assert len(bb.weights["sha256"]) == 64 and bb.weights["path"].endswith("model.safetensors")
    assert torch.equal(bb.model.blocks[5].mlp.fc1.weight, src.blocks[5].mlp.fc1.weight)
    assert bb.mean == backbone_facts("dinov3-vits16", hub=True).mean
