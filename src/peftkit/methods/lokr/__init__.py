"""LoKr: Kronecker-product updates, ``h = W₀x + (α/r)·(W1 ⊗ W2)·x`` (as in LyCORIS);
mergeable; on linear layers and 2-D convolutions."""

from __future__ import annotations

from peftkit.core.registry import Method, register_method
from peftkit.methods.lokr.config import LoKrConfig
from peftkit.methods.lokr.layer import SUPPORTED, LoKrLayer, create_lokr_layer, factorize, is_lokr_supported

__all__ = ["LoKrConfig", "LoKrLayer", "factorize"]

METHOD = register_method(
    Method(
        peft_type="LOKR",
        config_cls=LoKrConfig,
        description="LoKr: trains a Kronecker product of a small and a low-rank factor beside chosen weights, mergeable",
        supported=SUPPORTED,
        is_supported=is_lokr_supported,
        create_layer=create_lokr_layer,
        presets={"lokr": {"method": {"name": "lokr", "r": 8, "alpha": 8}, "train": {"lr": 1e-3}}},
    )
)
