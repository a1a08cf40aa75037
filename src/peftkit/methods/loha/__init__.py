"""LoHa: low-rank Hadamard product updates, ``h = W₀x + (α/r)·((W1a·W1b) ⊙ (W2a·W2b))·x``
(FedPara, as in LyCORIS); mergeable; on linear layers and 2-D convolutions."""

from __future__ import annotations

from peftkit.core.registry import Method, register_method
from peftkit.methods.loha.config import LoHaConfig
from peftkit.methods.loha.layer import SUPPORTED, LoHaLayer, create_loha_layer, is_loha_supported

__all__ = ["LoHaConfig", "LoHaLayer"]

METHOD = register_method(
    Method(
        peft_type="LOHA",
        config_cls=LoHaConfig,
        description="LoHa: trains a Hadamard product of two low-rank products beside chosen weights (rank up to r²), mergeable",
        supported=SUPPORTED,
        is_supported=is_loha_supported,
        create_layer=create_loha_layer,
        presets={"loha": {"method": {"name": "loha", "r": 8, "alpha": 8}, "train": {"lr": 1e-3}}},
    )
)
