"""The LayerNorm-tuning layer: a norm called with an adapter's trained scale and shift."""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.core.param_copy import ParameterCopyLayer

__all__ = ["SUPPORTED", "LNTuningLayer", "create_ln_tuning_layer", "is_norm"]

SUPPORTED = (
    "normalisation layers: nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, batch norms, and modules named *Norm* "
    "whose only parameters are a 1-D weight (and bias), such as LlamaRMSNorm and T5LayerNorm"
)
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with a trainable scale (and shift).

    Besides torch's norms: a module whose class name contains ``Norm``, without
    parameters in submodules, whose own parameters are ``weight`` (and ``bias``), 1-D and
    of the same size.
    """
    own = dict(module.named_parameters(recurse=False))
    if "weight" not in own or set(own) - {"weight", "bias"}:
        return False
    if any(any(True for _ in child.parameters()) for child in module.children()):
        return False
    if not (isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__):
        return False
    return all(p.dim() == 1 and p.shape == own["weight"].shape for p in own.values())


class LNTuningLayer(ParameterCopyLayer):
    """Keeps one trained copy of the norm's parameters per adapter in ``ln_tuning_layers``."""

    peft_type = "LN_TUNING"
    container = "ln_tuning_layers"
    adapter_containers = ("ln_tuning_layers",)

    def parameters_to_copy(self) -> list[str]:
        return [n for n, _ in self.base_layer.named_parameters(recurse=False)]


def create_ln_tuning_layer(module: nn.Module, adapter_name: str, config: Any, module_name: str) -> LNTuningLayer:
    """Wraps the norm ``module`` so that adapter ``adapter_name`` trains a copy of its parameters."""
    if not is_norm(module):
        raise TypeError(f"{module_name} ({type(module).__name__}) is not a normalisation layer; LN tuning adapts {SUPPORTED}")
    layer = LNTuningLayer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
