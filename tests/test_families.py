"""Encoder families: every declared size is built by its loader (random init, no network) and its measured
token layout, width and patch size match what its family declares; a loader whose package is missing is
named with its install command; weights are found offline in the Hugging Face cache layout."""

import importlib.util
import os

import pytest
import torch
from typer.testing import CliRunner

from dinoscale.cli import app
from dinoscale.models import WeightsError, backbone_facts, get_backbone, load_backbone, weights_identity
from dinoscale.models.backbones import _create
from dinoscale.models.families import FAMILIES, family_of, get_family

SIZES = [(f, s) for f in FAMILIES for s in f.sizes]
RES = 224  # a multiple of 14, 16 and 32: every declared grid is exact


def _installed(family) -> bool:
    return importlib.util.find_spec(family.requires[0]) is not None


def test_registry_has_the_comparison_families_each_fully_declared():
    real = [f for f in FAMILIES if f.domain != "demo"]
    assert len(real) >= 12
    names = {f.name for f in real}
    assert {"dinov3", "dinov3-convnext", "dinov2", "dinov2-reg", "rad-dino", "biomedclip", "medsiglip"} <= names
    assert {"uni", "conch", "virchow2", "h-optimus", "phikon", "ct-fm", "resnet50"} <= names
    for f in real:
        assert f.sizes and f.licence and f.source and f.pooling_upstream and f.tokens
        assert f.pooling_protocol in ("cls", "mean_patch", "cls_mean_patch")
        assert len(f.mean) == len(f.std)
        for s in f.sizes:
            assert get_backbone(s.backbone).family == f.name
            assert family_of(s.backbone) == f.name
    assert {s.key for s in get_family("dinov3").sizes} == {"s", "s+", "b", "l", "h+"}
    assert [s.backbone for s in get_family("uni").sizes] == ["uni", "uni2-h"]


@pytest.mark.parametrize("family, size", SIZES, ids=[s.backbone for _, s in SIZES])
def test_each_size_is_built_and_matches_its_declared_layout(family, size):
    if not _installed(family):
        pytest.skip(f"{family.name} loads through '{family.requires[0]}', not installed ({family.requires[1]})")
    facts = backbone_facts(size.backbone)
    assert (facts.embed_dim, facts.patch_size, facts.num_prefix_tokens) == (size.width, size.patch, size.prefix)
    assert facts.mean == tuple(family.mean) and facts.std == tuple(family.std)  # into the recipe, as declared
    dims, channels = family.spatial_dims, len(family.mean)  # a 3D family: volumes [B, C, D, H, W]
    with torch.device("meta"):  # the whole architecture, no memory: the real-size models are GBs
        model = _create(get_backbone(size.backbone), pretrained=False).eval()
        out = model.forward_features(torch.empty(1, channels, *[RES] * dims))
    grid = RES // size.patch
    if size.prefix or facts.output == "tokens":
        assert tuple(out.shape) == (1, size.prefix + grid * grid, size.width)
    else:
        assert tuple(out.shape) == (1, size.width, *[grid] * dims)


