"""LoHa layers around ``nn.Linear`` and ``nn.Conv2d``.

Factors live in the containers ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``
(and ``hada_t1``, ``hada_t2`` for Tucker-factored kernels), as in Hugging Face PEFT and
LyCORIS, so that files read ``<path>.hada_w1_a`` and so on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.core.delta import DeltaLayer, drop_ranks
from peftkit.methods.loha.config import LoHaConfig

__all__ = ["SUPPORTED", "LoHaLayer", "create_loha_layer", "hadamard_delta", "is_loha_supported", "tucker_kernel"]

SUPPORTED = "nn.Linear, nn.Conv2d"


def is_loha_supported(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d)


def tucker_kernel(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """``K[p, q, k, l] = Σᵢⱼ core[i, j, k, l]·out_factor[i, p]·in_factor[j, q]``: a kernel of shape
    (out, in, k, l) from a core (r, r, k, l) and factors (r, out), (r, in)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, out_factor, in_factor)


def hadamard_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                   scale: float, t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """``ΔW = scale·(W1a·W1b) ⊙ (W2a·W2b)``; with Tucker cores, ``scale·K(t1) ⊙ K(t2)``."""
    if t1 is not None and t2 is not None:
        return tucker_kernel(t1, w1a, w1b) * tucker_kernel(t2, w2a, w2b) * scale
    return (w1a @ w1b) * (w2a @ w2b) * scale


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoHaLayer(DeltaLayer):
    """``h = W₀x + ΔW·x`` with ``ΔW`` a Hadamard product of two low-rank products."""

    peft_type = "LOHA"
    adapter_containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_containers:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}

    def add_adapter(self, adapter_name: str, config: LoHaConfig, module_name: str) -> None:
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        weight = self.base_layer.weight
        out_dim = weight.shape[0]
        kernel = tuple(weight.shape[2:])
        effective = config.use_effective_conv2d and len(kernel) == 2 and kernel != (1, 1)
        new = {}
        if effective:
            in_dim = weight.shape[1]
            new["hada_t1"] = torch.empty(r, r, *kernel)
            new["hada_t2"] = torch.empty(r, r, *kernel)
            new["hada_w1_a"], new["hada_w1_b"] = torch.empty(r, out_dim), torch.empty(r, in_dim)
            new["hada_w2_a"], new["hada_w2_b"] = torch.empty(r, out_dim), torch.empty(r, in_dim)
        else:
            in_dim = weight[0].numel()
            new["hada_w1_a"], new["hada_w1_b"] = torch.empty(out_dim, r), torch.empty(r, in_dim)
            new["hada_w2_a"], new["hada_w2_b"] = torch.empty(out_dim, r), torch.empty(r, in_dim)
        for key, t in new.items():
            if key == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(t)  # one zero factor: ΔW = 0 at first
            else:
                _kaiming(t)
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        for key, t in new.items():
            getattr(self, key)[adapter_name] = nn.Parameter(t.to(device=weight.device, dtype=dtype))
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = float(config.rank_dropout)
        self.module_dropout[adapter_name] = float(config.module_dropout)

    def forget_adapter(self, adapter_name: str) -> None:
        super().forget_adapter(adapter_name)
        for d in (self.r, self.scaling, self.rank_dropout):
            d.pop(adapter_name, None)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        t1 = self.hada_t1[adapter_name] if adapter_name in self.hada_t1 else None
        t2 = self.hada_t2[adapter_name] if adapter_name in self.hada_t2 else None
        delta = hadamard_delta(
            self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name],
            self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name],
            self.scaling[adapter_name], t1, t2,
        ).reshape(self.base_layer.weight.shape)
        p = self.rank_dropout[adapter_name]
        if p > 0 and self.dropping():
            delta = drop_ranks(delta, p)
        return delta


def create_loha_layer(module: nn.Module, adapter_name: str, config: LoHaConfig, module_name: str) -> LoHaLayer:
    """Wraps ``module`` with a LoHa layer holding adapter ``adapter_name``."""
    if not is_loha_supported(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; LoHa supports {SUPPORTED}")
    layer = LoHaLayer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
