"""LoKr: Kronecker-product updates, ``h = W₀x + (α/r)·(W1 ⊗ W2)·x`` (as in LyCORIS);
mergeable; on linear layers and 2-D convolutions."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.core.defaults import attention_targets
from peftkit.core.registry import Method, register_method
from peftkit.methods.lokr.config import LoKrConfig
from peftkit.methods.lokr.layer import SUPPORTED, LoKrLayer, create_lokr_layer, factorize, is_lokr_supported

__all__ = ["LoKrConfig", "LoKrLayer", "factorize"]


def _prepare(model: nn.Module, config: Any) -> None:
    """Names the default targets (the attention's query and value projections, else every
    linear layer) in the config, so the saved file lists them."""
    if config.target_modules is None:
        config.target_modules = attention_targets(model, is_lokr_supported)


METHOD = register_method(
    Method(
        peft_type="LOKR",
        config_cls=LoKrConfig,
        description="LoKr: trains a Kronecker product of a small and a low-rank factor beside chosen weights, mergeable",
        supported=SUPPORTED,
        is_supported=is_lokr_supported,
        prepare_config=_prepare,
        default_targets=lambda model: attention_targets(model, is_lokr_supported),  # for `peftkit inspect`
        create_layer=create_lokr_layer,
        presets={"lokr": {"method": {"name": "lokr", "r": 8, "alpha": 8}, "train": {"lr": 1e-3}}},
    )
)