def test_a_family_runs_with_random_weights():
    """(A transformers, an open_clip and a MONAI family run in the offline-weights test below.)"""
    bb = load_backbone("dinov2-demo-xs", "random", seed=0)
    with torch.inference_mode():
        tokens = bb.model.forward_features(torch.randn(2, 3, 56, 56))
    assert tokens.shape == (2, bb.num_prefix_tokens + (56 // bb.patch_size) ** 2, bb.facts.embed_dim)
    assert torch.isfinite(tokens).all() and tokens.std() > 0


@pytest.mark.parametrize("name", ["conch", "biomedclip"])
def test_a_missing_loader_package_is_named_with_its_install_command(monkeypatch, name):
    """The package hidden as Python hides a blocked import (``sys.modules[name] = None``): building the model and
    listing its weights name the package and its install command."""
    import sys

    from dinoscale.models.backbones import weights_need

    module, install = get_family(name).requires
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(WeightsError, match=rf"'{module}', which is not installed; install it with `{install}`"):
        _create(get_backbone(name), pretrained=False)
    need = weights_need(name, "hub")
    assert not need.found and install in need.todo


def test_backbones_command_lists_families_with_loader_sizes_and_gating():
    r = CliRunner().invoke(app, ["backbones"])
    assert r.exit_code == 0, r.output
    for f in FAMILIES:
        line = next(x for x in r.output.splitlines() if x.startswith(f.name + " "))
        assert f.loader in line and ("gated" if f.gated else "open") in line
    assert "sizes: s=dinov3-vits16, s+=dinov3-vits16plus, b=dinov3-vitb16" in r.output
    assert "uni2-h" in r.output


def test_unknown_family_suggests_the_near_name():
    with pytest.raises(KeyError, match="did you mean rad-dino"):
        get_family("raddino")


def _fake_hf_cache(cache, repo: str, filename: str, payload: bytes | None = None, state_dict=None) -> None:
    """The Hugging Face hub cache's own layout: blobs/<sha>, refs/main, snapshots/<rev>/<file> -> blob.
    A state dict is written as its file name says: .safetensors, or torch.save for a .bin."""
    import hashlib

    from safetensors.torch import save_file

    root = cache / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    tmp = root / "blobs" / "incoming"
    if state_dict is not None and filename.endswith(".safetensors"):
        save_file(state_dict, str(tmp))
    elif state_dict is not None:
        torch.save(state_dict, tmp)
    else:
        tmp.write_bytes(payload or b"not read")
    blob = root / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(blob)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snap), snap / filename)


def test_weights_found_offline_in_the_hf_cache_layout(tmp_path, monkeypatch):
    """A timm family is loaded from the cache with HF_HUB_OFFLINE set, and from timm's local-dir:."""
    from dinoscale.models.backbones import weights_need

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = load_backbone("dinov2-vits14", "random", seed=3).model
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    _fake_hf_cache(tmp_path, "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors", state_dict=sd)

    bb = load_backbone("dinov2-vits14", "hub")
    assert bb.weights["kind"] == "hub" and str(tmp_path) in bb.weights["path"]
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        assert torch.allclose(bb.model.forward_features(x), src.forward_features(x))
    assert weights_need("dinov2-vits14", "hub").found
    # timm's local-dir: a folder holding the weights file
    from safetensors.torch import save_file

    (tmp_path / "local").mkdir()
    save_file(sd, str(tmp_path / "local" / "model.safetensors"))
    local = load_backbone("dinov2-vits14", f"local-dir:{tmp_path / 'local'}")
    assert local.weights["kind"] == "file" and local.weights["path"].endswith("local/model.safetensors")
    missing = weights_need("uni2-h", "hub")
    assert not missing.found and "hf download MahmoodLab/UNI2-h" in missing.todo and "gated" in missing.todo


def _clip_checkpoint(visual: dict) -> dict:
    """A whole open_clip / CONCH checkpoint around a vision tower's tensors: text tower, logit scale."""
    text = {
        "text.transformer.embeddings.word_embeddings.weight": torch.randn(8, 4),
        "text.proj.0.weight": torch.ones(2),
    }
    return {**visual, **text, "logit_scale": torch.tensor(4.6)}


