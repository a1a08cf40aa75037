"""The method registry: one entry per method, registered by the method's own package.

Shared code looks methods up here by their ``peft_type`` and never names one. A method
that needs special treatment adds a hook to its :class:`Method` entry.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from peftkit.core.config import PeftConfig
    from peftkit.core.layer import AdapterLayer
    from peftkit.core.model_adapter import ModelAdapter
    from peftkit.core.training import TrainingHooks

__all__ = ["Method", "all_methods", "get_method", "list_methods", "register_method"]


@dataclass(frozen=True)
class Method:
    """How a method plugs into the core.

    Args:
        peft_type: identifier written in ``adapter_config.json``.
        config_cls: the method's config dataclass.
        description: one line, shown by ``peftkit methods``.
        supported: human-readable list of the module types the method can wrap.
        is_supported: whether a module can be wrapped.
        create_layer: ``(module, adapter_name, config, module_name) -> AdapterLayer``
            wraps a target module with a new adapter. None for a method that wraps nothing:
            one with a ``create_model_adapter``, or one that trains the model's own
            parameters in place (``trainable_base_parameters`` names them; see ``core/inplace.py``).
        trainable_base_parameters: ``(model, config, target_names) -> [param names]`` of
            existing parameters the method trains and saves with the adapter (e.g. biases).
        default_targets: ``(model) -> target spec`` used when ``target_modules`` is None.
        check_target: ``(module, config, module_name) -> None`` raises when the config cannot
            adapt this module (called for every target before the model is changed; the
            module may be an existing adapter layer of the method).
        extra_targets: ``(model, config) -> [module names]`` adapted besides those
            ``target_modules`` names, found another way (by the parameters they hold, say);
            they go through ``check_target`` and ``create_layer`` like the others.
        prepare_config: ``(model, config) -> None`` fills model-dependent fields of the
            config (default targets, say) before anything is matched, so that the saved
            config names them explicitly.
        create_model_adapter: ``(model, config, adapter_name) -> ModelAdapter`` for methods
            that act on the model as a whole (its inputs, its attention cache). It may fill
            in config fields derived from the model. ``PeftModel`` routes ``forward`` and
            ``generate`` through the active one.
        file_key_prefix: prefix of file keys for tensors inside the wrapped model (e.g. a
            trained classification head); None means ``base_model.model.``.
        training_hooks: ``(config, options) -> TrainingHooks | None``: what the method runs
            around a training loop (see ``core/training.py``); ``options`` is an instance of
            ``training_options``. None (or a None result): plain gradient steps suffice.
        training_options: a dataclass of the run-config keys the hooks take besides the
            config's own fields (``method: {name: lora, adaptive_target_r: 4}``); they steer
            training and are not saved with the adapter.
        shared_state: ``(model, adapter_name, config) -> {key: tensor}`` for tensors an
            adapter keeps once for the whole model rather than per layer (shared random
            projections, say). Keys are relative to the ``PeftModel`` (``base_model.<key>``
            in the file); loading copies the file's values into the returned tensors.
        presets: named starting points for ``peftkit compare``: ``{name: {"method": {...},
            "train": {...}}}``, the method's options and the training settings it wants.
        default: the method of a run config that names none (one method only).
        extra: further hooks, looked up by key: ``"combine"`` (``add_weighted_adapter``);
            ``"convert"``: ``(model, rank=, bias=, pretrained=) -> result`` turns any mergeable
            adapter into one of this method (``peftkit convert RUN --to <method>``); the result
            has ``save_pretrained(folder)``, ``apply(model)``, ``table()``, ``max_error`` and
            ``source_type``.
    """

    peft_type: str
    config_cls: type[PeftConfig]
    description: str
    supported: str
    is_supported: Callable[[nn.Module], bool]
    create_layer: Callable[[nn.Module, str, Any, str], AdapterLayer] | None
    trainable_base_parameters: Callable[[nn.Module, Any, list[str]], list[str]] | None = None
    default_targets: Callable[[nn.Module], Any] | None = None
    check_target: Callable[[nn.Module, Any, str], None] | None = None
    extra_targets: Callable[[nn.Module, Any], list[str]] | None = None
    prepare_config: Callable[[nn.Module, Any], None] | None = None
    create_model_adapter: Callable[[nn.Module, Any, str], ModelAdapter] | None = None
    file_key_prefix: str | None = None
    training_hooks: Callable[[Any, Any], TrainingHooks | None] | None = None
    training_options: type | None = None
    shared_state: Callable[[nn.Module, str, Any], dict[str, Any]] | None = None
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.create_layer is None and self.create_model_adapter is None and self.trainable_base_parameters is None:
            raise ValueError(
                f"{self.peft_type}: a method needs create_layer (it wraps modules), create_model_adapter (it acts on "
                "the whole model) or trainable_base_parameters (it trains the model's own parameters in place)"
            )


_REGISTRY: dict[str, Method] = {}
_loaded = False


def register_method(method: Method) -> Method:
    """Adds a method to the registry (idempotent for the same config class)."""
    existing = _REGISTRY.get(method.peft_type)
    if existing is not None and existing.config_cls is not method.config_cls:
        raise ValueError(f"peft_type {method.peft_type!r} is already registered by {existing.config_cls}")
    _REGISTRY[method.peft_type] = method
    return method


#: the entry-point group through which installed packages add methods: each entry names a
#: module (importing it registers its methods) or a registered :class:`Method`
ENTRY_POINT_GROUP = "peftkit.methods"


def _load_builtins() -> None:
    """Imports every package under ``peftkit.methods`` (each registers its method), then the
    methods installed packages add through the ``peftkit.methods`` entry points."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import peftkit.methods

    for info in pkgutil.iter_modules(peftkit.methods.__path__):
        importlib.import_module(f"peftkit.methods.{info.name}")
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found = entry.load()
        if isinstance(found, Method):
            register_method(found)


def get_method(peft_type: str) -> Method:
    """The registered method for ``peft_type`` (e.g. ``"LORA"``)."""
    _load_builtins()
    key = str(getattr(peft_type, "value", peft_type))
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key.upper(), list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown peft_type {key!r}{hint} Known methods: {sorted(_REGISTRY)}")
    return _REGISTRY[key]


def method_for_config(config: PeftConfig) -> Method:
    return get_method(type(config).peft_type)


def all_methods() -> list[Method]:
    """Every registered method, by ``peft_type``."""
    _load_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def default_method() -> Method:
    """The method marked ``default`` (what a run config without a method gets)."""
    marked = [m for m in all_methods() if m.default]
    if len(marked) != 1:
        raise ValueError(f"{len(marked)} methods are marked default; exactly one must be")
    return marked[0]


def list_methods() -> dict[str, str]:
    """``{peft_type: one-line description}`` for every registered method."""
    _load_builtins()
    return {name: m.description for name, m in sorted(_REGISTRY.items())}
