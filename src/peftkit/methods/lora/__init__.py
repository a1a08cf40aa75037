"""LoRA: low-rank updates ``h = W₀x + (α/r)·B·A·x`` (with rsLoRA, DoRA, PiSSA init)."""

from __future__ import annotations

from torch import nn

from peftkit.core.layer import adapter_layers
from peftkit.core.registry import Method, register_method
from peftkit.methods.lora import convert
from peftkit.methods.lora.adaptive import AdaptiveOptions, adaptive_training
from peftkit.methods.lora.combine import add_weighted_lora
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layer import (
    SUPPORTED,
    LoraLayer,
    check_lora_target,
    create_lora_layer,
    is_lora_supported,
)
from peftkit.methods.lora.parameter import parameter_owners

__all__ = ["LoraConfig", "LoraConversion", "LoraLayer", "add_weighted_lora", "convert_to_lora"]

LoraConversion = convert.LoraConversion
convert_to_lora = convert.convert_to_lora


def _trained_biases(model: nn.Module, config: LoraConfig, targets: list[str]) -> list[str]:
    """Existing biases trained with the adapter: every one (``bias="all"``) or those of the
    adapted layers (``"lora_only"``)."""
    if config.bias == "none":
        return []
    if config.bias == "lora_only":
        wanted = set(targets)
        return [
            f"{name}.{bias}"
            for name, layer in adapter_layers(model)
            if name in wanted and isinstance(layer, LoraLayer)
            for bias in layer.adapted_biases()
        ]
    inside = {f"{name}.{child}" for name, layer in adapter_layers(model) for child, _ in layer.named_children() if child != "base_layer"}
    out = []
    for mname, module in model.named_modules():
        if any(mname == i or mname.startswith(i + ".") for i in inside):
            continue
        # `bias` and the likes of nn.MultiheadAttention's `in_proj_bias`
        for pname in module._parameters:
            if (pname == "bias" or pname.endswith("_bias")) and isinstance(module._parameters[pname], nn.Parameter):
                out.append(f"{mname}.{pname}" if mname else pname)
    return out


# Attention projections that LoRA adapts by default, per naming convention (query and value,
# as in the LoRA paper); models that match none get every linear layer.
_DEFAULT_PAIRS = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"), ("c_attn",), ("qkv",), ("query_key_value",))


def _prepare_config(model: nn.Module, config: LoraConfig) -> None:
    """Names the default targets in the config, so the saved file lists them."""
    if config.target_modules is None and not config.target_parameters:
        config.target_modules = _default_targets(model)


def _default_targets(model: nn.Module) -> list[str] | str:
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_lora_supported(module)}
    for pair in _DEFAULT_PAIRS:
        if all(p in leaves for p in pair):
            return list(pair)
    return "all-linear"


METHOD = register_method(
    Method(
        peft_type="LORA",
        config_cls=LoraConfig,
        description="LoRA: trains a low-rank update B·A beside chosen weights (rsLoRA, DoRA, PiSSA init)",
        supported=SUPPORTED,
        is_supported=is_lora_supported,
        create_layer=create_lora_layer,
        check_target=check_lora_target,
        extra_targets=parameter_owners,
        trainable_base_parameters=_trained_biases,
        prepare_config=_prepare_config,
        default=True,
        training_hooks=adaptive_training,
        training_options=AdaptiveOptions,
        presets={
            "lora": {"method": {"name": "lora", "r": 8, "lora_alpha": 16}, "train": {"lr": 1e-3}},
            "dora": {"method": {"name": "lora", "r": 8, "lora_alpha": 16, "use_dora": True}, "train": {"lr": 1e-3}},
            "adaptive_lora": {"method": {"name": "lora", "r": 12, "lora_alpha": 24, "adaptive_target_r": 4}, "train": {"lr": 1e-3}},
        },
        # "convert": what `peftkit convert RUN --to lora` calls: any mergeable adapter -> this method
        extra={"combine": add_weighted_lora, "convert": convert_to_lora},
    )
)
