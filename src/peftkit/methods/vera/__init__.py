"""VeRA: shared frozen random projections, trained scaling vectors,
``h = W₀x + λ_b ⊙ (B·(λ_d ⊙ (A·x)))``; mergeable; on linear layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.core.defaults import attention_targets
from peftkit.core.layer import adapter_layers
from peftkit.core.registry import Method, register_method
from peftkit.core.targeting import find_targets
from peftkit.methods.vera.config import VeraConfig
from peftkit.methods.vera.layer import SUPPORTED, SharedProjections, VeraLayer, create_vera_layer, is_vera_supported

__all__ = ["SharedProjections", "VeraConfig", "VeraLayer"]


def _prepare(model: nn.Module, config: VeraConfig) -> None:
    """Draws the adapter's projections for the largest input and output among the targets
    (before any layer is wrapped, so that every layer slices the same ones)."""
    if config.target_modules is None:
        config.target_modules = attention_targets(model, is_vera_supported)
    inside = [f"{name}.{child}" for name, layer in adapter_layers(model) for child, _ in layer.named_children()]
    targets = find_targets(
        model, config.target_modules,
        is_supported=lambda m: isinstance(m, VeraLayer) or is_vera_supported(m), supported=SUPPORTED,
        exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern, skip=inside + list(config.modules_to_save or []),
    )
    shapes = [getattr(model.get_submodule(n), "base_layer", model.get_submodule(n)).weight.shape for n in targets]
    out_max, in_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    # one holder per model: a second adapter's projections join the first one's
    held = [layer.vera_projections for _, layer in adapter_layers(model) if isinstance(layer, VeraLayer)]
    projections = held[0] if held else SharedProjections()
    weight = shapes and getattr(model.get_submodule(targets[0]), "base_layer", model.get_submodule(targets[0])).weight
    a, b = SharedProjections.draw(config.r, in_max, out_max, config.projection_prng_key)
    projections.pending = (a.to(weight.device), b.to(weight.device))
    config._projections = projections  # type: ignore[attr-defined]  # read by the layers, never saved


def _adapter_projections(model: nn.Module, adapter_name: str, config: Any) -> dict[str, torch.Tensor]:
    """``vera_A``/``vera_B`` (file keys ``base_model.vera_A``/``base_model.vera_B``) when the config saves them."""
    if not config.save_projection:
        return {}
    for _, layer in adapter_layers(model):
        if isinstance(layer, VeraLayer) and adapter_name in layer.vera_lambda_b:
            a, b = layer.vera_projections.get(adapter_name)
            return {"vera_A": a, "vera_B": b}
    return {}


METHOD = register_method(
    Method(
        peft_type="VERA",
        config_cls=VeraConfig,
        description="VeRA: trains two vectors per layer that scale random projections shared by all layers (tiny), mergeable",
        supported=SUPPORTED,
        is_supported=is_vera_supported,
        default_targets=lambda model: attention_targets(model, is_vera_supported),  # for `peftkit inspect`
        create_layer=create_vera_layer,
        prepare_config=_prepare,
        shared_state=_adapter_projections,
        presets={"vera": {"method": {"name": "vera", "r": 256}, "train": {"lr": 1e-2}}},
    )
)
