"""OFT: orthogonal fine-tuning, the input of a linear layer rotated by trained block-diagonal
Cayley rotations, ``h = W₀·(x·D)``; mergeable (``W' = W·Dᵀ``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.core.defaults import attention_targets
from peftkit.core.registry import Method, register_method
from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.oft.layer import SUPPORTED, OFTLayer, create_oft_layer, is_oft_supported

__all__ = ["OFTConfig", "OFTLayer"]


def _prepare(model: nn.Module, config: Any) -> None:
    """Names the default targets (the attention's query and value projections, else every
    linear layer) in the config, so the saved file lists them."""
    if config.target_modules is None:
        config.target_modules = attention_targets(model, is_oft_supported)


METHOD = register_method(
    Method(
        peft_type="OFT",
        config_cls=OFTConfig,
        description="OFT: trains block-diagonal rotations of each adapted layer's input (keeps angles between neurons), mergeable",
        supported=SUPPORTED,
        is_supported=is_oft_supported,
        prepare_config=_prepare,
        default_targets=lambda model: attention_targets(model, is_oft_supported),  # for `peftkit inspect`
        create_layer=create_oft_layer,
        presets={"oft": {"method": {"name": "oft", "oft_block_size": 32, "r": 0}, "train": {"lr": 1e-3}}},
    )
)
