"""What ``peftkit serve BASE`` loads: a model folder, a hub id, ``minilm``, or a
``peftkit train`` run folder (its base, with the run's adapter under the run's name)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Served:
    """The loaded base and what the server should do with it."""

    model_id: str  # the name clients use for the base
    model: Any
    tokenizer: Any
    kind: str  # "generate" (causal LM), "classify" (a classifier) or "embed" (an encoder)
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter folder
    labels: list[str] | None = None
    path: str | None = None  # where the base loads from (a folder or a hub id), for training jobs on it


def context_length(model: Any, requested: int | None, default: int) -> int:
    """Prompt plus generated tokens at most: ``requested``, capped by the model's positions
    (``max_position_embeddings``, GPT-2's ``n_positions``); ``default`` when neither is known."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    known = [x for x in (requested, limit) if x]
    return min(known) if known else default


def _model_id(name: str) -> str:
    """The name clients use for a base: a folder's own name, else the name as given (``minilm``, a hub id)."""
    return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name


def _is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, "adapter"))


def _kind(model: Any) -> str:
    if getattr(model, "can_generate", lambda: False)():
        return "generate"
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "classify"
    return "embed"


def load_base(base: str, dtype: str = "auto") -> Served:
    """Loads ``base`` (see the module docstring). Raises ValueError naming what is wrong."""
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if os.path.isdir(base) and _is_run(base):
        return _load_run(base, dtype)
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from peftkit.train.modeling import MODEL_ALIASES, resolve_model_path

    path = resolve_model_path(base)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ValueError(f"{base!r} is neither a model folder, a reachable hub id, 'minilm', nor a peftkit run "
                         f"folder (config.yaml + adapter/): {exc}") from exc
    architectures = " ".join(config.architectures or [])
    if "CausalLM" in architectures or "LMHead" in architectures:
        auto = AutoModelForCausalLM
    elif "SequenceClassification" in architectures:
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModel
    model = auto.from_pretrained(path, dtype=_DTYPES[dtype]).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_id = base if base.lower() in MODEL_ALIASES else _model_id(base)
    labels = _labels(model)
    return Served(model_id, model, tokenizer, _kind(model), labels=labels, path=str(path))


def _labels(model: Any) -> list[str] | None:
    id2label = getattr(model.config, "id2label", None)
    return [str(id2label[i]) for i in sorted(id2label)] if id2label else None


def _load_run(run_dir: str, dtype: str) -> Served:
    from peftkit.train.modeling import resolve_model_path
    from peftkit.train.run import prepare_run

    prepared = prepare_run(run_dir)
    model = prepared.model.eval()
    if _DTYPES[dtype] is not None:
        model = model.to(_DTYPES[dtype])
    name = os.path.basename(os.path.normpath(run_dir))
    base_name = str(prepared.cfg.model.name)
    model_id = _model_id(base_name)
    labels = prepared.labels
    return Served(model_id, model, prepared.processor, _kind(model),
                  adapters={name: os.path.join(run_dir, "adapter")},
                  labels=[str(x) for x in labels] if labels else _labels(model),
                  path=str(resolve_model_path(base_name)))
