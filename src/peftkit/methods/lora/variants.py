"""LoRA variants as strategy objects: what changes where an adapter is not the plain
``h = W₀x + (α/r)·B·A·x``.

A layer keeps the variant of each adapter that has one in ``layer.lora_variant[name]``;
plain adapters have none and take the layer's own path (and its fast paths at inference).
A variant computes through the layer's kind-specific pieces (``weight_view``, ``delta``,
``out_major``, ``unscaled_update``, ``channel_dim``), so one variant serves every layer kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.methods.lora import functional as LF

if TYPE_CHECKING:
    from peftkit.methods.lora.layer import LoraLayer

__all__ = ["Dora", "LoraVariant"]


class LoraVariant:
    """How one adapter of a layer is initialised, run and merged when it is not plain LoRA.

    Attributes:
        name: the variant's name, for messages.
        scalable: whether the adapter's strength can be scaled (``ΔW(α) = α·ΔW``).
    """

    name = "variant"
    scalable = False

    def init(self, layer: LoraLayer, adapter: str) -> None:
        """Creates the variant's own parameters, after the factors are initialised."""

    def addend(self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output ``result`` for the input ``x``."""
        raise NotImplementedError

    def merge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        """Folds the adapter into ``weight`` in place (``delta`` = ``s·B·A`` in its layout)."""
        raise NotImplementedError

    def unmerge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        """Takes the adapter out of ``weight`` in place."""
        raise NotImplementedError

    def forget(self, layer: LoraLayer, adapter: str) -> None:
        """Drops what the variant keeps of a deleted adapter."""


class Dora(LoraVariant):
    """DoRA: ``h = b + (m/‖W₀+ΔW‖_c)·(W₀x + s·B·A·x)``: a trained magnitude ``m`` per output
    (``lora_magnitude_vector``) times the direction of ``W₀ + ΔW``, whose norm is detached
    (as the DoRA paper advises). Not additive: it has no fast paths and cannot be scaled."""

    name = "dora"

    def __init__(self) -> None:
        # The norms a merge divided by: unmerging needs them, and cannot recompute them from
        # the merged weight.
        self._merge_norms: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def init(self, layer: LoraLayer, adapter: str) -> None:
        w = layer.out_major(layer.weight_view())
        norm = LF.dora_weight_norm(w.float() + layer.out_major(layer.delta(adapter)).float())
        layer.lora_magnitude_vector[adapter] = nn.Parameter(layer.magnitude_shape(norm).to(layer.factors(adapter)[0].dtype))

    def magnitude_scale(self, layer: LoraLayer, adapter: str) -> torch.Tensor:
        """``m / ‖W₀ + ΔW‖_c`` per output, the norm detached."""
        w = layer.weight_view()
        norm = LF.dora_weight_norm(layer.out_major(w + layer.delta(adapter).to(w.dtype))).detach()
        return layer.lora_magnitude_vector[adapter].flatten() / norm

    def addend(self, layer: LoraLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``(m/‖W₀+ΔW‖ − 1)·(result − b) + (m/‖W₀+ΔW‖)·s·B·A·x``: added to ``result``, the
        DoRA output."""
        channel = layer.channel_dim(result)
        shape = [1] * result.dim()
        shape[channel] = -1
        scale = self.magnitude_scale(layer, adapter).view(shape)
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - bias.view(shape)
        lora = layer.unscaled_update(adapter, x).to(result.dtype)
        # In this order, as Hugging Face PEFT adds them, outputs agree with PEFT's within
        # float32 rounding. The magnitude is float32 on a low-precision base: the term comes
        # back in the base's dtype.
        return ((scale - 1) * base + scale * lora * layer.scaling[adapter]).to(result.dtype)

    def merge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        w, d = layer.out_major(weight), layer.out_major(delta)
        norm = LF.dora_weight_norm(w + d)
        self._merge_norms[adapter] = norm
        w.add_(d).mul_(self._scale(layer, adapter, w, norm))

    def unmerge(self, layer: LoraLayer, adapter: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        w, d = layer.out_major(weight), layer.out_major(delta)
        w.div_(self._scale(layer, adapter, w, self._merge_norms.pop(adapter))).sub_(d)

    @staticmethod
    def _scale(layer: LoraLayer, adapter: str, w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        scale = layer.lora_magnitude_vector[adapter].flatten().to(w.dtype) / norm
        return scale.view(-1, *([1] * (w.dim() - 1)))

    def forget(self, layer: LoraLayer, adapter: str) -> None:
        self._merge_norms.pop(adapter, None)
