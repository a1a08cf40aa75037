"""Sparse-delta layers: a linear layer whose weight is ``W + scatter(idx, δ)``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.integrations.transformers import is_linear_like, is_transformers_conv1d
from peftkit.methods.sparse.config import SparseConfig

__all__ = ["SUPPORTED", "SparseLayer", "create_sparse_layer", "select_indices"]

SUPPORTED = "nn.Linear, transformers Conv1D"


def select_indices(weight: torch.Tensor, k: int, selection: str, seed: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the k entries to train, sorted."""
    k = max(1, min(k, weight.numel()))
    if scores is None:
        if selection == "random":
            g = torch.Generator().manual_seed(seed)
            scores = torch.rand(weight.numel(), generator=g)
        else:
            scores = weight.detach().abs().flatten().float().cpu()
    return torch.topk(scores.flatten(), k).indices.sort().values.to(weight.device)


class SparseLayer(AdapterLayer):
    """Trains ``k`` chosen entries of the base weight as a sparse delta."""

    peft_type = "SPARSE"
    adapter_containers = ("sparse_values", "sparse_indices")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.sparse_values = nn.ParameterDict()
        self.sparse_indices = nn.ParameterDict()  # int64, never trained
        self._originals: dict[str, torch.Tensor] = {}

    def add_adapter(self, adapter_name: str, config: SparseConfig, module_name: str, k: int | None = None) -> None:
        weight = self.base_layer.weight
        k = k if k is not None else max(1, round((config.density or 0) * weight.numel()))
        self.set_indices(adapter_name, select_indices(weight, k, config.selection, config.seed))

    def set_indices(self, adapter_name: str, indices: torch.Tensor) -> None:
        """(Re)sets the trained entries of an adapter; its delta restarts at zero."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype not in (torch.float16, torch.bfloat16) else torch.float32
        self.sparse_indices[adapter_name] = nn.Parameter(indices.to(torch.long), requires_grad=False)
        self.sparse_values[adapter_name] = nn.Parameter(torch.zeros(len(indices), dtype=dtype, device=weight.device))

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        if adapter_name in self.sparse_values:
            yield self.sparse_values[adapter_name]

    def forget_adapter(self, adapter_name: str) -> None:
        self._originals.pop(adapter_name, None)

    def _flat_weight(self) -> torch.Tensor:
        return self.base_layer.weight.view(-1)

    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        flat, idx = self._flat_weight(), self.sparse_indices[adapter_name]
        self._originals[adapter_name] = flat[idx].clone()  # exact unmerge, whatever the rounding
        flat.index_add_(0, idx, self.sparse_values[adapter_name].to(flat.dtype))

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        self._flat_weight().index_copy_(0, self.sparse_indices[adapter_name], self._originals.pop(adapter_name))

    def scale_adapter(self, adapter_name: str, alpha: float) -> None:
        raise NotImplementedError("interpolate a sparse adapter by merging it and interpolating the weights")

    def _weight_with(self, names: list[str]) -> torch.Tensor:
        w = self.base_layer.weight
        flat = w.reshape(-1)
        for name in names:
            flat = flat.index_add(0, self.sparse_indices[name], self.sparse_values[name].to(w.dtype))
        return flat.view_as(w)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if is_transformers_conv1d(self.base_layer):
            return torch.addmm(self.base_layer.bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, self.base_layer.bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.example_adapters is not None:
            result = self.base_layer(x, *args, **kwargs)
            for name, idx in self.example_groups(x.shape[0]) or []:
                idx = idx.to(x.device)
                result = result.index_copy(0, idx, self._linear(x[idx], self._weight_with([name])))
            return result
        names = self.adapters_to_run()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._linear(x, self._weight_with(names))


def create_sparse_layer(module: nn.Module, adapter_name: str, config: SparseConfig, module_name: str) -> SparseLayer:
    if not is_linear_like(module):
        raise TypeError(f"{module_name} is a {type(module).__name__}; sparse fine-tuning supports {SUPPORTED}")
    layer = SparseLayer(module)
    layer.add_adapter(adapter_name, config, module_name, k=getattr(config, "_counts", {}).get(module_name))
    layer.set_active([adapter_name])
    return layer