@pytest.mark.parametrize(
    "name, repo, filename, to_file",
    [
        # open_clip: BiomedCLIP's repo holds the whole CLIP (visual.* + text.*) as open_clip_pytorch_model.bin
        (
            "biomedclip",
            "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            "open_clip_pytorch_model.bin",
            _clip_checkpoint,
        ),
        # transformers: RAD-DINO's model.safetensors holds a Dinov2Model's own key names (no hf. prefix)
        (
            "rad-dino",
            "microsoft/rad-dino",
            "model.safetensors",
            lambda sd: {k.removeprefix("hf."): v for k, v in sd.items()},
        ),
        # MONAI (3D): CT-FM's feature-extractor file holds the SegResEncoder's own keys (conv_init.*, layers.*)
        (
            "ct-fm",
            "project-lighter/ct_fm_feature_extractor",
            "model.safetensors",
            lambda sd: {k.removeprefix("encoder."): v for k, v in sd.items()},
        ),
    ],
)
def test_open_clip_transformers_and_monai_weights_load_offline_from_the_hf_cache(
    tmp_path, monkeypatch, name, repo, filename, to_file
):
    """Through the real loader: the family's repo and file name in the cache layout, HF_HUB_OFFLINE set, the
    checkpoint in its upstream key layout (made from the architecture on the meta device: no second random
    init of a ViT-B); every tensor of the file lands in the model, which then runs."""
    from dinoscale.models.backbones import weights_need

    fam = get_family(name)
    if not _installed(fam):
        pytest.skip(f"{fam.name} loads through '{fam.requires[0]}', not installed ({fam.requires[1]})")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = weights_need(name, "hub")
    assert not missing.found and f"hf download {repo} {filename}" in missing.todo  # the family's own file name
    with torch.device("meta"):
        layout = _create(get_backbone(name), pretrained=False).state_dict()
    torch.manual_seed(3)
    sd = {k: _fill(k, v) for k, v in layout.items()}
    _fake_hf_cache(tmp_path, repo, filename, state_dict=to_file(sd))

    assert weights_need(name, "hub").found
    bb = load_backbone(name, "hub")  # a key that did not fit would raise, naming it
    assert bb.weights["kind"] == "hub" and bb.weights["path"].endswith(filename) and str(tmp_path) in bb.weights["path"]
    own = bb.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    dims = fam.spatial_dims
    side = (2 if dims == 2 else 1) * bb.patch_size
    with torch.inference_mode():
        out = bb.model.forward_features(torch.randn(1, len(fam.mean), *[side] * dims))
    expected = (1, bb.num_prefix_tokens + 4, fam.sizes[0].width) if dims == 2 else (1, fam.sizes[0].width, 1, 1, 1)
    assert tuple(out.shape) == expected and torch.isfinite(out).all()
    # a seeded random init of this family is identified with its loader package's version
    assert f"-{fam.requires[0]}" in weights_identity(get_backbone(name), "random", 0)["digest"]


