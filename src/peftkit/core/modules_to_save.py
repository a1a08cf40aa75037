"""``modules_to_save``: modules trained in full (e.g. a new classification head).

Each adapter gets its own trainable copy of the module; the original stays untouched and
is used when adapters are disabled. Files store the copy under the module's own path
(``base_model.model.classifier.weight``), as Hugging Face PEFT does.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(AdapterLayer):
    adapter_containers = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()
        self._trained: dict[str, dict[str, torch.Tensor]] = {}

    def add_adapter(self, adapter_name: str, config: Any = None, module_name: str = "") -> None:
        trained = copy.deepcopy(self.base_layer)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = trained

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].named_parameters())

    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Nothing to fold: the trained copy already replaces the module."""

    def unload(self, merge: bool) -> nn.Module:
        if merge and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.base_layer

    @torch.no_grad()
    def scale_adapter(self, adapter_name: str, alpha: float) -> None:
        """Trained copy becomes ``(1-α)·original + α·trained``, parameter by parameter."""
        trained = self._trained.setdefault(
            adapter_name, {k: v.detach().clone() for k, v in self.modules_to_save[adapter_name].named_parameters()}
        )
        original = dict(self.base_layer.named_parameters())
        for key, param in self.modules_to_save[adapter_name].named_parameters():
            param.copy_(torch.lerp(original[key].to(param.dtype), trained[key], alpha))

    def forget_adapter(self, adapter_name: str) -> None:
        self._trained.pop(adapter_name, None)

    def _module_for(self, name: str | None) -> nn.Module:
        return self.base_layer if name is None else self.modules_to_save[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the active trained copy (the original when none) with the inputs as given,
        positional or keyword (``head(hidden_states=h)``)."""
        active = self.adapters_to_run()
        if self.example_adapters is not None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if x is None:
                raise ValueError("per-example adapters need a tensor input whose first dimension is the batch")
            groups = self.example_groups(x.shape[0])
            out = self.base_layer(*args, **kwargs).clone()
            for name, idx in groups or ():
                rows_args = [a[idx] if a is x else a for a in args]
                rows_kwargs = {k: v[idx] if v is x else v for k, v in kwargs.items()}
                out[idx] = self.modules_to_save[name](*rows_args, **rows_kwargs)
            return out
        return self._module_for(active[0] if active else None)(*args, **kwargs)
