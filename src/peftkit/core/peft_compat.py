"""Pieces of Hugging Face PEFT's public surface that :class:`~peftkit.PeftModel` builds on:
adapter dtypes, key mappings of files, and the modules an adapter state dict addresses."""

from __future__ import annotations

import re

import torch
from torch import nn

from peftkit.core.inplace import InPlaceAdapter
from peftkit.core.layer import adapter_layers
from peftkit.core.modules_to_save import ModulesToSaveWrapper
from peftkit.core.param_copy import ParameterCopyLayer

__all__ = ["apply_key_mapping", "cast_adapter_dtype", "modules_addressed", "targeted_module_names"]


def targeted_module_names(model: nn.Module) -> list[str]:
    return [name for name, layer in adapter_layers(model) if name and not isinstance(layer, ModulesToSaveWrapper)]


def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast: bool) -> None:
    """``autocast``: float16/bfloat16 adapter weights become float32 (as PEFT's
    ``autocast_adapter_dtype=True``); otherwise float weights take the base layer's dtype.
    Trained copies of base modules (``modules_to_save``, in-place and parameter-copy
    methods) keep the dtype of what they copy."""
    low = (torch.float16, torch.bfloat16)
    for _, layer in adapter_layers(model):
        if isinstance(layer, (ModulesToSaveWrapper, InPlaceAdapter, ParameterCopyLayer)):
            continue
        base_weight = getattr(layer.base_layer, "weight", None)
        base_dtype = base_weight.dtype if isinstance(base_weight, torch.Tensor) and base_weight.is_floating_point() else None
        for p in layer.adapter_parameters(adapter_name):
            if not p.is_floating_point():
                continue
            if autocast and p.dtype in low:
                p.data = p.data.float()
            elif not autocast and base_dtype in low and p.dtype != base_dtype:
                p.data = p.data.to(base_dtype)


def apply_key_mapping(state: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """PEFT's ``key_mapping``: regex replacements on keys without their ``base_model.model.`` prefix."""
    if not key_mapping:
        return state
    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        has_prefix = key.startswith(prefix)
        rest = key[len(prefix):] if has_prefix else key
        for pattern, replacement in key_mapping.items():
            rest, n = re.subn(pattern, replacement, rest)
            if n:
                break
        out[(prefix if has_prefix else "") + rest] = value
    return out




def modules_addressed(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The modules an adapter's file keys belong to: for each key the deepest module of
    ``model`` it starts with, unless the rest names that module's own parameter (a
    ``modules_to_save`` copy or a trained base tensor)."""
    modules = dict(model.named_modules())
    found: set[str] = set()
    for key in state_dict:
        parts = key.removeprefix("base_model.model.").split(".")
        for cut in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:cut])
            if name in modules:
                if parts[cut] not in modules[name]._parameters:
                    found.add(name)
                break
    if not found:
        raise ValueError("state_dict addresses no module of the model: its keys name no adapter tensors of its modules")
    return sorted(found)
