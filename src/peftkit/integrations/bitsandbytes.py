"""bitsandbytes 4-bit (NF4/FP4) and 8-bit linear layers: recognising, building, and moving
weights in and out of them. Imported lazily; peftkit works without bitsandbytes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["dequantize", "keep_cpu_layout_usable", "quantize_linear", "quantized_bytes", "quantized_kind", "require_bitsandbytes", "set_weight", "standard_layout", "to_float_linear"]


def require_bitsandbytes() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            "4-bit and 8-bit bases need bitsandbytes: `pip install bitsandbytes` (or `pip install peftkit[qlora]`)"
        ) from exc
    return bnb


def quantized_kind(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for bitsandbytes linear layers, else None (no import needed)."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return "4bit"
    if name == "Linear8bitLt":
        return "8bit"
    return None


def keep_cpu_layout_usable(module: nn.Module) -> None:
    """On CPUs with AVX512-BF16, a 4-bit layer's first no-grad evaluation re-packs its
    weight into a CPU-specific layout, which fails for layers whose input width is not a
    multiple of the quantisation block or whose output width is not a multiple of 32.
    Such layers keep the portable layout (same results, no fast CPU kernel)."""
    if quantized_kind(module) != "4bit" or not getattr(module, "support_avx512bf16_for_cpu", False):
        return
    qs = getattr(module.weight, "quant_state", None)
    blocksize = getattr(qs, "blocksize", 64) or 64
    if module.in_features % blocksize or module.out_features % 32:
        module.support_avx512bf16_for_cpu = False


def standard_layout(module: nn.Module) -> None:
    """Puts a 4-bit weight that bitsandbytes re-packed for its CPU kernel back into the
    standard layout (as bitsandbytes does before saving), so it can be read and
    dequantised. The CPU layout keeps the block scales in bfloat16: that rounding stays."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None or not getattr(qs, "packing_format_for_cpu", False):
        return
    from bitsandbytes import functional

    weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(weight.data, qs)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float32 (out × in) tensor (a new tensor)."""
    kind = quantized_kind(module)
    weight = module.weight
    if kind == "4bit":
        from bitsandbytes.functional import dequantize_4bit

        standard_layout(module)
        weight = module.weight
        return dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "8bit":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        return weight.data.float() * (scb.float().view(-1, 1) / 127.0)
    return weight.detach().float()


def _params4bit(data: torch.Tensor, like: Any) -> Any:
    bnb = require_bitsandbytes()
    qs = like.quant_state
    return bnb.nn.Params4bit(
        data.to(torch.float32).cpu() if data.device.type == "cpu" else data, requires_grad=False, quant_type=qs.quant_type,
        compress_statistics=like.compress_statistics, blocksize=qs.blocksize,
    )


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantises ``weight`` (out × in, float) into ``module`` in place of its weight."""
    bnb = require_bitsandbytes()
    kind = quantized_kind(module)
    device = module.weight.device
    if kind == "4bit":
        module.weight = _params4bit(weight.detach().float().cpu(), module.weight).to(device)
    elif kind == "8bit":
        module.weight = bnb.nn.Int8Params(weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        if hasattr(module, "state"):
            module.state.SCB = None
            module.state.CB = None
    else:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes layer")


def to_float_linear(module: nn.Module, dtype: torch.dtype = torch.float32, weight: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantised weight (or ``weight``) and the bias."""
    w = dequantize(module) if weight is None else weight
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        if module.bias is not None:
            out.bias.copy_(module.bias.to(dtype))
    out.requires_grad_(False)
    return out


def quantize_linear(linear: nn.Linear, bits: int, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes layer with ``linear``'s weight quantised (bias kept in full precision)."""
    bnb = require_bitsandbytes()
    device = linear.weight.device
    w = linear.weight.detach().float().cpu()
    if bits == 4:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant)
        keep_cpu_layout_usable(q)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype if bits == 4 else linear.bias.dtype).cpu(), requires_grad=False)
    return q.to(device)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes a quantised layer's weight takes, its quantisation statistics included."""
    weight = module.weight
    total = weight.numel() * weight.element_size()
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        total += qs.absmax.numel() * qs.absmax.element_size()
        inner = getattr(qs, "state2", None)
        if inner is not None:
            total += inner.absmax.numel() * inner.absmax.element_size() + inner.code.numel() * inner.code.element_size()
    scb = getattr(weight, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return total
