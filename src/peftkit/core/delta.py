"""Layers whose adapters each add a weight delta: ``h = base(x) + ΔW·x``.

Several methods differ only in how they build ``ΔW`` from their factors (a Hadamard or a
Kronecker product, shared random projections scaled by vectors, an SVD triplet). A layer
derived from :class:`DeltaLayer` says how (``delta_weight``) and, where the factors give a
cheaper product than the full matrix, how to apply it to an input (``delta_output``); the
forward pass, per-example adapters, merging, unmerging and strength scaling are here.

Merging adds ``ΔW`` to the base weight; unmerging subtracts the same ``ΔW`` again, so the
weights come back within one rounding per entry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import AdapterLayer

__all__ = ["DeltaLayer", "apply_weight", "module_dropped"]

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def apply_weight(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` applied to ``x`` the way ``base`` applies its own weight, without the bias:
    a matrix product for linear layers, a convolution with the base's stride, padding,
    dilation and groups for convolutions."""
    conv = _CONV.get(type(base)) or next((f for t, f in _CONV.items() if isinstance(base, t)), None)
    if conv is None:
        return F.linear(x, weight)
    if base.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={base.padding_mode!r}: only zero padding is supported")
    return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


def module_dropped(p: float, training: bool) -> bool:
    """Module dropout: whether to skip an adapter for this whole step (probability ``p``)."""
    return training and p > 0 and bool(torch.rand(()) < p)


def drop_ranks(delta: torch.Tensor, p: float, rescale: bool = True) -> torch.Tensor:
    """Rank dropout (LyCORIS, LoHa/LoKr): each output row of ``delta`` dropped with probability
    ``p``; with ``rescale`` the kept rows are divided by the share kept, so the mean is unchanged."""
    keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(1e-12)
    return delta * keep.view(-1, *([1] * (delta.dim() - 1)))


class DeltaLayer(AdapterLayer):
    """A linear or convolution layer plus adapters that each add ``ΔW`` (shaped like the
    base weight). Subclasses implement ``delta_weight`` and may override ``delta_output``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # strength of each adapter relative to how it was trained (scale_adapter)
        self.strength: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self._merging = False

    def dropping(self) -> bool:
        """Whether training-time dropout of ``ΔW`` applies now (never while merging)."""
        return self.training and not self._merging

    # -- what a method defines ---------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - abstract
        """``ΔW`` of one adapter, shaped like the base weight, with autograd."""
        raise NotImplementedError

    def delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``ΔW·x``; by default through the full ``ΔW``."""
        weight = self.delta_weight(adapter_name)
        return apply_weight(self.base_layer, weight, x.to(weight.dtype))

    # -- forward -----------------------------------------------------------------------
    def _scaled_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        out = self.delta_output(name, x)
        strength = self.strength.get(name, 1.0)
        return out if strength == 1.0 else out * strength

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        groups = self.example_groups(x.shape[0])
        if groups is not None:
            for name, idx in groups:
                idx = idx.to(x.device)
                result = result.index_add(0, idx, self._scaled_delta(name, x[idx]).to(result.dtype))
            return result
        for name in self.adapters_to_run():
            if module_dropped(self.module_dropout.get(name, 0.0), self.training):
                continue
            result = result + self._scaled_delta(name, x).to(result.dtype)
        return result

    # -- merging -----------------------------------------------------------------------
    def _merge_delta(self, adapter_name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        self._merging = True
        try:
            with torch.no_grad():
                delta = self.delta_weight(adapter_name) * self.strength.get(adapter_name, 1.0)
        finally:
            self._merging = False
        return delta.to(dtype=weight.dtype, device=weight.device)

    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        self.base_layer.weight.add_(self._merge_delta(adapter_name))

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        self.base_layer.weight.sub_(self._merge_delta(adapter_name))

    def scale_adapter(self, adapter_name: str, alpha: float) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before scaling it")
        self.strength[adapter_name] = float(alpha)

    def forget_adapter(self, adapter_name: str) -> None:
        self.strength.pop(adapter_name, None)
        self.module_dropout.pop(adapter_name, None)
