"""(IA)³ layers around linear layers (and GPT-2's ``Conv1D``) and convolutions.

The vectors live in the ``ia3_l`` container, as in Hugging Face PEFT, so that files read
``<path>.ia3_l`` with shape (out, 1) or (1, in) for linear layers and (1, C, 1, …) for
convolutions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.targeting import name_matches
from peftkit.integrations.bitsandbytes import (
    dequantize,
    keep_cpu_layout_usable,
    quantized_kind,
    set_weight,
    to_float_linear,
)
from peftkit.integrations.transformers import is_transformers_conv1d
from peftkit.methods.ia3 import functional as IF
from peftkit.methods.ia3.config import IA3Config

__all__ = ["SUPPORTED", "IA3Layer", "create_ia3_layer", "is_feedforward", "is_ia3_supported"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d, bitsandbytes 4-/8-bit linear"


def is_ia3_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *_CONV_TYPES)) or is_transformers_conv1d(module) or quantized_kind(module) is not None


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """Whether ``module_name`` is one of the config's feed-forward modules (input scaled)."""
    spec = config.feedforward_modules
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(name_matches(module_name, entry) for entry in spec)


def _vector_dtype(weight: torch.Tensor) -> torch.dtype:
    # Half-precision bases keep their vectors in float32: small tensors, stable updates.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class IA3Layer(AdapterLayer):
    """A linear or convolution layer whose outputs (or inputs) each adapter rescales."""

    peft_type = "IA3"
    adapter_containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self._merge_backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.fan_in_fan_out = is_transformers_conv1d(base_layer)
        self.is_conv = isinstance(base_layer, _CONV_TYPES)
        # 4-/8-bit bases (bitsandbytes): vectors in float32; merging dequantises, scales and
        # quantises again
        self.quantized = quantized_kind(base_layer)
        keep_cpu_layout_usable(base_layer)
        w = base_layer.weight
        if self.quantized:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = w.shape[0], w.shape[1]
        else:
            self.in_features, self.out_features = w.shape[1], w.shape[0]

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        """(out, 1) / (1, in) for linear layers; (1, C, 1, …) for convolutions."""
        size = self.in_features if feedforward else self.out_features
        if self.is_conv:
            return (1, size, *([1] * (self.base_layer.weight.dim() - 2)))
        return (1, size) if feedforward else (size, 1)

    def add_adapter(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        feedforward = is_feedforward(config, module_name)
        weight = self.base_layer.weight
        shape = self.vector_shape(feedforward)
        dtype = torch.float32 if self.quantized else _vector_dtype(weight)
        vector = torch.ones(shape, dtype=dtype, device=weight.device)
        if not config.init_ia3_weights:
            with torch.no_grad():
                vector.add_(torch.randn_like(vector) * 0.1)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.feedforward[adapter_name] = feedforward

    def forget_adapter(self, adapter_name: str) -> None:
        self.feedforward.pop(adapter_name, None)
        self._merge_backup.pop(adapter_name, None)

    # -- forward -----------------------------------------------------------------------
    def _channel_scale(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The vector shaped to broadcast over the channel axis of ``like``."""
        if not self.is_conv:
            return vector.reshape(-1)
        return IF.channel_view(vector, self.base_layer.weight.dim() - 2)

    def _scales(self, names: Sequence[str], feedforward: bool) -> torch.Tensor | None:
        scale = None
        for name in names:
            if self.feedforward[name] == feedforward:
                v = self.ia3_l[name]
                scale = v if scale is None else scale * v
        return scale

    def _run_scaled(self, names: Sequence[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``l_out ⊙ base(l_in ⊙ x)`` with the products of the adapters' vectors."""
        scale_in = self._scales(names, feedforward=True)
        if scale_in is not None:
            x = (x * self._channel_scale(scale_in, x)).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        scale_out = self._scales(names, feedforward=False)
        if scale_out is not None:
            result = (result * self._channel_scale(scale_out, result)).to(result.dtype)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.example_adapters is not None:
            groups = self.example_groups(x.shape[0]) or []
            result = self.base_layer(x, *args, **kwargs)
            for name, idx in groups:
                idx = idx.to(x.device)
                result = result.index_copy(0, idx, self._run_scaled([name], x[idx], *args, **kwargs))
            return result
        return self._run_scaled(self.adapters_to_run(), x, *args, **kwargs)

    # -- merging -----------------------------------------------------------------------
    def _factor(self, adapter_name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base_layer
        weight = base.weight if weight is None else weight
        return IF.weight_factor(
            self.ia3_l[adapter_name].detach(),
            weight,
            self.feedforward[adapter_name],
            fan_in_fan_out=self.fan_in_fan_out,
            groups=getattr(base, "groups", 1),
        ).to(weight.dtype)

    @torch.no_grad()
    def _rescale_quantized(self, adapter_name: str, inverse: bool) -> None:
        """Merging on a 4-/8-bit base: the weight dequantised, scaled, and quantised again
        (each merge or unmerge rounds once more)."""
        weight = dequantize(self.base_layer)
        factor = self._factor(adapter_name, weight)
        set_weight(self.base_layer, weight / factor if inverse else weight * factor)
        bias = getattr(self.base_layer, "bias", None)
        if not self.feedforward[adapter_name] and bias is not None:
            vector = self.ia3_l[adapter_name].detach().reshape(-1).to(bias.dtype)
            bias.copy_(bias / vector if inverse else bias * vector)

    def unload(self, merge: bool) -> nn.Module:
        """On a quantised base, merging gives a float ``nn.Linear``: the dequantised weight
        scaled in float32 (no second rounding)."""
        if merge and self.quantized:
            self.base_layer = to_float_linear(self.base_layer)
            self.quantized = None
        return super().unload(merge)

    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        if self.quantized:
            self._rescale_quantized(adapter_name, inverse=False)
            return
        base = self.base_layer
        vector = self.ia3_l[adapter_name].detach()
        bias = getattr(base, "bias", None)
        if bool((vector == 0).any()):
            # Division cannot undo a zero: keep the exact weights for unmerge.
            self._merge_backup[adapter_name] = (base.weight.clone(), None if bias is None else bias.clone())
        base.weight.mul_(self._factor(adapter_name))
        if not self.feedforward[adapter_name] and bias is not None:
            bias.mul_(vector.reshape(-1).to(bias.dtype))

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        if self.quantized:
            self._rescale_quantized(adapter_name, inverse=True)
            return
        base = self.base_layer
        bias = getattr(base, "bias", None)
        backup = self._merge_backup.pop(adapter_name, None)
        if backup is not None:
            base.weight.copy_(backup[0])
            if bias is not None and backup[1] is not None:
                bias.copy_(backup[1])
            return
        base.weight.div_(self._factor(adapter_name))
        if not self.feedforward[adapter_name] and bias is not None:
            bias.div_(self.ia3_l[adapter_name].detach().reshape(-1).to(bias.dtype))


def create_ia3_layer(module: nn.Module, adapter_name: str, config: IA3Config, module_name: str) -> IA3Layer:
    """Wraps ``module`` with an (IA)³ layer holding adapter ``adapter_name``."""
    if not is_ia3_supported(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; (IA)³ supports {SUPPORTED}")
    if is_transformers_conv1d(module):
        config.fan_in_fan_out = True  # recorded for readers of the file that do not detect it
    layer = IA3Layer(module)
    layer.add_adapter(adapter_name, config, module_name)
    layer.set_active([adapter_name])
    return layer
