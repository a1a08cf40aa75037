"""Adapters that are trained copies of some of a module's own parameters.

BitFit (the biases) and LayerNorm tuning (a norm's scale and shift) train existing
parameters. Training them in place would make disabling, several adapters and unloading
impossible, so each adapter holds its own copy of those parameters and the wrapped module
is called with the copies in place of its own. The copies are tiny (vectors), the frozen
originals are never touched, and merging writes the copies into the module.

With several adapters active at once their changes add up:
``p = p₀ + Σ_i (p_i − p₀)``; with one, ``p = p_1`` exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.integrations.transformers import is_transformers_conv1d

__all__ = ["ParameterCopy", "ParameterCopyLayer", "call_with_parameters"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def call_with_parameters(module: nn.Module, params: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """Calls ``module`` with ``params`` (by name) in place of its own parameters.

    Linear, GPT-2 ``Conv1D``, convolutions and LayerNorm take a direct path; any other
    module goes through ``torch.func.functional_call`` (same result, more overhead).
    """
    # The direct paths skip the module's hooks (accelerate's offloading uses them).
    if len(args) == 1 and not kwargs and not module._forward_hooks and not module._forward_pre_hooks:
        x = args[0]
        kind = type(module)
        weight = params.get("weight", getattr(module, "weight", None))
        bias = params.get("bias", getattr(module, "bias", None))
        if kind is nn.Linear:
            return F.linear(x, weight, bias)
        if kind is nn.LayerNorm:
            return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
        if kind in _CONV_TYPES:
            return module._conv_forward(x, weight, bias)
        if is_transformers_conv1d(module) and set(params) <= {"weight", "bias"}:
            out = torch.addmm(bias, x.view(-1, x.size(-1)), weight)
            return out.view(*x.shape[:-1], module.nf)
    return torch.func.functional_call(module, params, args, kwargs, strict=False)


class ParameterCopy(nn.Module):
    """Holds trained copies of named parameters (``weight``, ``bias``) of a module."""

    def __init__(self, source: nn.Module, names: Sequence[str], dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name in names:
            p = getattr(source, name)
            self.register_parameter(name, nn.Parameter(p.detach().clone().to(dtype or p.dtype)))


def _copy_dtype(p: torch.Tensor) -> torch.dtype:
    # Half-precision parameters get float32 copies: stable updates of small tensors.
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class ParameterCopyLayer(AdapterLayer):
    """Wraps a module; each adapter is a trained copy of ``copied`` parameters of it.

    Subclasses set ``peft_type``, ``adapter_containers`` (one name: the container of the
    copies) and implement ``parameters_to_copy``.
    """

    peft_type = ""
    container = "copies"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        setattr(self, self.container, nn.ModuleDict())
        self.copied: list[str] = []
        self._originals: dict[str, torch.Tensor] = {}

    @property
    def copies(self) -> nn.ModuleDict:
        return getattr(self, self.container)

    def parameters_to_copy(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _whole_module_copy(self, names: Sequence[str]) -> bool:
        """Whether the copy can be the whole module: it holds nothing but these
        parameters (no weight matrix to duplicate, no buffers to fork)."""
        own = {n for n, _ in self.base_layer.named_parameters()}
        return own == set(names) and not any(True for _ in self.base_layer.buffers())

    def add_adapter(self, adapter_name: str, config: Any = None, module_name: str = "") -> None:
        names = self.parameters_to_copy()
        if not names:
            raise ValueError(f"{module_name or type(self.base_layer).__name__} has no parameter to train")
        self.copied = list(names)
        first = getattr(self.base_layer, names[0])
        dtype = _copy_dtype(first)
        if self._whole_module_copy(names) and dtype == first.dtype:
            holder: nn.Module = copy.deepcopy(self.base_layer)
            for p in holder.parameters():
                p.requires_grad_(True)
        else:
            holder = ParameterCopy(self.base_layer, names, dtype)
        if self._originals:  # other adapters are merged: start from the original values
            with torch.no_grad():
                for n in names:
                    getattr(holder, n).copy_(self._originals[n])
        self.copies[adapter_name] = holder

    # -- the values in use ---------------------------------------------------------
    def _own(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self.base_layer, n) for n in self.copied}

    def _values(self, adapter_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``p₁`` for one adapter, ``p₀ + Σ (p_i − p₀)`` for several (in the base's dtype)."""
        own = self._own()
        out: dict[str, torch.Tensor] = {}
        for pname, base in own.items():
            base = self._originals.get(pname, base)
            values = [getattr(self.copies[a], pname) for a in adapter_names]
            if len(values) == 1:
                out[pname] = values[0].to(base.dtype)
            else:
                out[pname] = base + sum((v.to(base.dtype) - base) for v in values)
        return out

    def _run(self, adapter_names: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """The module's output with ``adapter_names`` (and any merged adapters) applied."""
        names = [*self.merged_adapters, *adapter_names]
        if len(names) == 1:
            holder = self.copies[names[0]]
            if not isinstance(holder, ParameterCopy):
                return holder(*args, **kwargs)
        return call_with_parameters(self.base_layer, self._values(names), *args, **kwargs)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.example_adapters is not None:
            groups = self.example_groups(x.shape[0]) or []
            out = self.base_layer(x, *args, **kwargs)
            for name, idx in groups:
                idx = idx.to(x.device)
                out = out.index_copy(0, idx, self._run([name], x[idx], *args, **kwargs).to(out.dtype))
            return out
        names = self.adapters_to_run()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._run(names, x, *args, **kwargs)

    # -- merging ---------------------------------------------------------------------
    @torch.no_grad()
    def merge_one(self, adapter_name: str) -> None:
        own = self._own()
        if not self._originals:
            self._originals = {n: p.detach().clone() for n, p in own.items()}
        values = self._values([*self.merged_adapters, adapter_name])
        for n, p in own.items():
            p.copy_(values[n])

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        own = self._own()
        if self.merged_adapters:  # others stay merged
            values = self._values(self.merged_adapters)
            for n, p in own.items():
                p.copy_(values[n])
            return
        for n, p in own.items():
            p.copy_(self._originals[n])
        self._originals = {}

    def forget_adapter(self, adapter_name: str) -> None:
        if not self.merged_adapters:
            self._originals = {}
