"""Soft prompts: prompt tuning, prefix tuning and P-tuning.

Every weight of the model stays as it is; the methods learn vectors the model is fed
alongside its input:

- prompt tuning: ``[P; E(x)]`` with ``P`` (n × d) trained;
- P-tuning: ``[f(E'); E(x)]`` with a small MLP/LSTM ``f`` folded away for saving;
- prefix tuning: ``attn(q, [P_k; K], [P_v; V])`` in every layer, through the attention cache.

Files hold one tensor, ``prompt_embeddings``, as Hugging Face PEFT's do.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.core.registry import Method, register_method
from peftkit.methods.prompt.adapter import PromptAdapter
from peftkit.methods.prompt.build import complete_config, initial_tokens, inspect_model
from peftkit.methods.prompt.config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

__all__ = [
    "PrefixTuningConfig",
    "PromptAdapter",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "create_prompt_adapter",
]


def _uses_gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def create_prompt_adapter(model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> PromptAdapter:
    """Builds the virtual tokens for ``model``, completing ``config`` from it in place
    (task type when None, ``token_dim``, ``num_layers``, ``num_attention_heads``,
    ``num_transformer_submodules``, ``encoder_hidden_size``).

    Raises:
        ValueError: the config does not fit the model, or prefix tuning is asked of a model
            with gradient checkpointing (which drops the attention cache).
    """
    if config.num_virtual_tokens is None:
        raise ValueError(f"{type(config).__name__} needs num_virtual_tokens to build an adapter, e.g. num_virtual_tokens=20")
    uses_cache = isinstance(config, PrefixTuningConfig)
    spec = inspect_model(model)
    complete_config(config, spec, uses_cache)
    if uses_cache and _uses_gradient_checkpointing(model):
        raise ValueError(
            "prefix tuning passes its prefixes through the attention cache, which gradient checkpointing disables; "
            "turn gradient checkpointing off or use prompt tuning"
        )
    embedding = model.get_submodule(spec.embed_path).weight
    return PromptAdapter(config, initial_tokens(config, spec, embedding), spec, uses_cache)


def _no_module(_module: nn.Module) -> bool:
    return False


def _register(peft_type: str, config_cls: Any, description: str, presets: dict[str, Any] | None = None) -> Method:
    return register_method(
        Method(
            peft_type=peft_type,
            config_cls=config_cls,
            description=description,
            supported="no modules: the model's inputs (input embeddings or attention cache)",
            is_supported=_no_module,
            create_layer=None,
            create_model_adapter=create_prompt_adapter,
            # PEFT writes module tensors of these methods (a classification head) as `base_model.<path>`.
            file_key_prefix="base_model.",
            presets=presets or {},
        )
    )


PROMPT_TUNING = _register(
    "PROMPT_TUNING", PromptTuningConfig, "Prompt tuning: learned embeddings placed before the input",
    {"prompt": {"method": {"name": "prompt_tuning", "num_virtual_tokens": 20}, "train": {"lr": 3e-2}}},
)
PREFIX_TUNING = _register(
    "PREFIX_TUNING", PrefixTuningConfig, "Prefix tuning: learned keys and values prepended to those of every attention layer",
    {"prefix": {"method": {"name": "prefix_tuning", "num_virtual_tokens": 20}, "train": {"lr": 1e-2}}},
)
P_TUNING = _register(
    "P_TUNING", PromptEncoderConfig, "P-tuning: virtual tokens produced by a small MLP/LSTM prompt encoder"
)
