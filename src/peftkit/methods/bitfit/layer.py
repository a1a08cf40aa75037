"""The BitFit layer: a module called with an adapter's trained copy of its bias."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.core.param_copy import ParameterCopyLayer

__all__ = ["SUPPORTED", "BitFitLayer", "create_bitfit_layer", "has_bias"]

SUPPORTED = "any module with a `bias` parameter (linear, Conv1D, convolutions, LayerNorm, ...)"


def has_bias(module: nn.Module) -> bool:
    """Whether ``module`` owns a trainable-shaped ``bias`` parameter."""
    return isinstance(module._parameters.get("bias"), nn.Parameter)


class BitFitLayer(ParameterCopyLayer):
    """Keeps one trained bias per adapter in ``bitfit``; saved as ``<path>.bias``."""

    peft_type = "BITFIT"
    container = "bitfit"
    adapter_containers = ("bitfit",)

    def parameters_to_copy(self) -> list[str]:
        return ["bias"]

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.bitfit:
            return {}
        return {"bias": self.bitfit[adapter_name].bias}


def create_bitfit_layer(module: nn.Module, adapter_name: str, config: Any, module_name: str) -> BitFitLayer:
    """Wraps ``module`` so that adapter ``adapter_name`` trains a copy of its bias."""
    if not has_bias(module):
        raise TypeError(f"{module_name} ({type(module).__name__}) has no bias; BitFit adapts {SUPPORTED}")
    layer = BitFitLayer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
