"""The user-facing wrapper: :class:`PeftModel`, :func:`get_peft_model`, :func:`inject_adapter_in_model`."""

from __future__ import annotations

import copy
import inspect
import json
import os
import types
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftkit.core import tuner
from peftkit.core.config import PeftConfig
from peftkit.core.io import (
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    atomic_write,
    atomic_write_folder,
    atomic_write_text,
    load_tensors,
    resolve_adapter_dir,
    save_tensors,
)
from peftkit.core.layer import adapter_layers, per_example_adapters
from peftkit.core.model_adapter import ModelAdapter
from peftkit.core.modules_to_save import ModulesToSaveWrapper
from peftkit.core.peft_compat import apply_key_mapping, cast_adapter_dtype, modules_addressed, targeted_module_names
from peftkit.core.registry import method_for_config
from peftkit.core.state import LoadResult, get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.core.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from peftkit.core.tuner import AdaptedModel
from peftkit.integrations.hub import push_adapters_to_hub
from peftkit.integrations.transformers import enable_input_require_grads, install_trainer_hook, teach_trainer

__all__ = ["PeftModel", "get_peft_model", "inject_adapter_in_model"]

DEFAULT = "default"


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    return os.fspath(name) if isinstance(name, os.PathLike) else name  # a Path given to from_pretrained