def _fill(key: str, like: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor of that shape: small random weights, unit running variances, integer counters."""
    if not like.is_floating_point():
        return torch.zeros(like.shape, dtype=like.dtype)
    return torch.ones(like.shape) if key.endswith("running_var") else torch.randn(like.shape) * 0.02


# ---------------------------------------------------------------- the spec names families compactly


def _demo_raw(**changes) -> dict:
    import yaml

    with open("sweeps/demo/xray.yaml") as f:
        raw = yaml.safe_load(f)
    raw.update(resolutions=[224], **changes)
    return raw


def test_encoders_expand_into_backbones_and_the_old_list_still_works():
    from dinoscale.spec import SweepSpec

    raw = _demo_raw(encoders=[{"family": "dinov3-demo", "sizes": ["xs", "s"]}, {"family": "dinov2-demo"}])
    raw["backbones"] = [{"name": "timm:resnet18", "weights": "random"}]
    spec = SweepSpec.model_validate(raw)
    names = [b.name for b in spec.backbones]
    assert names == [
        "timm:resnet18",
        "dinov3-demo-xs",
        "dinov3-demo-s",
        "dinov2-demo-xs",
        "dinov2-demo-s",
        "dinov2-demo-m",
        "dinov2-demo-l",
        "dinov2-demo-xl",
    ]  # a family without sizes: every size it has
    assert [family_of(n) for n in names[1:]] == ["dinov3-demo"] * 2 + ["dinov2-demo"] * 5
    # the resolved spec holds backbones only: written either way, one digest
    raw2 = _demo_raw()
    raw2["backbones"] = [{"name": n, "weights": "random"} for n in names]
    assert SweepSpec.model_validate(raw2).digest() == spec.digest()
    assert "encoders" not in spec.resolved_yaml()


@pytest.mark.parametrize(
    "encoders, words",
    [
        ([{"family": "raddino"}], "encoders.0.family: unknown encoder family 'raddino' (did you mean 'rad-dino'?)"),
        ([{"family": "dinov3", "sizes": ["s", "xl"]}], "unknown size of family dinov3 'xl' (did you mean 'l'?)"),
    ],
)
def test_an_unknown_family_or_size_is_one_message_naming_the_key(tmp_path, encoders, words):
    import yaml

    raw = _demo_raw(encoders=encoders)
    raw.pop("backbones")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "s.yaml")])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- dinoscale weights SPEC


def test_weights_command_names_every_missing_set_once(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = load_backbone("dinov2-vits14", "random", seed=3).model
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    _fake_hf_cache(tmp_path / "hub", "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors", state_dict=sd)
    raw = _demo_raw(encoders=[{"family": "dinov2", "sizes": ["s", "b"], "weights": "hub"}])
    raw["backbones"] = [
        {"name": "rad-dino", "weights": "hub"},
        {"name": "uni", "weights": "hub"},
        {"name": "dinov3-demo-xs", "weights": "random"},
    ]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))

    r = CliRunner().invoke(app, ["weights", str(tmp_path / "s.yaml")])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert r.output.count("3 of 5 backbone weight set(s) are missing") == 1
    for name, command in (
        ("rad-dino", "hf download microsoft/rad-dino model.safetensors"),
        ("uni", "hf download MahmoodLab/UNI model.safetensors (gated"),
        ("dinov2-vitb14", "hf download timm/vit_base_patch14_dinov2.lvd142m model.safetensors"),
    ):
        assert f"  - {name} (weights: hub) looked for at " in r.output and command in r.output
    found = [x for x in r.output.splitlines() if x.startswith("found")]
    assert len(found) == 2 and "dinov3-demo-xs" in found[0] and "random" in found[0]
    assert "dinov2-vits14" in found[1] and str(tmp_path / "hub") in found[1]

    # the sweep's pre-flight says the same, once, before anything runs
    r = CliRunner().invoke(app, ["preflight", str(tmp_path / "s.yaml")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.count("backbone weight set(s) are missing") == 1, r.output
    assert all(f"  - {n} (weights: hub)" in r.output for n in ("rad-dino", "uni", "dinov2-vitb14")), r.output

    raw["backbones"] = raw["backbones"][2:]
    raw["encoders"][0]["sizes"] = ["s"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["weights", str(tmp_path / "s.yaml")])
    assert r.exit_code == 0 and "MISSING" not in r.output


def test_transformers_checkpoints_load_by_their_own_key_names(tmp_path):
    """A Dinov2Model checkpoint (RAD-DINO, Phikon-v2 layout) and a full SigLIP checkpoint (vision + text towers:
    MedSigLIP's layout) load into the wrapper with every tensor matched; small configs, random weights."""
    import transformers
    from safetensors.torch import save_file

    from dinoscale.models.backbones import _load_file_into
    from dinoscale.models.hf import TransformersEncoder

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, **tiny)).eval()
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(tmp_path / "dino.safetensors"))
    siglip = transformers.SiglipModel(
        transformers.SiglipConfig(
            vision_config=dict(patch_size=14, **tiny),
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        )
    ).eval()
    save_file({k: v.contiguous() for k, v in siglip.state_dict().items()}, str(tmp_path / "siglip.safetensors"))
    x = torch.randn(1, 3, 56, 56)
    for cls, cfg, file, ref in (
        ("Dinov2Model", "Dinov2Config", "dino.safetensors", lambda: dino(pixel_values=x).last_hidden_state),
        (
            "SiglipVisionModel",
            "SiglipVisionConfig",
            "siglip.safetensors",
            lambda: siglip.vision_model(x).last_hidden_state,
        ),
    ):
        torch.manual_seed(1)
        model = TransformersEncoder(cls, cfg, dict(patch_size=14, **tiny), (0.5,) * 3, (0.5,) * 3).eval()
        _load_file_into(model, get_backbone("rad-dino"), tmp_path / file)  # a mismatch would raise, naming it
        with torch.inference_mode():
            assert torch.allclose(model.forward_features(x), ref(), atol=1e-5)


