"""AdaLoRA: LoRA in SVD form, ``h = W₀x + (α/r₀)·P·diag(λ)·Q·x``, whose rank budget moves during
training (``peftkit train`` runs the schedule through the method's training hooks); mergeable."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.core.defaults import attention_targets
from peftkit.core.registry import Method, register_method
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layer import SUPPORTED, AdaLoraLayer, create_adalora_layer, is_adalora_supported
from peftkit.methods.adalora.schedule import AdaLoraHooks, AdaLoraOptions, RankSchedule, adalora_training

__all__ = ["AdaLoraConfig", "AdaLoraHooks", "AdaLoraLayer", "RankSchedule"]


def _prepare(model: nn.Module, config: Any) -> None:
    """Names the default targets (the attention's query and value projections, else every
    linear layer) in the config, so the saved file lists them."""
    if config.target_modules is None:
        config.target_modules = attention_targets(model, is_adalora_supported)


METHOD = register_method(
    Method(
        peft_type="ADALORA",
        config_cls=AdaLoraConfig,
        description="AdaLoRA: LoRA in SVD form whose rank budget moves during training to the modules that matter, mergeable",
        supported=SUPPORTED,
        is_supported=is_adalora_supported,
        prepare_config=_prepare,
        default_targets=lambda model: attention_targets(model, is_adalora_supported),  # for `peftkit inspect`
        create_layer=create_adalora_layer,
        training_hooks=adalora_training,
        training_options=AdaLoraOptions,
        presets={"adalora": {"method": {"name": "adalora", "init_r": 12, "target_r": 4, "lora_alpha": 32},
                             "train": {"lr": 1e-3}}},
    )
)
