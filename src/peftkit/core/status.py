"""What adapters a model holds and in which state: PEFT's ``get_layer_status`` and
``get_model_status``, computed from the adapter layers themselves.

A model-wide field reads ``"irregular"`` where the layers disagree (some merged, some
not): a state that ordinary use never produces, worth reporting rather than averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

from torch import nn

from peftkit.core.layer import adapter_layers

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]


def _agree(values: list[Any]) -> Any:
    """The one value all entries share, else ``"irregular"``."""
    first = values[0]
    return first if all(v == first for v in values[1:]) else "irregular"


def _inner(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer of ``model`` (a PeftModel, or a module
    given adapters with ``inject_adapter_in_model``), names as in the wrapped model."""
    out = []
    for name, layer in adapter_layers(_inner(model)):
        grads: dict[str, list[bool]] = {}
        devices: dict[str, set[str]] = {}
        for adapter in layer.adapter_names:
            for p in layer.adapter_parameters(adapter):
                grads.setdefault(adapter, []).append(p.requires_grad)
                devices.setdefault(adapter, set()).add(p.device.type)
        out.append(TunerLayerStatus(
            name=name,
            module_type=type(layer).__name__,
            enabled=not layer.disabled,
            active_adapters=list(layer.active_adapters),
            merged_adapters=list(layer.merged_adapters),
            requires_grad={a: _agree(v) if v else False for a, v in grads.items()},
            available_adapters=sorted(layer.adapter_names),
            devices={a: sorted(d) for a, d in devices.items()},
        ))
    if not out:
        raise ValueError("no adapter layers found in the model; get_layer_status() describes a model that holds adapters")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide :class:`TunerModelStatus` of :func:`get_layer_status`."""
    layers = get_layer_status(model)
    inner = _inner(model)
    configs = getattr(model, "peft_config", None) or getattr(inner, "_peftkit_configs", None) or {}
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    adapters = sorted({a for s in layers for a in s.available_adapters})
    requires_grad = {a: _agree([s.requires_grad[a] for s in layers if a in s.requires_grad]) for a in adapters}
    devices = {a: sorted({d for s in layers for d in s.devices.get(a, [])}) for a in adapters}
    base = getattr(model, "base_model", None)
    return TunerModelStatus(
        base_model_type=type(inner).__name__ if inner is not model else "other",
        adapter_model_type=type(base).__name__ if inner is not model else "None",
        peft_types={name: type(config).peft_type for name, config in configs.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_agree([s.enabled for s in layers]),
        active_adapters=_agree([sorted(s.active_adapters) for s in layers]),
        merged_adapters=_agree([sorted(s.merged_adapters) for s in layers]),
        requires_grad=requires_grad,
        available_adapters=adapters,
        devices=devices,
    )
