"""Injection and lifecycle of adapters in a model: match, check, then mutate.

These functions act on the user's model in place and are shared by :class:`PeftModel`
and :func:`inject_adapter_in_model`. None of them names a method: everything
method-specific comes from the registry.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.inplace import InPlaceAdapter, attached_in_place
from peftkit.core.layer import BASE_ADAPTER, AdapterLayer, adapter_layers
from peftkit.core.modules_to_save import ModulesToSaveWrapper
from peftkit.core.registry import Method, method_for_config
from peftkit.core.targeting import find_modules_to_save, find_targets
from peftkit.integrations.transformers import task_head_names

__all__ = [
    "AdaptedModel",
    "adapter_base_parameter_names",
    "check_adapter_name",
    "delete_adapter",
    "inject_adapter",
    "mark_trainable",
    "merge_adapters",
    "set_active_adapters",
    "unload_adapters",
    "unmerge_adapters",
]


class AdaptedModel(nn.Module):
    """Holds the user's model as ``.model`` so that parameter names read
    ``base_model.model.<path>`` as in Hugging Face PEFT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_owner", None)  # a weak reference; the PeftModel sets it again (pickle, deepcopy)
        return state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWNER_API:
                owner = self.__dict__.get("_owner")
                peft_model = owner() if owner is not None else None
                if peft_model is not None:
                    return getattr(peft_model, name)
            return getattr(self.model, name)


# What ``PeftModel.base_model`` (PEFT's tuner object) answers for its PeftModel.
_OWNER_API = frozenset({
    "active_adapter", "active_adapters", "add_weighted_adapter", "delete_adapter", "disable_adapter_layers",
    "enable_adapter_layers", "merge_adapter", "merge_and_unload", "peft_config", "set_adapter",
    "targeted_module_names", "unload", "unmerge_adapter",
})


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _internal_names(model: nn.Module) -> list[str]:
    """Children of existing adapter layers: never targets themselves."""
    out = []
    for name, layer in adapter_layers(model):
        out.extend(f"{name}.{child}" if name else child for child, _ in layer.named_children())
    return out


def _modules_to_save_names(model: nn.Module, config: PeftConfig) -> list[str]:
    wanted = list(getattr(config, "modules_to_save", None) or [])
    task_heads = task_head_names(config.task_type)
    heads = [h for h in task_heads if h not in wanted]
    found = find_modules_to_save(model, wanted + heads)
    # A task's head names are alternatives (a SEQ_CLS model has a `classifier` or a `score`);
    # files written by Hugging Face PEFT list them all in modules_to_save.
    explicit_missing = [
        w for w in wanted if w not in task_heads and not any(n == w or n.endswith("." + w) for n in found)
    ]
    if explicit_missing:
        from peftkit.core.targeting import TargetError, _close_names

        raise TargetError(
            f"modules_to_save {explicit_missing} matched no module.\n"
            + _close_names(explicit_missing, [n for n, _ in model.named_modules()])
        )
    return found


def _check_single_method(model: nn.Module, method: Method) -> None:
    for name, layer in adapter_layers(model):
        if isinstance(layer, ModulesToSaveWrapper):
            continue
        owner = getattr(layer, "peft_type", None)
        if owner is not None and owner != method.peft_type:
            raise ValueError(
                f"{name} already carries a {owner} adapter; one model holds adapters of a single method "
                f"(here {owner}), not {method.peft_type} beside it"
            )


