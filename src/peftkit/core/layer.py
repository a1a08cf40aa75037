"""The base of every module that carries adapters.

An :class:`AdapterLayer` wraps an existing module (``base_layer``) and keeps its adapters'
parameters in containers named in ``adapter_containers`` — ``nn.ModuleDict`` or
``nn.ParameterDict`` attributes keyed by adapter name. The core finds adapter parameters
through these containers, never by matching parameter names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["BASE_ADAPTER", "AdapterLayer", "adapter_layers", "contiguous_rows", "per_example_adapters"]

BASE_ADAPTER = "__base__"
# Where an in-place adapter (see core/inplace.py) is attached to a model: a plain attribute.
IN_PLACE_ATTRIBUTE = "_peftkit_in_place"


class AdapterLayer(nn.Module):
    """A wrapped module with named adapters.

    Subclasses implement ``add_adapter`` and ``forward``, and, where the method can be
    folded into the weights, ``merge_one`` / ``unmerge_one``.
    """

    adapter_containers: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Set for one forward call by `per_example_adapters`: an adapter name per example.
        self.example_adapters: Sequence[str] | None = None
        # What a layer derives from ``example_adapters`` once per block; emptied at its end.
        self.example_cache: dict[str, Any] = {}

    # Model code reads these of the modules it calls (T5 checks `self.wo.weight.dtype`).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # -- adapters ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_containers:
            for key in getattr(self, attr).keys():
                if key not in names:
                    names.append(key)
        return names

    def add_adapter(self, adapter_name: str, config: Any, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapter_names]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.forget_adapter(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def forget_adapter(self, adapter_name: str) -> None:
        """Hook: drop per-adapter state kept outside the containers (scalings, ranks)."""

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if adapter_name in container:
                entry = container[adapter_name]
                if isinstance(entry, nn.Parameter):
                    yield entry
                else:
                    yield from entry.parameters()

    # -- state ------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Tensors of one adapter keyed relative to this module, adapter name removed:
        ``lora_A.weight``, ``lora_embedding_A``."""
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_containers:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                out[attr] = entry
            else:
                for pname, p in entry.named_parameters():
                    out[f"{attr}.{pname}"] = p
        return out

    def load_adapter_state_dict(self, adapter_name: str, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Copies ``state`` (keys as from ``adapter_state_dict``) into the adapter.

        Raises:
            ValueError: naming the key and both shapes when a tensor does not fit, or the
                missing keys when the state is incomplete.
        """
        own = self.adapter_state_dict(adapter_name)
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"adapter file lacks {', '.join(prefix + k for k in missing)}: the file is incomplete")
        with torch.no_grad():
            for key, target in own.items():
                value = state[key]
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{prefix}{key}: the file holds shape {tuple(value.shape)} but the model expects "
                        f"{tuple(target.shape)}; the adapter was made for a different model or config"
                    )
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    # -- merging ----------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            self.merge_one(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.unmerge_one(self.merged_adapters.pop())

    def check_mergeable(self, adapter_names: Sequence[str] | None = None) -> None:
        """Raises NotImplementedError where ``merge(adapter_names)`` would be refused, before
        any layer of the model is merged."""
        kind = type(self)
        if kind.merge is AdapterLayer.merge and kind.merge_one is AdapterLayer.merge_one:
            self.merge_one("")

    def merge_one(self, adapter_name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge_one(self, adapter_name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")

    def unload(self, merge: bool) -> nn.Module:
        """The module to put back in the model: the base layer, with the active adapters
        merged into it when ``merge``."""
        if merge:
            self.merge()
        else:
            self.unmerge()
        return self.base_layer

    # -- strength (WiSE-FT interpolation) ------------------------------------------------
    def scale_adapter(self, adapter_name: str, alpha: float) -> None:
        """Sets the adapter's strength relative to how it was trained: 0 = no effect,
        1 = as trained. Calls are not cumulative."""
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be scaled; interpolate merged weights instead")

    # -- forward helpers --------------------------------------------------------------
    def adapters_to_run(self) -> list[str]:
        """Active adapters that are not merged (and so must run in forward)."""
        if self.disabled:
            if self.merged_adapters:
                raise RuntimeError("adapters are merged into the weights; unmerge them before disabling")
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def example_groups(self, batch_size: int) -> list[tuple[str, torch.Tensor]] | None:
        """For a per-example adapter batch: ``[(adapter, example indices)]``; else None."""
        names = self.example_adapters
        if names is None:
            return None
        if len(names) != batch_size:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} examples")
        if self.merged_adapters:
            raise RuntimeError("per-example adapters need unmerged adapters; call unmerge_adapter() first")
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        out = []
        for name, idx in groups.items():
            if name == BASE_ADAPTER or name not in self.adapter_names:
                continue
            out.append((name, torch.tensor(idx, dtype=torch.long)))
        return out


def contiguous_rows(idx: torch.Tensor) -> slice | None:
    """``idx`` (ascending example indices, as `example_groups` gives them) as a slice when
    they are consecutive, so that the rows are a view rather than a gathered copy."""
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, last + 1) if last - first + 1 == idx.numel() else None


def adapter_layers(model: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """``(module name, layer)`` for every adapter layer of ``model``; an attached in-place
    adapter (which is not a submodule) comes first, with the name ``""``. ``modules``: the
    result of ``model.named_modules()`` where the caller has it already."""
    attached = model.__dict__.get(IN_PLACE_ATTRIBUTE)
    if isinstance(attached, AdapterLayer):
        yield "", attached
    for name, module in model.named_modules() if modules is None else modules:
        if isinstance(module, AdapterLayer):
            yield name, module


@contextmanager
def per_example_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the block, each adapter layer applies ``names[i]`` to example ``i``."""
    layers = [m for _, m in adapter_layers(model)]
    known: set[str] = {BASE_ADAPTER}
    for layer in layers:
        known.update(layer.adapter_names)
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"adapter_names contains unknown adapters {unknown}; loaded: {sorted(known)}")
    for layer in layers:
        layer.example_adapters = list(names)
    try:
        yield
    finally:
        for layer in layers:
            layer.example_adapters = None
            layer.example_cache.clear()
