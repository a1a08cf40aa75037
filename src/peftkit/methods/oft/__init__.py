"""OFT: orthogonal fine-tuning, the input of a linear layer rotated by trained block-diagonal
Cayley rotations, ``h = W₀·(x·D)``; mergeable (``W' = W·Dᵀ``)."""

from __future__ import annotations

from peftkit.core.registry import Method, register_method
from peftkit.methods.oft.config import OFTConfig
from peftkit.methods.oft.layer import SUPPORTED, OFTLayer, create_oft_layer, is_oft_supported

__all__ = ["OFTConfig", "OFTLayer"]

METHOD = register_method(
    Method(
        peft_type="OFT",
        config_cls=OFTConfig,
        description="OFT: trains block-diagonal rotations of each adapted layer's input (keeps angles between neurons), mergeable",
        supported=SUPPORTED,
        is_supported=is_oft_supported,
        create_layer=create_oft_layer,
        presets={"oft": {"method": {"name": "oft", "oft_block_size": 32, "r": 0}, "train": {"lr": 1e-3}}},
    )
)