def check_adapter_name(adapter_name: str) -> None:
    """Adapter names key ``nn.ModuleDict``s: they cannot contain dots or shadow a module
    attribute (``"half"``, ``"train"``...), and ``"__base__"`` means "no adapter"."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name {adapter_name!r} is not valid: use a non-empty string without dots")
    if adapter_name == BASE_ADAPTER:
        raise ValueError(f"adapter name {BASE_ADAPTER!r} is reserved (it selects the base model); pick another name")
    if hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(
            f"adapter name {adapter_name!r} is the name of a torch.nn.Module attribute and cannot key the adapter's "
            f"parameters; pick another name, e.g. {adapter_name + '_adapter'!r}"
        )


def inject_adapter(model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str]:
    """Adds adapter ``adapter_name`` described by ``config`` to ``model`` in place.

    Every check runs first; on any error the model is left as it was.

    Returns:
        The names of the adapted modules.
    """
    check_adapter_name(adapter_name)
    method = method_for_config(config)
    _check_single_method(model, method)
    existing = {n for _, layer in adapter_layers(model) for n in layer.adapter_names}
    if adapter_name in existing:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it first or pick another name")
    if method.create_model_adapter is not None:  # acts on the model as a whole: no module to wrap
        _wrap_modules_to_save(model, config, adapter_name)
        return []

    attached = attached_in_place(model)
    if method.create_layer is None and attached is not None:
        raise ValueError(
            f"the model already holds the in-place adapter {attached.name!r}; a "
            f"{method.peft_type} adapter trains the model's own weights, so a model holds one. Start from a fresh "
            "copy of the base model."
        )
    if method.prepare_config is not None:
        method.prepare_config(model, config)
    save_names = _modules_to_save_names(model, config)
    target_spec = config.target_modules  # type: ignore[attr-defined]
    if target_spec is None and method.default_targets is not None:
        target_spec = method.default_targets(model)

    def supported(module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer) and getattr(module, "peft_type", None) == method.peft_type:
            return True
        return method.is_supported(module)

    extra = method.extra_targets(model, config) if method.extra_targets is not None else []
    targets = [] if extra and not target_spec else find_targets(
        model,
        target_spec,
        is_supported=supported,
        supported=method.supported,
        exclude_modules=getattr(config, "exclude_modules", None),
        layers_to_transform=getattr(config, "layers_to_transform", None),
        layers_pattern=getattr(config, "layers_pattern", None),
        skip=list(save_names) + _internal_names(model),
    )
    both = [n for n in extra if n in targets]
    if both:
        from peftkit.core.targeting import TargetError

        raise TargetError(f"{both} are matched by target_modules and also found another way ({method.peft_type}'s "
                          "extra targets); name each module one way only")
    targets += extra
    if method.check_target is not None:
        for name in targets:
            method.check_target(model.get_submodule(name), config, name)
    # An in-place method names its parameters now: any error leaves the model as it was.
    in_place_params = method.trainable_base_parameters(model, config, targets) if method.create_layer is None else []
    # Build every new layer before touching the model; extend existing layers last, with rollback.
    new_layers: list[tuple[str, nn.Module]] = []
    extended: list[AdapterLayer] = []
    try:
        for name in targets if method.create_layer is not None else ():
            module = model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                module.add_adapter(adapter_name, config, name)
                extended.append(module)
            else:
                new_layers.append((name, method.create_layer(module, adapter_name, config, name)))
        _add_saved_copies(model, save_names, adapter_name, new_layers, extended)
    except Exception:
        for layer in extended:
            layer.delete_adapter(adapter_name)
        raise
    # New modules start in training mode; they follow the mode of the module they wrap
    # (a model in eval mode must not get dropout in its new adapter branches).
    for layer in extended:
        layer.train(layer.training)
    for name, layer in new_layers:
        if isinstance(layer, AdapterLayer) and not layer.active_adapters:
            layer.set_active([adapter_name])
        layer.train(model.get_submodule(name).training)
        _set_module(model, name, layer)
    base_params: list[str] = []
    if method.create_layer is None:
        # The adapter is these parameters themselves (it attaches itself to the model).
        keep = bool(getattr(config, "keep_original", False))
        InPlaceAdapter(model, adapter_name, in_place_params, method.peft_type, keep)
    elif method.trainable_base_parameters is not None:
        base_params = method.trainable_base_parameters(model, config, targets)
    model._peftkit_base_params = getattr(model, "_peftkit_base_params", {})  # type: ignore[assignment]
    model._peftkit_base_params[adapter_name] = base_params  # type: ignore[index]
    return targets


def _add_saved_copies(
    model: nn.Module, names: list[str], adapter_name: str, new_layers: list[tuple[str, nn.Module]], extended: list[AdapterLayer]
) -> None:
    """Plans a trained copy of each ``modules_to_save`` module: existing wrappers get the new
    adapter (recorded in ``extended`` for rollback), other modules a new wrapper (in
    ``new_layers``, not yet placed in the model)."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
            extended.append(module)
        else:
            wrapper = ModulesToSaveWrapper(module)
            wrapper.add_adapter(adapter_name)
            new_layers.append((name, wrapper))


