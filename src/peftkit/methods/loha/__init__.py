"""LoHa: low-rank Hadamard product updates, ``h = W₀x + (α/r)·((W1a·W1b) ⊙ (W2a·W2b))·x``
(FedPara, as in LyCORIS); mergeable; on linear layers and 2-D convolutions."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.core.defaults import attention_targets
from peftkit.core.registry import Method, register_method
from peftkit.methods.loha.config import LoHaConfig
from peftkit.methods.loha.layer import SUPPORTED, LoHaLayer, create_loha_layer, is_loha_supported

__all__ = ["LoHaConfig", "LoHaLayer"]


def _prepare(model: nn.Module, config: Any) -> None:
    """Names the default targets (the attention's query and value projections, else every
    linear layer) in the config, so the saved file lists them."""
    if config.target_modules is None:
        config.target_modules = attention_targets(model, is_loha_supported)


METHOD = register_method(
    Method(
        peft_type="LOHA",
        config_cls=LoHaConfig,
        description="LoHa: trains a Hadamard product of two low-rank products beside chosen weights (rank up to r²), mergeable",
        supported=SUPPORTED,
        is_supported=is_loha_supported,
        prepare_config=_prepare,
        default_targets=lambda model: attention_targets(model, is_loha_supported),  # for `peftkit inspect`
        create_layer=create_loha_layer,
        presets={"loha": {"method": {"name": "loha", "r": 8, "alpha": 8}, "train": {"lr": 1e-3}}},
    )
)
