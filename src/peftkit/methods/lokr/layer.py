"""LoKr layers around ``nn.Linear`` and ``nn.Conv2d``.

Factors live in ``lokr_w1`` (or ``lokr_w1_a``/``lokr_w1_b``), ``lokr_w2`` (or
``lokr_w2_a``/``lokr_w2_b``, and ``lokr_t2`` for a Tucker-factored kernel), as in Hugging
Face PEFT and LyCORIS.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.core.delta import DeltaLayer, drop_ranks
from peftkit.methods.loha.layer import tucker_kernel
from peftkit.methods.lokr.config import LoKrConfig

__all__ = ["SUPPORTED", "LoKrLayer", "create_lokr_layer", "factorize", "is_lokr_supported", "kron_delta"]

SUPPORTED = "nn.Linear, nn.Conv2d"


def is_lokr_supported(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d)


def factorize(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension``: ``(factor, dimension / factor)`` when ``factor``
    divides it; else the divisor pair nearest the square root (``m ≤ n``), with ``m`` at
    most ``factor`` when one is given. ``factorize(32) = (4, 8)``, ``factorize(37) = (1, 37)``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    candidate = 2
    while m < n:
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
        candidate += 1
    return (n, m) if m > n else (m, n)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale·W1 ⊗ W2``; a 4-D ``W2`` (a kernel) keeps its kernel axes."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()) * scale


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKrLayer(DeltaLayer):
    """``h = W₀x + (α/r)·(W1 ⊗ W2)·x``."""

    peft_type = "LOKR"
    adapter_containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_containers:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, tuple[float, bool]] = {}

    def add_adapter(self, adapter_name: str, config: LoKrConfig, module_name: str) -> None:
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        weight = self.base_layer.weight
        out_l, out_k = factorize(weight.shape[0], config.decompose_factor)
        in_m, in_n = factorize(weight.shape[1], config.decompose_factor)
        kernel = tuple(weight.shape[2:])
        full_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        full_w2 = r >= max(out_k, in_n) / 2
        effective = config.use_effective_conv2d and len(kernel) == 2 and kernel != (1, 1)
        new: dict[str, torch.Tensor] = {}
        if full_w1:
            new["lokr_w1"] = torch.empty(out_l, in_m)
        else:
            new["lokr_w1_a"], new["lokr_w1_b"] = torch.empty(out_l, r), torch.empty(r, in_m)
        if full_w2:
            new["lokr_w2"] = torch.empty(out_k, in_n, *kernel)
        elif effective:
            new["lokr_t2"] = torch.empty(r, r, *kernel)
            new["lokr_w2_a"], new["lokr_w2_b"] = torch.empty(r, out_k), torch.empty(r, in_n)
        else:
            new["lokr_w2_a"], new["lokr_w2_b"] = torch.empty(out_k, r), torch.empty(r, in_n * math.prod(kernel))
        # True: W1 (or W1a) starts at zero; "lycoris": W2 (or W2b) does; False: nothing does
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(config.init_weights, ())
        for key, t in new.items():
            if key in zero:
                nn.init.zeros_(t)
            else:
                _kaiming(t)
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        for key, t in new.items():
            getattr(self, key)[adapter_name] = nn.Parameter(t.to(device=weight.device, dtype=dtype))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = (float(config.rank_dropout), bool(config.rank_dropout_scale))
        self.module_dropout[adapter_name] = float(config.module_dropout)

    def forget_adapter(self, adapter_name: str) -> None:
        super().forget_adapter(adapter_name)
        for d in (self.r, self.scaling, self.rank_dropout):
            d.pop(adapter_name, None)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W1, W2)`` of one adapter, multiplied out where they are stored factored."""
        name = adapter_name
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = tucker_kernel(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1, w2 = self.factors(adapter_name)
        delta = kron_delta(w1, w2, self.scaling[adapter_name]).reshape(self.base_layer.weight.shape)
        p, rescale = self.rank_dropout[adapter_name]
        if p > 0 and self.dropping():
            delta = drop_ranks(delta, p, rescale)
        return delta


def create_lokr_layer(module: nn.Module, adapter_name: str, config: LoKrConfig, module_name: str) -> LoKrLayer:
    """Wraps ``module`` with a LoKr layer holding adapter ``adapter_name``."""
    if not is_lokr_supported(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; LoKr supports {SUPPORTED}")
    layer = LoKrLayer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