def _wrap_modules_to_save(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Adds ``adapter_name`` to the ``modules_to_save`` of a method that wraps no module."""
    new_layers: list[tuple[str, nn.Module]] = []
    extended: list[AdapterLayer] = []
    try:
        _add_saved_copies(model, _modules_to_save_names(model, config), adapter_name, new_layers, extended)
    except Exception:
        for layer in extended:
            layer.delete_adapter(adapter_name)
        raise
    for name, layer in new_layers:
        layer.train(layer.base_layer.training)
        layer.set_active([adapter_name])
        _set_module(model, name, layer)
    model._peftkit_base_params = getattr(model, "_peftkit_base_params", {})  # type: ignore[assignment]
    model._peftkit_base_params[adapter_name] = []  # type: ignore[index]


def adapter_base_parameter_names(model: nn.Module, adapter_name: str) -> list[str]:
    """Existing parameters of ``model`` that adapter ``adapter_name`` trains and saves."""
    return list(getattr(model, "_peftkit_base_params", {}).get(adapter_name, []))


def set_active_adapters(model: nn.Module, names: str | Sequence[str], also_known: Collection[str] = ()) -> None:
    """Activates ``names`` in every adapter layer. ``also_known``: adapter names that are
    valid though no layer carries them (model-level adapters)."""
    names = [names] if isinstance(names, str) else list(names)
    layers = [layer for _, layer in adapter_layers(model)]  # one walk of the module tree
    known = {n for layer in layers for n in layer.adapter_names} | set(also_known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; loaded adapters: {sorted(known)}")
    if any(layer.merged_adapters and set(layer.merged_adapters) != set(names) for layer in layers):
        raise RuntimeError("adapters are merged; unmerge_adapter() before switching adapters")
    for layer in layers:
        layer.set_active(names)


def mark_trainable(model: nn.Module, configs: dict[str, PeftConfig], active: Sequence[str]) -> None:
    """Freezes everything, then unfreezes the active adapters (unless in inference mode)
    and the base parameters they train."""
    modules = list(model.named_modules())
    for _, module in modules:
        for p in module._parameters.values():
            if p is not None:
                p.requires_grad_(False)
    training = [name for name in active if not configs[name].inference_mode]
    if not training:
        return
    layers = [layer for _, layer in adapter_layers(model, modules)]
    for name in training:
        for layer in layers:
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
        base_params = adapter_base_parameter_names(model, name)
        if base_params:
            params = dict(model.named_parameters())
            for pname in base_params:
                if pname in params:
                    params[pname].requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str, missing_ok: bool = False) -> None:
    """Removes ``adapter_name`` from every layer; ``missing_ok``: no error when no layer
    carries it (a model-level adapter without modules to save)."""
    layers = [layer for _, layer in adapter_layers(model) if adapter_name in layer.adapter_names]
    if not layers and not missing_ok:
        known = sorted({n for _, layer in adapter_layers(model) for n in layer.adapter_names})
        raise ValueError(f"no adapter named {adapter_name!r}; loaded adapters: {known}")
    for layer in layers:
        layer.delete_adapter(adapter_name)
    getattr(model, "_peftkit_base_params", {}).pop(adapter_name, None)
    # Layers left without adapters go back to plain modules (inner ones first: layers may nest).
    for name, layer in reversed(list(adapter_layers(model))):
        if not layer.adapter_names:
            _set_module(model, name, layer.base_layer)


def merge_adapters(model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
    """Folds adapters into the base weights of every layer.

    ``safe_merge``: each layer's merged weights are checked for NaN and infinity; on the
    first broken one every layer merged so far is put back as it was (bit for bit) and a
    ValueError names the layer and adapter."""
    layers = list(adapter_layers(model))
    for _, layer in layers:  # every refusal before the first weight changes
        layer.check_mergeable(adapter_names)
    if not safe_merge:
        for _, layer in layers:
            layer.merge(adapter_names)
        return
    done: list[tuple[AdapterLayer, list[str], dict[str, torch.Tensor]]] = []
    try:
        for name, layer in layers:
            wanted = adapter_names if adapter_names is not None else layer.active_adapters
            todo = [a for a in wanted if a in layer.adapter_names and a not in layer.merged_adapters]
            if not todo or isinstance(layer, ModulesToSaveWrapper):  # nothing to fold here
                layer.merge(adapter_names)
                continue
            before = list(layer.merged_adapters)
            saved = {k: v.detach().clone() for k, v in layer.base_layer.state_dict().items()}
            done.append((layer, before, saved))
            layer.merge(adapter_names)
            bad = [k for k, v in layer.base_layer.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                new = [a for a in layer.merged_adapters if a not in before]
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {new[0] if new else adapter_names!r} seems to be "
                    f"broken: merging it into {name or 'the model'} gives non-finite values in {bad}; nothing was merged"
                )
    except Exception:
        with torch.no_grad():
            for layer, before, saved in reversed(done):
                for k, v in layer.base_layer.state_dict().items():
                    v.copy_(saved[k])
                layer.merged_adapters = before
        raise


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload_adapters(model: nn.Module, merge: bool, progressbar: bool = False) -> nn.Module:
    """Replaces every adapter layer by its base module (merged first when ``merge``)."""
    layers = list(adapter_layers(model))
    if merge:
        for _, layer in layers:  # every refusal before the first weight changes
            layer.check_mergeable(None)
    # Innermost first: layers may nest (LoRA's layers on several parameters of one module);
    # an attached in-place adapter (named "") stays first.
    ordered: Any = [entry for entry in layers if not entry[0]] + [entry for entry in reversed(layers) if entry[0]]
    if progressbar:
        from tqdm.auto import tqdm

        ordered = tqdm(ordered, desc="Unloading " + ("and merging " if merge else "") + "model")
    for name, layer in ordered:
        replacement = layer.unload(merge)
        if name:
            _set_module(model, name, replacement)
        else:
            model = replacement
    if hasattr(model, "_peftkit_base_params"):
        del model._peftkit_base_params
    return model


def any_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in adapter_layers(model))


def describe(model: nn.Module) -> dict[str, Any]:
    """Adapter layers per adapter name (for messages and reports)."""
    out: dict[str, list[str]] = {}
    for name, layer in adapter_layers(model):
        for a in layer.adapter_names:
            out.setdefault(a, []).append(name)
    return out
