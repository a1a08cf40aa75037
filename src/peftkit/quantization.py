"""Quantised bases (QLoRA): 4-bit NF4/FP4 or 8-bit frozen weights with adapters trained in
full precision beside them. Needs bitsandbytes (imported only when these functions run)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.core.targeting import name_matches
from peftkit.integrations.bitsandbytes import (
    keep_cpu_layout_usable,
    quantize_linear,
    quantized_bytes,
    quantized_kind,
    require_bitsandbytes,
)
from peftkit.integrations.transformers import enable_input_require_grads, output_head_names

__all__ = ["memory_report", "prepare_model_for_kbit_training", "quantize_model", "save_quantized"]


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Replaces the ``nn.Linear`` layers of ``model`` by bitsandbytes 4-bit or 8-bit layers.

    The output head and the modules named in ``skip_modules`` (names or dot-suffixes) stay in
    full precision. Everything is checked before the first layer is replaced.

    Args:
        model: the model (modified in place).
        bits: 4 (NF4/FP4, 0.5 byte per weight plus block statistics) or 8 (int8 with a scale per row).
        quant_type: ``"nf4"`` (normal-float, the QLoRA choice) or ``"fp4"``; 4-bit only.
        double_quant: quantise the 4-bit block statistics too (about 0.37 bit per weight saved).
        compute_dtype: dtype of the 4-bit layers' matrix products (float32 on CPU, bfloat16 on GPU).
        skip_modules: modules to keep in full precision.

    Returns:
        ``model``.
    """
    require_bitsandbytes()
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    skip = list(skip_modules or [])
    names = [n for n, _ in model.named_modules()]
    unknown = [s for s in skip if not any(name_matches(n, s) for n in names)]
    if unknown:
        raise ValueError(f"skip_modules {unknown} match no module of {type(model).__name__}")
    heads = set(output_head_names(model))
    targets = [
        n for n, m in model.named_modules()
        if type(m) is nn.Linear and n not in heads and not any(name_matches(n, s) for s in skip)
    ]
    if not targets:
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight") and "Linear" not in type(m).__name__})[:6]
        raise TypeError(
            f"{type(model).__name__} has no nn.Linear layer to quantise; bitsandbytes quantises nn.Linear only "
            f"(found layer types such as {kinds}; GPT-2's Conv1D cannot be quantised)"
        )
    replacements = [(n, quantize_linear(model.get_submodule(n), bits, quant_type, double_quant, compute_dtype)) for n in targets]
    for name, layer in replacements:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare_model_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Readies a quantised model for adapter training: every base weight frozen,
    normalisation layers in float32 (their statistics are precision-sensitive), inputs made to
    require grad so gradients flow through checkpointed frozen blocks."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        keep_cpu_layout_usable(module)
        if "Norm" in type(module).__name__:
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enable_input_require_grads(model)
    return model


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of frozen weights (quantised ones at their packed size, statistics included),
    of trainable weights, and the AdamW state those need (two float32 moments each)."""
    frozen = trainable = quantized = 0
    counted: set[int] = set()
    for module in model.modules():
        if quantized_kind(module):
            quantized += quantized_bytes(module)
            counted.add(id(module.weight))
    for p in model.parameters():
        if id(p) in counted:
            continue
        size = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += size
        else:
            frozen += size
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "frozen_bytes": frozen + quantized,
        "quantized_bytes": quantized,
        "trainable_bytes": trainable,
        "optimizer_bytes": 2 * 4 * n_trainable,
        "total_bytes": frozen + quantized + trainable + 2 * 4 * n_trainable,
    }


def save_quantized(model: nn.Module, path: str, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Writes a transformers model (e.g. a merged one) to ``path`` quantised by bitsandbytes,
    as a folder that ``from_pretrained`` loads as a 4-bit or 8-bit model with no further
    settings (its ``config.json`` carries the ``quantization_config``).

    The weights are quantised from the model's full-precision values, so a model merged from
    a quantised base is rounded once more (dequantised base plus update, quantised again).
    """
    import tempfile

    require_bitsandbytes()
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if not hasattr(model, "save_pretrained") or not hasattr(type(model), "from_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model; only those can be saved quantised")
    if any(quantized_kind(m) for m in model.modules()):
        raise ValueError("the model is already quantised; merge or dequantise it first")
    from transformers import BitsAndBytesConfig

    settings = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                   bnb_4bit_compute_dtype=compute_dtype)
                if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path)) or ".") as scratch:
        model.save_pretrained(scratch)
        quantised = type(model).from_pretrained(scratch, quantization_config=settings,
                                                device_map={"": device.index if device.type == "cuda" else "cpu"})
        quantised.save_pretrained(path)
