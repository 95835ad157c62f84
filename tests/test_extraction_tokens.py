"""Token sets on real timm models: last-n blocks, patch grid, models without CLS or registers;
OOM back-off, worker order, a quiet progress bar."""

import numpy as np
import pytest
import torch

from dinoscale.features.extract import extract_features, parse_token_set, recipe_for
from dinoscale.models import load_backbone

CPU = torch.device("cpu")


class Tensors(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture(scope="module")
def xs():
    return load_backbone("dinov3-demo-xs", "random", seed=0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _blocks_output(model, x):
    """Outputs of every block, captured with hooks during one forward pass."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    with torch.inference_mode():
        final = model.forward_features(x)
    for h in hooks:
        h.remove()
    return outs, final


def test_last_n_blocks_concatenate_each_blocks_normed_cls(xs, images):
    outs, final = _blocks_output(xs.model, images)
    with torch.inference_mode():
        expected = torch.cat([xs.model.norm(outs[-2])[:, 0], xs.model.norm(outs[-1])[:, 0]], -1)
    got, _ = extract_features(xs, recipe_for(xs, 64, tokens="last2_cls"), Tensors(images), batch_size=4, device=CPU)
    assert got.shape == (6, 2 * 96)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[:, 96:], final[:, 0].numpy(), atol=1e-5)  # the last block's CLS is the usual CLS
    got4, _ = extract_features(
        xs, recipe_for(xs, 64, tokens="last2_cls_mean_patch"), Tensors(images), batch_size=4, device=CPU
    )
    np.testing.assert_allclose(got4[:, 192:], final[:, 5:].mean(1).numpy(), atol=1e-5)  # registers excluded


def test_patch_grid_is_the_row_major_patch_tokens(xs, images):
    grid, _ = extract_features(xs, recipe_for(xs, 64, tokens="patch_grid"), Tensors(images), batch_size=4, device=CPU)
    assert grid.shape == (6, 96, 4, 4)  # [N, D, H/16, W/16]
    with torch.inference_mode():
        tokens = xs.model.forward_features(images)
    np.testing.assert_allclose(grid[:, :, 1, 2], tokens[:, 5 + 1 * 4 + 2].numpy(), atol=1e-5)
    np.testing.assert_allclose(grid.mean((2, 3)), tokens[:, 5:].mean(1).numpy(), atol=1e-5)


def test_a_model_without_registers_keeps_every_patch():
    bb = load_backbone("dinov2-vits14", "random", seed=0)
    assert bb.num_prefix_tokens == 1 and bb.has_cls
    x = torch.randn(2, 3, 56, 56)
    feats, _ = extract_features(bb, recipe_for(bb, 56, tokens="cls_mean_patch"), Tensors(x), batch_size=2, device=CPU)
    with torch.inference_mode():
        tokens = bb.model.forward_features(x)
    assert tokens.shape[1] == 1 + 16
    np.testing.assert_allclose(feats[:, 384:], tokens[:, 1:].mean(1).numpy(), atol=1e-5)


def test_a_cnn_has_no_cls_and_pools_its_feature_map():
    bb = load_backbone("timm:convnext_atto", "random", seed=0)
    x = torch.randn(2, 3, 64, 64)
    feats, _ = extract_features(bb, recipe_for(bb, 64, tokens="mean_patch"), Tensors(x), batch_size=2, device=CPU)
    with torch.inference_mode():
        fmap = bb.model.forward_features(x)
    np.testing.assert_allclose(feats, fmap.mean((2, 3)).numpy(), atol=1e-5)
    grid, _ = extract_features(bb, recipe_for(bb, 64, tokens="patch_grid"), Tensors(x), batch_size=2, device=CPU)
    assert grid.shape == (2, 320, 2, 2)
    with pytest.raises(ValueError, match="no CLS token"):
        extract_features(bb, recipe_for(bb, 64, tokens="cls_mean_patch"), Tensors(x), device=CPU)


def test_unknown_token_set_and_bad_resolution_are_clear(xs, images):
    with pytest.raises(ValueError, match="unknown token set"):
        parse_token_set("cls_max")
    with pytest.raises(ValueError, match="not a multiple of .* patch size 16"):
        extract_features(xs, recipe_for(xs, 60), Tensors(images), device=CPU)


def test_batch_halves_on_out_of_memory_and_features_do_not_change(xs, images, monkeypatch):
    ref, _ = extract_features(xs, recipe_for(xs, 64), Tensors(images), batch_size=1, device=CPU)
    real = xs.model.forward_features
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def limited(x):
        if x.shape[0] > 2:
            raise oom("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(xs.model, "forward_features", limited)
    got, stats = extract_features(xs, recipe_for(xs, 64), Tensors(images), batch_size=8, device=CPU)  # 8 -> 4 -> 2
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert stats.batch_size == 2 and stats.oom_backoffs == 2 and stats.forward_passes == 3


def test_workers_keep_the_input_order_and_the_bar_is_quiet_in_logs(xs, tmp_path, capfd):
    from PIL import Image

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (70, 70), dtype=np.uint8)).save(p)
        paths.append(str(p))
    inline, _ = extract_features(xs, recipe_for(xs, 32), paths, batch_size=2, device=CPU, num_workers=0)
    workers, _ = extract_features(xs, recipe_for(xs, 32), paths, batch_size=2, device=CPU, num_workers=2)
    np.testing.assert_allclose(workers, inline, atol=1e-6)
    err = capfd.readouterr().err
    assert "img/s" not in err and "%|" not in err  # stderr is not a terminal: no progress bar
    extract_features(xs, recipe_for(xs, 32), paths, batch_size=2, device=CPU, progress=True)
    assert "img" in capfd.readouterr().err


def test_the_plan_can_refuse_a_token_set_without_loading_weights():
    from dinoscale.features.extract import check_token_set
    from dinoscale.models import backbone_facts

    assert check_token_set(backbone_facts("dinov2-vits14"), "last4_cls_mean_patch").n_last == 4
    with pytest.raises(ValueError, match="timm:convnext_atto' has no CLS token"):
        check_token_set(backbone_facts("timm:convnext_atto"), "cls_mean_patch")
