"""LoRA through peft on a timm DINOv3 backbone.

Two traps (ENVIRONMENT.md): target names like ``["qkv", "proj"]`` also catch ``patch_embed.proj``, so
targets are matched by a regex anchored on ``blocks.<i>.attn|mlp``; and on the ``_qkvb`` variants timm
calls ``F.linear`` on the raw qkv weight, bypassing the adapter, unless ``attn.qkv_bias_separate`` is set.
"""

from __future__ import annotations

from torch import nn

_PARENT = {"qkv": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp"}


def target_regex(targets: list[str] | tuple[str, ...]) -> str:
    unknown = sorted(set(targets) - set(_PARENT))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {sorted(_PARENT)}")
    alts = "|".join(f"{_PARENT[t]}\\.{t}" for t in targets)
    return rf".*blocks\.\d+\.({alts})"


def apply_lora(
    backbone: nn.Module, rank: int = 8, alpha: float = 16.0, targets=("qkv", "proj"), dropout: float = 0.0
) -> nn.Module:
    """Injects LoRA adapters in place and freezes every non-adapter weight. Returns the backbone."""
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft takes seconds to import; lora cells only

    for module in backbone.modules():
        # _qkvb variants: make timm call self.qkv(x) (the LoRA-wrapped layer) and add the bias after
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(list(targets)))
    backbone = inject_adapter_in_model(config, backbone)
    n_adapted = sum(1 for n, _ in backbone.named_modules() if n.endswith("lora_A"))
    if n_adapted == 0:
        raise RuntimeError(
            f"LoRA matched no module for targets {list(targets)}; is this a timm ViT with blocks.<i>.attn?"
        )
    for name, p in backbone.named_parameters():
        p.requires_grad = "lora_" in name
    return backbone


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