def test_a_3d_encoder_is_refused_at_preflight_naming_it():
    """CT-FM is built and its weights checked, but the extraction feeds 2D images and slices: the pre-flight
    refuses a spec naming it before anything runs, in one message (a UserError: exit 2 at the CLI)."""
    from dinoscale.errors import UserError
    from dinoscale.spec import SweepSpec
    from dinoscale.sweep.preflight import check_dimensions

    raw = _demo_raw(encoders=[{"family": "ct-fm"}])
    raw["backbones"] = [{"name": "dinov3-demo-xs", "weights": "random"}]
    with pytest.raises(UserError, match=r"backbone\(s\) ct-fm encode 3D volumes.*Remove them.*rad-dino") as e:
        check_dimensions(SweepSpec.model_validate(raw))
    assert "dinov3-demo-xs" not in str(e.value)
    check_dimensions(SweepSpec.model_validate(_demo_raw()))  # the demo's 2D backbones pass


def test_a_wrapped_vit_family_is_fine_tunable_and_the_others_are_refused_at_preflight():
    """CONCH's timm ViT trunk sits inside its vision tower (visual.trunk): LoRA adapts its blocks only, and the
    full strategy's layer-wise decay puts its stem first and the tower's poolers last (on the meta device: the
    structure, no compute). A transformers family has no such blocks: refused in one message (exit 2)."""
    from dinoscale.errors import UserError
    from dinoscale.spec import SweepSpec
    from dinoscale.sweep.preflight import check_fine_tunable
    from dinoscale.train import apply_lora, llrd_param_groups

    with torch.device("meta"):
        groups = llrd_param_groups(_create(get_backbone("conch"), pretrained=False), 1e-3, 0.5, 0.05)
        lora = apply_lora(_create(get_backbone("conch"), pretrained=False), rank=4, targets=("qkv", "proj"))
    layer = {n: g["layer"] for g in groups for n in g["names"]}
    assert layer["visual.trunk.patch_embed.proj.weight"] == layer["visual.trunk.cls_token"] == 0
    assert layer["visual.trunk.blocks.0.attn.qkv.weight"] == 1 and layer["visual.trunk.blocks.11.mlp.fc2.bias"] == 12
    assert layer["visual.attn_pool_contrast.query"] == layer["visual.trunk.norm.weight"] == 13
    adapted = [n for n, _ in lora.named_modules() if n.endswith("lora_A")]
    assert len(adapted) == 24 and all(n.startswith("visual.trunk.blocks.") for n in adapted)
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)

    raw = _demo_raw(strategies=["frozen", "lora"], finetuning={"lora": {"epochs": 1}})
    raw["backbones"] = [{"name": n, "weights": "random"} for n in ("dinov3-demo-xs", "rad-dino", "biomedclip")]
    with pytest.raises(UserError, match=r"backbone\(s\) rad-dino \(family rad-dino, transformers\) do not") as e:
        check_fine_tunable(SweepSpec.model_validate(raw))
    assert "strategies: [frozen]" in str(e.value) and "biomedclip" in str(e.value).split("fine-tune a family")[-1]
    raw["strategies"] = ["frozen"]
    check_fine_tunable(SweepSpec.model_validate(raw))  # frozen features need no blocks
