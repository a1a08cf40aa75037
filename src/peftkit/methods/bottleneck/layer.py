"""Bottleneck adapter layers, wrapped around linear layers (never edits model code)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.integrations.transformers import is_linear_like, is_transformers_conv1d
from peftkit.methods.bottleneck.config import BottleneckConfig

__all__ = ["SUPPORTED", "BottleneckLayer", "create_bottleneck_layer"]

SUPPORTED = "nn.Linear, transformers Conv1D (the adapter sits on the layer's output, or beside it)"
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _dims(module: nn.Module) -> tuple[int, int]:
    if is_transformers_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class BottleneckLayer(AdapterLayer):
    """A linear layer followed (sequential) or accompanied (parallel) by bottleneck adapters."""

    peft_type = "BOTTLENECK"
    adapter_containers = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.parallel: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.activation: dict[str, str] = {}
        self._trained_scaling: dict[str, float] = {}

    def add_adapter(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        d_in, d_out = _dims(self.base_layer)
        parallel = config.variant == "parallel"
        source = d_in if parallel else d_out
        m = config.size_for(d_out)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() and weight.dtype not in (torch.float16, torch.bfloat16) else torch.float32
        down = nn.Linear(source, m, dtype=dtype, device=weight.device)
        up = nn.Linear(m, d_out, dtype=dtype, device=weight.device)
        nn.init.zeros_(up.weight)  # near identity: the adapter adds nothing at first
        nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.parallel[adapter_name] = parallel
        self.scaling[adapter_name] = config.scaling if parallel else 1.0
        self.activation[adapter_name] = config.non_linearity

    def forget_adapter(self, adapter_name: str) -> None:
        for d in (self.parallel, self.scaling, self.activation, self._trained_scaling):
            d.pop(adapter_name, None)

    def merge_one(self, adapter_name: str) -> None:
        raise NotImplementedError(
            "bottleneck adapters are non-linear and cannot be merged into the weights; keep them as layers "
            "(unload() removes them), or use LoRA / (IA)³ where merging matters"
        )

    def scale_adapter(self, adapter_name: str, alpha: float) -> None:
        """The adapter's output is multiplied by α (0 = base model, 1 = as trained)."""
        trained = self._trained_scaling.setdefault(adapter_name, self.scaling[adapter_name])
        self.scaling[adapter_name] = trained * alpha

    def _adapter(self, name: str, h: torch.Tensor) -> torch.Tensor:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return up(_ACTIVATIONS[self.activation[name]](down(h.to(down.weight.dtype)))) * self.scaling[name]

    def _apply_one(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        source = x if self.parallel[name] else result
        return result + self._adapter(name, source).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.example_adapters is not None:
            for name, idx in self.example_groups(x.shape[0]) or []:
                idx = idx.to(x.device)
                part = self._apply_one(name, x[idx], result[idx]) - result[idx]
                result = result.index_add(0, idx, part)
            return result
        for name in self.adapters_to_run():
            result = self._apply_one(name, x, result)
        return result


def create_bottleneck_layer(module: nn.Module, adapter_name: str, config: BottleneckConfig, module_name: str) -> BottleneckLayer:
    if not is_linear_like(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; bottleneck adapters support {SUPPORTED}")
    layer = BottleneckLayer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