class PeftModel(nn.Module):
    """A model with one or more adapters of one method.

    Build it with :func:`get_peft_model` or :meth:`PeftModel.from_pretrained`. Attributes
    and methods it does not define (``config``, ``generate``...) are those of the wrapped
    model.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = DEFAULT,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> None:
        """Args:
            model: the model to adapt (modified in place).
            peft_config: the adapter's config.
            adapter_name: its name.
            autocast_adapter_dtype: keep the adapter's weights in float32 on a float16 or
                bfloat16 base (stable training); False gives them the base layer's dtype.
            low_cpu_mem_usage: accepted for PEFT's signature; adapter weights are created
                where the base weights are either way.
        """
        _refuse_unknown_kwargs(type(self).__name__, kwargs)
        teach_trainer()  # cheap when done already; covers a trainer the import hook did not see
        super().__init__()
        self.base_model = AdaptedModel(model)
        self.base_model.__dict__["_owner"] = weakref.ref(self)  # not a submodule: no cycle in the module tree
        # Adapters of methods that act on the model as a whole (see core/model_adapter.py).
        self.model_adapters = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._model_adapters_disabled = False
        self.add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)
        if _uses_gradient_checkpointing(model):
            enable_input_require_grads(model)
        _adopt_forward_signature(self)

    def __setstate__(self, state: dict[str, Any]) -> None:  # pickle and copy.deepcopy
        super().__setstate__(state)
        self.base_model.__dict__["_owner"] = weakref.ref(self)

    # -- pass-through ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its adapter layers in place)."""
        return self.base_model.model

    @property
    def _model(self) -> nn.Module:
        return self.base_model.model

    # -- adapters -------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else ""

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def peft_type(self) -> str:
        return type(self.active_peft_config).peft_type

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in the wrapped model) of the modules that carry an adapter, as PEFT lists them."""
        return targeted_module_names(self._model)

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True
    ) -> None:
        """Adds a new adapter (not made active). The model is unchanged if this fails.

        Args:
            autocast_adapter_dtype: as for the constructor.
            low_cpu_mem_usage: accepted for PEFT's signature.
        """
        if self.peft_config and getattr(peft_config, "bias", "none") != "none":
            raise ValueError(
                f"{type(self).__name__} supports one adapter with bias={peft_config.bias!r} (the biases it trains are "
                f"the model's own, shared by every adapter); set bias='none' for adapter {adapter_name!r}"
            )
        if self.peft_config:
            current = type(next(iter(self.peft_config.values()))).peft_type
            if type(peft_config).peft_type != current:
                raise ValueError(
                    f"this model holds {current} adapters; a {type(peft_config).peft_type} adapter cannot be added "
                    "beside them"
                )
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        if any(getattr(c, "bias", "none") != "none" for c in self.peft_config.values()):
            raise ValueError(
                "this model holds an adapter with bias != 'none', which supports no second adapter; "
                "create that adapter with bias='none' to hold several"
            )
        peft_config = copy.deepcopy(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _model_name(self._model)
        create_model_adapter = method_for_config(peft_config).create_model_adapter
        model_adapter = create_model_adapter(self._model, peft_config, adapter_name) if create_model_adapter else None
        tuner.inject_adapter(self._model, peft_config, adapter_name)
        cast_adapter_dtype(self._model, adapter_name, autocast_adapter_dtype)
        if model_adapter is not None:
            self.model_adapters[adapter_name] = model_adapter
        self.peft_config[adapter_name] = peft_config
        if self._active:  # layers created for the new adapter alone must not switch it on
            tuner.set_active_adapters(self._model, self._active, also_known=self.model_adapters.keys())
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        tuner.mark_trainable(self._model, self.peft_config, self._active)
        for name, model_adapter in self.model_adapters.items():
            train = name in self._active and not self.peft_config[name].inference_mode
            for p in model_adapter.parameters():
                p.requires_grad_(train)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Makes ``adapter_name`` (or several, applied together) the active adapter(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; loaded adapters: {sorted(self.peft_config)}")
        tuner.set_active_adapters(self._model, names, also_known=self.model_adapters.keys())
        self._active = names
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; loaded adapters: {sorted(self.peft_config)}")
        tuner.delete_adapter(self._model, adapter_name, missing_ok=adapter_name in self.model_adapters)
        if adapter_name in self.model_adapters:
            del self.model_adapters[adapter_name]
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active = remaining
        if remaining:
            tuner.set_active_adapters(self._model, remaining, also_known=self.model_adapters.keys())
        self._mark_trainable()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as the base model (merged adapters are
        unmerged on entry and merged again on exit)."""
        merged = {name: list(layer.merged_adapters) for name, layer in adapter_layers(self._model)}
        tuner.unmerge_adapters(self._model)
        layers = [layer for _, layer in adapter_layers(self._model)]
        # As in PEFT, the adapter's weights are not trainable inside the block.
        trainable = [p for p in self._adapter_parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        for layer in layers:
            layer.disabled = True
        self._model_adapters_disabled = True
        try:
            yield
        finally:
            for p in trainable:
                p.requires_grad_(True)
            self._model_adapters_disabled = False
            for layer in layers:
                layer.disabled = False
            for name, layer in adapter_layers(self._model):
                if merged.get(name):
                    layer.merge(merged[name])

    def _adapter_parameters(self) -> list[nn.Parameter]:
        params = [p for name in self.peft_config for _, layer in adapter_layers(self._model) for p in layer.adapter_parameters(name)]
        params.extend(self.model_adapters.parameters())
        return params

    def disable_adapter_layers(self) -> None:
        """Turns every adapter off until :meth:`enable_adapter_layers` (merged ones are unmerged)."""
        tuner.unmerge_adapters(self._model)
        for _, layer in adapter_layers(self._model):
            layer.disabled = True
        self._model_adapters_disabled = True

    def enable_adapter_layers(self) -> None:
        for _, layer in adapter_layers(self._model):
            layer.disabled = False
        self._model_adapters_disabled = False

    # -- merging --------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Folds the active adapters (or ``adapter_names``) into the base weights.

        Args:
            adapter_names: which adapters (default: the active ones).
            safe_merge: check the merged weights for NaN and infinity first; a broken adapter
                then raises ValueError and the weights stay as they were.
        """
        self._refuse_merge_of_model_adapters()
        names = list(adapter_names) if adapter_names is not None else self._active
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; loaded adapters: {sorted(self.peft_config)}")
        layers = [layer for _, layer in adapter_layers(self._model) if not isinstance(layer, ModulesToSaveWrapper)]
        if layers and all(all(n in layer.merged_adapters for n in names if n in layer.adapter_names) for layer in layers):
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return
        tuner.merge_adapters(self._model, names, safe_merge=safe_merge)

    def _refuse_merge_of_model_adapters(self) -> None:
        if self.model_adapters:
            kind = type(next(iter(self.peft_config.values()))).peft_type
            raise NotImplementedError(
                f"{kind} adapters change what the model is fed, not its weights, so they cannot be merged; "
                "keep using the PeftModel, or call unload() to get the base model back"
            )

    def unmerge_adapter(self) -> None:
        tuner.unmerge_adapters(self._model)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """The base model with the active adapters (or ``adapter_names``) folded into its
        weights and the adapter layers removed; trained ``modules_to_save`` replace the
        originals.

        Args:
            progressbar: show a progress bar over the layers (needs ``tqdm``).
            safe_merge: check the merged weights for NaN and infinity before keeping them; a
                broken adapter raises ValueError and the model stays as it was.
            adapter_names: merge these adapters instead of the active ones.
        """
        self._refuse_merge_of_model_adapters()
        if adapter_names is not None or safe_merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return tuner.unload_adapters(self._model, merge=True, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """The base model as it was, adapter layers removed (weights unmerged first)."""
        self.model_adapters.clear()
        return tuner.unload_adapters(self._model, merge=False)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """Adds ``adapter_name``, a weighted combination of existing adapters."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        config = next(iter(self.peft_config.values()))
        combine = method_for_config(config).extra.get("combine")
        if combine is None:
            raise NotImplementedError(f"{type(config).peft_type} adapters cannot be combined")
        new_config = combine(self._model, self.peft_config, adapters, weights, adapter_name, combination_type, svd_rank)
        self.peft_config[adapter_name] = new_config
        tuner.set_active_adapters(self._model, self._active, also_known=self.model_adapters.keys())
        self._mark_trainable()

    # -- parameters -----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        trainable = total = 0
        for p in self.parameters():
            n = _numel(p)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- forward --------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Calls the wrapped model. ``adapter_names`` gives one adapter per example (or
        ``"__base__"`` for none) and runs the mixed batch in one pass."""
        model_adapter = self._active_model_adapter(adapter_names)
        if model_adapter is not None:
            return model_adapter.forward_model(self._model, args, kwargs)
        if adapter_names is None:
            return self._model(*args, **kwargs)
        with per_example_adapters(self._model, adapter_names):
            return self._model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        model_adapter = self._active_model_adapter(adapter_names)
        if model_adapter is not None:
            return model_adapter.generate_model(self._model, args, kwargs)
        if adapter_names is None:
            return self._model.generate(*args, **kwargs)
        with per_example_adapters(self._model, adapter_names):
            return self._model.generate(*args, **kwargs)

    def _active_model_adapter(self, adapter_names: Sequence[str] | None) -> ModelAdapter | None:
        """The model-level adapter that forward/generate go through, or None."""
        if not self.model_adapters or self._model_adapters_disabled:
            return None
        active = [n for n in self._active if n in self.model_adapters]
        kind = type(next(iter(self.peft_config.values()))).peft_type
        if adapter_names is not None:
            raise NotImplementedError(f"{kind} adapters cannot be chosen per example (adapter_names)")
        if len(active) > 1:
            raise ValueError(f"{kind} adapters {active} are active together; set_adapter() one of them")
        return self.model_adapters[active[0]] if active else None

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self._model.gradient_checkpointing_enable(**kwargs)
        enable_input_require_grads(self._model)

    # -- files ----------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes each adapter as a folder (``default`` at the top, others in a subfolder
        named after them): ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``.

        The folder is replaced as a whole (written beside it, then swapped in): a reader or a
        crash finds the old adapters or the new ones, never a mix. Other files in it are kept.

        Args:
            safe_serialization: False writes ``adapter_model.bin`` (torch pickle) instead.
            selected_adapters: which adapters (default: all).
            save_embedding_layers: see :func:`~peftkit.get_peft_model_state_dict`.
            is_main_process: False writes nothing (the other processes of a distributed run).
            path_initial_model_for_weight_conversion: PEFT's PiSSA/OLoRA conversion; not
                supported (NotImplementedError when given).
            kwargs: ``state_dict`` (the full model's, as transformers' Trainer passes it) is
                accepted; the adapter's tensors are taken from it. Others are refused.
        """
        if path_initial_model_for_weight_conversion is not None:
            raise NotImplementedError(
                "path_initial_model_for_weight_conversion (converting a PiSSA/OLoRA adapter to plain LoRA on save) is "
                "not implemented in peftkit; save without it"
            )
        full_state = kwargs.pop("state_dict", None)
        kwargs.pop("max_shard_size", None)  # adapters are small; one file
        _refuse_unknown_kwargs("save_pretrained", {k: v for k, v in kwargs.items() if k != "convert_pissa_to_lora"})
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        if not names:
            raise ValueError(
                "there is no adapter to save: " + ("selected_adapters is empty" if self.peft_config else
                                                   "the model holds none (the last one was deleted); add one first")
            )
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; loaded adapters: {sorted(self.peft_config)}")
        if os.path.isfile(save_directory):
            raise ValueError(f"{os.fspath(save_directory)!r} is a file; save_pretrained needs a folder path")
        atomic_write_folder(
            save_directory, lambda root: self._write_adapters(root, names, safe_serialization, full_state, save_embedding_layers)
        )

    def _write_adapters(
        self, root: str, names: list[str], safe_serialization: bool = True,
        full_state: dict[str, torch.Tensor] | None = None, save_embedding_layers: str | bool = "auto",
    ) -> None:
        for name in names:
            directory = root if name == DEFAULT else os.path.join(root, name)
            os.makedirs(directory, exist_ok=True)
            state = get_peft_model_state_dict(self, full_state, adapter_name=name, save_embedding_layers=save_embedding_layers)
            if safe_serialization:
                save_tensors(os.path.join(directory, WEIGHTS_NAME), state)
            else:
                clean = {k: v.detach().contiguous().clone() for k, v in state.items()}
                atomic_write(os.path.join(directory, LEGACY_WEIGHTS_NAME), lambda tmp, clean=clean: torch.save(clean, tmp))
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(directory)
            atomic_write_text(os.path.join(directory, "README.md"), _model_card(config, state))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = DEFAULT,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wraps ``model`` with the adapter saved in ``model_id`` (a folder written by
        peftkit or Hugging Face PEFT). On any error ``model`` is left unchanged.

        Called on :class:`PeftModel` it returns the task class the adapter's ``task_type``
        names (:class:`PeftModelForCausalLM`, ...), as PEFT does.

        Args:
            key_mapping: ``{regex: replacement}`` applied to the file's keys (with the
                ``base_model.model.`` prefix removed) before loading.
            autocast_adapter_dtype: as for the constructor.
            ephemeral_gpu_offload, low_cpu_mem_usage: accepted for PEFT's signature.
            kwargs: ``revision``, ``token``, ``cache_dir`` and other hub-download options
                are accepted for a local folder.
        """
        directory = resolve_adapter_dir(model_id, subfolder)
        config = copy.copy(config) if config is not None else PeftConfig.from_pretrained(directory)
        if cls is PeftModel:
            cls = _TASK_CLASSES.get(str(config.task_type), PeftModel)  # type: ignore[assignment]
        state = apply_key_mapping(load_tensors(directory), key_mapping)
        return cls.from_state(model, config, state, adapter_name, is_trainable, autocast_adapter_dtype)

    @classmethod
    def from_state(cls, model: nn.Module, config: PeftConfig, state: dict[str, torch.Tensor],
                   adapter_name: str = DEFAULT, is_trainable: bool = False, autocast_adapter_dtype: bool = True) -> PeftModel:
        """Wraps ``model`` with a new adapter of ``config`` holding the tensors of ``state``
        (file keys). On any error ``model`` is left unchanged."""
        config.inference_mode = not is_trainable
        trainable = {p: p.requires_grad for p in model.parameters()}
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            set_peft_model_state_dict(peft_model, state, adapter_name)
        except Exception:
            peft_model.unload()
            for p, flag in trainable.items():  # wrapping froze the base
                p.requires_grad_(flag)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> LoadResult:
        """Loads a saved adapter beside the existing ones (not made active). Into an adapter
        name that exists already, the file's weights replace that adapter's (how
        transformers' Trainer reloads a checkpoint).

        Args:
            torch_device: where the file's tensors are read to (default: CPU; they are then
                copied to where the adapter lives).
            autocast_adapter_dtype: as for the constructor.
            key_mapping: as for :meth:`from_pretrained`.
            ephemeral_gpu_offload, low_cpu_mem_usage: accepted for PEFT's signature.
            kwargs: ``ignore_mismatched_sizes`` and hub-download options.

        Returns:
            A :class:`~peftkit.core.state.LoadResult` (``missing_keys``, ``unexpected_keys``).
        """
        directory = resolve_adapter_dir(model_id, subfolder)
        state = apply_key_mapping(load_tensors(directory, device=torch_device or "cpu"), key_mapping)
        ignore = bool(kwargs.get("ignore_mismatched_sizes", False))
        if adapter_name in self.peft_config:
            return set_peft_model_state_dict(self, state, adapter_name, ignore_mismatched_sizes=ignore)
        config = PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            result = set_peft_model_state_dict(self, state, adapter_name, ignore_mismatched_sizes=ignore)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if is_trainable:
            for _, layer in adapter_layers(self._model):
                for p in layer.adapter_parameters(adapter_name):
                    p.requires_grad_(True)
        return result

    # -- status ---------------------------------------------------------------------
    def get_layer_status(self) -> list[TunerLayerStatus]:
        """One entry per adapter layer: its name, type, adapters, which are active, merged,
        trainable, and the devices of their weights (PEFT's ``get_layer_status``)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The model-wide summary of :meth:`get_layer_status` (PEFT's ``get_model_status``);
        a field whose layers disagree reads ``"irregular"``."""
        return get_model_status(self)

    # -- hub --------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload adapter", create_pr: bool = False, **kwargs: Any) -> Any:
        """Saves the adapters and uploads them to the hub repository ``repo_id`` (created if
        needed). Needs ``huggingface_hub`` and a reachable hub endpoint; offline it raises
        ConnectionError saying so.

        Returns:
            The hub's commit information.
        """
        return push_adapters_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                                    create_pr=create_pr, **kwargs)


def _adopt_forward_signature(peft_model: PeftModel) -> None:
    """Gives this instance's ``forward`` the wrapped model's signature (plus ``adapter_names``),
    so tools that inspect it (the transformers ``Trainer`` keeps only the dataset columns
    ``forward`` names) see the real inputs. A per-instance function object carries the
    signature; binding it with ``MethodType`` keeps ``copy.deepcopy`` working."""
    try:
        inner = inspect.signature(peft_model.get_base_model().forward)
    except (TypeError, ValueError):
        return
    params = list(inner.parameters.values())
    if "adapter_names" not in inner.parameters:
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    params.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    template = PeftModel.forward
    func = types.FunctionType(template.__code__, template.__globals__, "forward", template.__defaults__, template.__closure__)
    func.__kwdefaults__ = template.__kwdefaults__
    func.__doc__ = template.__doc__
    try:
        func.__signature__ = inner.replace(parameters=params)  # type: ignore[attr-defined]
    except ValueError:  # parameter order the signature cannot express; keep the generic one
        return
    peft_model.forward = types.MethodType(func, peft_model)  # type: ignore[method-assign]


# task_type -> PeftModel subclass (filled by peftkit.task_models): get_peft_model and
# PeftModel.from_pretrained pick the class from the config, as PEFT does.
_TASK_CLASSES: dict[str, type[PeftModel]] = {}


def _refuse_unknown_kwargs(where: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"{where} got unexpected keyword arguments {sorted(kwargs)}")


def _uses_gradient_checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(model)):
            return bool(getattr(model, attr))
    return False


def _numel(p: torch.Tensor) -> int:
    # 4-bit packed weights store two values per byte.
    if hasattr(p, "quant_state") and p.dtype == torch.uint8:
        return p.numel() * 2
    return p.numel()


def _model_card(config: PeftConfig, state: dict[str, torch.Tensor]) -> str:
    n = sum(t.numel() for t in state.values())
    base = config.base_model_name_or_path or "(not recorded)"
    # The folder is in PEFT's format and tools that read the card look for this name.
    header = "---\nlibrary_name: peft\n"
    if config.base_model_name_or_path:
        header += f"base_model: {json.dumps(config.base_model_name_or_path)}\n"
    return (
        header + "tags:\n- peftkit\n- " + type(config).peft_type.lower() + "\n---\n\n"
        f"# {type(config).peft_type} adapter\n\nWritten by peftkit in Hugging Face PEFT's adapter format.\n\n"
        f"- base model: `{base}`\n- task type: `{config.task_type}`\n- parameters: {n:,d} in {len(state)} tensors\n\n"
        "Load with `peftkit.PeftModel.from_pretrained(base_model, path)` "
        "(or `peft.PeftModel.from_pretrained`, same format).\n"
    )


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = DEFAULT,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wraps ``model`` with a new adapter; only the adapter's parameters are trainable.

    Args:
        model: a transformers model or any ``nn.Module`` (modified in place).
        peft_config: a method config, e.g. ``LoraConfig(r=8, target_modules=["q_proj", "v_proj"])``.
        adapter_name: the adapter's name.
        mixed: PEFT's mixed-method model; not supported (NotImplementedError when True).
        autocast_adapter_dtype: keep adapter weights in float32 on float16/bfloat16 bases.
        revision: the base model's hub revision, recorded in the config.
        low_cpu_mem_usage: accepted for PEFT's signature.

    Returns:
        The :class:`PeftModel`, or the task class ``peft_config.task_type`` names
        (:class:`PeftModelForCausalLM`, ...).
    """
    if mixed:
        raise NotImplementedError(
            "mixed=True (PEFT's PeftMixedModel, adapters of several methods in one model) is not implemented in "
            "peftkit; a model holds adapters of one method"
        )
    if any(True for _ in adapter_layers(model)) or isinstance(model, PeftModel):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time: it already holds adapters. To add another "
            "adapter, call add_adapter() on the PeftModel; to start over, unload() it first.",
            UserWarning,
            stacklevel=2,
        )
    if revision is not None:
        peft_config = copy.copy(peft_config)
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, overwriting "
                          f"with revision {revision}", UserWarning, stacklevel=2)
        peft_config.revision = revision
    cls = _TASK_CLASSES.get(str(peft_config.task_type), PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = DEFAULT,
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Adds an adapter to a plain module in place, without a :class:`PeftModel` wrapper.
    Parameter keys then have no ``base_model.model.`` prefix.

    Args:
        low_cpu_mem_usage: accepted for PEFT's signature.
        state_dict: an adapter state dict (file keys, with or without ``base_model.model.``):
            the adapter is put on exactly the modules its keys address, in place of
            ``target_modules`` (the tensors are not loaded; use
            :func:`~peftkit.set_peft_model_state_dict`).
    """
    if state_dict is not None:
        peft_config = copy.copy(peft_config)
        peft_config.target_modules = modules_addressed(model, state_dict)  # type: ignore[attr-defined]
    if method_for_config(peft_config).create_model_adapter is not None:
        raise ValueError(
            f"{type(peft_config).peft_type} adapters change the model's inputs rather than its modules and need the "
            "PeftModel wrapper: use get_peft_model(model, config)"
        )
    tuner.inject_adapter(model, peft_config, adapter_name)
    configs = dict(getattr(model, "_peftkit_configs", {}) or {})
    configs[adapter_name] = peft_config
    model._peftkit_configs = configs  # type: ignore[assignment]
    tuner.mark_trainable(model, configs, [adapter_name])
    return model


install_trainer_hook()  # transformers' Trainer then saves and reloads adapters, not whole models
