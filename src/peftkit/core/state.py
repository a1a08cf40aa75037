"""Adapter state dicts in the key layout of Hugging Face PEFT files.

Keys are full module paths plus the parameter's key inside its adapter container with the
adapter name removed: ``base_model.model.<path>.lora_A.weight``. A model-level adapter
(:class:`~peftkit.core.model_adapter.ModelAdapter`) adds
its own top-level keys, and its method may set another prefix for module keys.
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

import torch
from torch import nn

from peftkit.core.layer import adapter_layers
from peftkit.core.model_adapter import ModelAdapter
from peftkit.core.registry import method_for_config
from peftkit.core.tuner import AdaptedModel, adapter_base_parameter_names

__all__ = ["AdapterStateError", "LoadResult", "get_peft_model_state_dict", "set_peft_model_state_dict"]


class AdapterStateError(ValueError, RuntimeError):
    """An adapter file that does not fit the model. A ValueError, and a RuntimeError as the
    size-mismatch error torch (and so Hugging Face PEFT) raises."""


class LoadResult(NamedTuple):
    """What :func:`set_peft_model_state_dict` loaded, shaped as torch's ``load_state_dict``
    result (and PEFT's). peftkit loads strictly: a key the adapter lacks or does not know
    raises :class:`AdapterStateError` (a mismatched size too, unless
    ``ignore_mismatched_sizes``), so ``missing_keys`` and ``unexpected_keys`` are empty on
    return. ``base_keys`` are the file's keys loaded into base-model parameters and
    ``skipped_keys`` those left out for a mismatched size."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    base_keys: list[str]
    skipped_keys: list[str]


def _roots(model: nn.Module, adapter_name: str) -> tuple[nn.Module, str]:
    """The module holding the adapters and the key prefix of its parameters."""
    base = model._modules.get("base_model")
    if isinstance(base, AdaptedModel):
        config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
        prefix = method_for_config(config).file_key_prefix if config is not None else None
        return base.model, prefix if prefix is not None else "base_model.model."
    return model, ""


def _model_adapter(model: nn.Module, adapter_name: str) -> ModelAdapter | None:
    """The model-level adapter ``adapter_name`` of a PeftModel, if it has one."""
    container = model._modules.get("model_adapters")
    if container is not None and adapter_name in container._modules:
        return container._modules[adapter_name]  # type: ignore[return-value]
    return None


def _expected(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    root, prefix = _roots(model, adapter_name)
    out: dict[str, torch.Tensor] = {}
    model_adapter = _model_adapter(model, adapter_name)
    if model_adapter is not None:
        out.update(model_adapter.adapter_state_dict())
    for name, layer in adapter_layers(root):
        for key, tensor in layer.adapter_state_dict(adapter_name).items():
            out[f"{prefix}{name}.{key}" if name else f"{prefix}{key}"] = tensor
    config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    shared = method_for_config(config).shared_state if config is not None else None
    if shared is not None:
        outer = "base_model." if root is not model else ""
        out.update({outer + key: tensor for key, tensor in shared(root, adapter_name, config).items()})
    params = dict(root.named_parameters())
    for pname in adapter_base_parameter_names(root, adapter_name):
        if pname in params:
            out[prefix + pname] = params[pname]
    return out


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as in a saved file (detached, not copied).

    Args:
        model: a :class:`~peftkit.PeftModel` or a module given :func:`~peftkit.inject_adapter_in_model`.
        state_dict: the model's full state dict (as PEFT accepts, e.g. gathered from shards);
            the adapter's tensors are then taken from it where it holds them.
        adapter_name: which adapter. For PEFT's positional order
            ``(model, state_dict, adapter_name)`` a string second argument is read as the name.
        unwrap_compiled: accepted for PEFT's signature (a compiled model is unwrapped always).
        save_embedding_layers: accepted for PEFT's signature. peftkit saves a base embedding
            weight exactly where the adapter trains it (``modules_to_save``, a method that
            trains it), so every value gives the same tensors.
    """
    if isinstance(state_dict, str):  # get_peft_model_state_dict(model, "name") as peftkit wrote it before
        state_dict, adapter_name = None, state_dict
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach() for k, v in _expected(model, adapter_name).items()}
    if not state:
        raise ValueError(f"the model holds no adapter named {adapter_name!r}")
    if state_dict is not None:
        given = {_without_adapter_name(k, adapter_name): v for k, v in state_dict.items()}
        state = {k: given.get(k, given.get(k.removeprefix("base_model.model."), v)).detach() for k, v in state.items()}
    return state


def _without_adapter_name(key: str, adapter_name: str) -> str:
    """A model's state-dict key as a file key: the adapter's name segment removed."""
    return ".".join(part for part in key.split(".") if part != adapter_name)


def set_peft_model_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Loads ``state`` (keys as in a file) into adapter ``adapter_name``.

    Every key and shape is checked before the first tensor is copied. Keys that address a
    base-model parameter (an embedding saved beside its adapter, say) are loaded into it.

    Args:
        ignore_mismatched_sizes: skip (rather than refuse) tensors whose shape differs from
            the model's; they are listed in the result's ``skipped_keys``.
        low_cpu_mem_usage: accepted for PEFT's signature; peftkit copies into the existing
            tensors either way.

    Returns:
        A :class:`LoadResult` (``missing_keys``, ``unexpected_keys`` as in PEFT).

    Raises:
        AdapterStateError: naming the key and both shapes, a missing key, or an unexpected
            key with the closest expected ones.
    """
    expected = _expected(model, adapter_name)
    if not expected:
        raise AdapterStateError(f"the model holds no adapter named {adapter_name!r}")
    root, prefix = _roots(model, adapter_name)
    base_params = {prefix + n: p for n, p in root.named_parameters()}
    model_adapter = _model_adapter(model, adapter_name)
    model_level = set(model_adapter.adapter_state_dict()) if model_adapter is not None else set()
    # A file may address the wrapped base of a layer (`x.base_layer.weight`) or the plain path.
    plan: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    base_keys: list[str] = []
    skipped: list[str] = []
    for key, value in state.items():
        target = expected.get(key)
        if target is None:
            target = base_params.get(key)
            if target is None and key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[-1] in base_params:
                target = base_params[key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[-1]]
            if target is None:
                close = difflib.get_close_matches(key, list(expected), n=3, cutoff=0.6)
                raise AdapterStateError(
                    f"unexpected key {key!r} in the adapter file: the model has no such adapter tensor"
                    + (f" (closest: {close})" if close else "")
                    + "; the adapter was made for a different model or target modules"
                )
            base_keys.append(key)
        if tuple(value.shape) != tuple(target.shape):
            if ignore_mismatched_sizes:
                skipped.append(key)
                continue
            raise AdapterStateError(
                f"{key}: the file holds shape {tuple(value.shape)} but the model expects {tuple(target.shape)}; "
                "the adapter was made for a different model or config (rank, target modules)"
            )
        plan.append((key, target, value))
    missing = sorted(k for k in expected if k not in state and k not in skipped)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AdapterStateError(f"the adapter file lacks {shown}: it is incomplete or for another config")
    with torch.no_grad():
        for key, target, value in plan:
            if key not in model_level:
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    if model_adapter is not None:
        model_adapter.load_adapter_state_dict({k: state[k] for k in model_level})
    return LoadResult([], [], base_keys, skipped)
