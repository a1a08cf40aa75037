"""Robustness by interpolation (WiSE-FT): ``θ(α) = (1−α)·θ_pretrained + α·θ_finetuned``.

For additive adapters the adapter is scaled by α (the same line in weight space, without
touching the base); for parameters trained in place (full or partial fine-tuning, trained
biases) the pretrained values are needed and the parameters are interpolated directly.
Calls are not cumulative: each one sets α relative to the fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from peftkit.core.inplace import InPlaceAdapter
from peftkit.core.layer import adapter_layers
from peftkit.core.tuner import AdaptedModel, adapter_base_parameter_names

__all__ = ["interpolate"]

_SNAPSHOT = "_peftkit_finetuned"


def _inner(model: nn.Module) -> nn.Module:
    base = model._modules.get("base_model")
    return base.model if isinstance(base, AdaptedModel) else model


def _reference_state(pretrained: nn.Module | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
    if pretrained is None or isinstance(pretrained, Mapping):
        return pretrained
    return pretrained.state_dict()


@torch.no_grad()
def _lerp_parameters(
    model: nn.Module, names: list[str], reference: Mapping[str, torch.Tensor], alpha: float
) -> None:
    params = dict(model.named_parameters())
    snapshot: dict[str, torch.Tensor] = model.__dict__.setdefault(_SNAPSHOT, {})
    for name in names:
        key = name.replace(".base_layer.", ".")
        ref = reference.get(name, reference.get(key))
        if ref is None:
            raise KeyError(f"the pretrained state has no {key!r}; pass the model the fine-tuning started from")
        param = params[name]
        if tuple(ref.shape) != tuple(param.shape):
            raise ValueError(f"{key}: pretrained shape {tuple(ref.shape)} differs from fine-tuned {tuple(param.shape)}")
        trained = snapshot.setdefault(name, param.detach().clone())
        param.copy_(torch.lerp(ref.to(param.device, param.dtype), trained, alpha))


def interpolate(
    model: nn.Module,
    alpha: float,
    pretrained: nn.Module | Mapping[str, torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> nn.Module:
    """Moves ``model`` to the point α of the line from the pretrained to the fine-tuned model.

    Args:
        model: a :class:`~peftkit.PeftModel` (its active adapter is interpolated), or a
            plain fine-tuned model (then ``pretrained`` is required).
        alpha: 0 gives the pretrained model, 1 the fine-tuned one; values outside [0, 1]
            extrapolate.
        pretrained: the pretrained model or its state dict; needed for parameters trained
            in place (full / partial fine-tuning, ``bias="all"``), with names as in the
            unwrapped model.
        adapter_name: the adapter to interpolate (default: the active one).

    Returns:
        ``model``, modified in place.
    """
    alpha = float(alpha)
    inner = _inner(model)
    layers = list(adapter_layers(inner))
    reference = _reference_state(pretrained)
    if not layers:
        if reference is None:
            raise ValueError("a model without adapters needs `pretrained` (the model or state dict it was fine-tuned from)")
        names = [n for n, _ in inner.named_parameters() if n in reference or n.replace(".base_layer.", ".") in reference]
        _lerp_parameters(inner, names, reference, alpha)
        return model
    name = adapter_name or getattr(model, "active_adapter", None) or layers[0][1].active_adapters[0]
    in_place = adapter_base_parameter_names(inner, name)
    for _, layer in layers:
        if name not in layer.adapter_names:
            continue
        if isinstance(layer, InPlaceAdapter):  # its adapter is the model's own parameters
            in_place += layer.parameter_names
        else:
            layer.scale_adapter(name, alpha)
    if in_place:
        if reference is None:
            raise ValueError(
                f"adapter {name!r} trains {len(in_place)} existing parameters in place (e.g. {in_place[0]}); "
                "pass `pretrained` (the model or state dict fine-tuning started from) to interpolate them"
            )
        _lerp_parameters(inner, in_place, reference, alpha)
    return model
