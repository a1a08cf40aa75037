"""AdaLoRA layers around ``nn.Linear``: LoRA in SVD form.

The triplets live in ``lora_A`` (Q, r × in), ``lora_E`` (λ, r × 1) and ``lora_B`` (P, out × r),
as in Hugging Face PEFT's files (no ``.weight`` suffix). The scale is ``α/r₀`` with r₀ the
rank the adapter started with, which pruning does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.delta import DeltaLayer
from peftkit.methods.adalora.config import AdaLoraConfig

__all__ = ["SUPPORTED", "AdaLoraLayer", "create_adalora_layer", "is_adalora_supported"]

SUPPORTED = "nn.Linear"


def is_adalora_supported(module: nn.Module) -> bool:
    return type(module) is nn.Linear


class AdaLoraLayer(DeltaLayer):
    """``h = W₀x + (α/r₀)·P·diag(λ)·Q·x``."""

    peft_type = "ADALORA"
    adapter_containers = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.initial_rank: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.out_features, self.in_features = base_layer.weight.shape

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig, module_name: str) -> None:
        kept = config.kept(module_name)
        if kept is not None and len(kept) != config.init_r:
            raise ValueError(f"rank_pattern['{module_name}.lora_E'] has {len(kept)} entries but init_r is {config.init_r}")
        r = config.init_r if kept is None else sum(kept)
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        a, e, b = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        if config.init_lora_weights:
            e.zero_()  # λ = 0: the output is unchanged at first
            a.normal_(0.0, 0.02)
            b.normal_(0.0, 0.02)
        for container, value in ((self.lora_A, a), (self.lora_E, e), (self.lora_B, b)):
            container[adapter_name] = nn.Parameter(value.to(device=weight.device, dtype=dtype))
        self.initial_rank[adapter_name] = config.init_r
        self.lora_alpha[adapter_name] = float(config.lora_alpha) if config.lora_alpha > 0 else float(config.init_r)
        self.dropout[adapter_name] = float(config.lora_dropout)

    def forget_adapter(self, adapter_name: str) -> None:
        super().forget_adapter(adapter_name)
        for d in (self.initial_rank, self.lora_alpha, self.dropout):
            d.pop(adapter_name, None)

    def scaling(self, adapter_name: str) -> float:
        """``α/r₀`` (with Hugging Face PEFT's 1e-5 added to r₀)."""
        return self.lora_alpha[adapter_name] / (self.initial_rank[adapter_name] + 1e-5)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        return (b @ (a * e)) * self.scaling(adapter_name)

    def delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        x = x.to(a.dtype)
        p = self.dropout[adapter_name]
        if p > 0:
            x = F.dropout(x, p, self.training)
        return F.linear(F.linear(x, a * e), b) * self.scaling(adapter_name)

    @torch.no_grad()
    def keep_triplets(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Cuts the adapter down to the triplets where ``keep`` (a bool per triplet) is True;
        the scale ``α/r₀`` stays."""
        idx = keep.nonzero().flatten().to(self.lora_A[adapter_name].device)
        for container, dim in ((self.lora_A, 0), (self.lora_E, 0), (self.lora_B, 1)):
            old = container[adapter_name]
            container[adapter_name] = nn.Parameter(old.detach().index_select(dim, idx).clone(), requires_grad=old.requires_grad)


def create_adalora_layer(module: nn.Module, adapter_name: str, config: AdaLoraConfig, module_name: str) -> AdaLoraLayer:
    """Wraps ``module`` with an AdaLoRA layer holding adapter ``adapter_name``."""
    if not is_adalora_supported(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; AdaLoRA supports {SUPPORTED}")
    layer = AdaLoraLayer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
