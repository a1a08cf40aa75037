"""Reading what the soft-prompt methods need from a model, completing the config, and
building the initial virtual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.core.config import TaskType
from peftkit.methods.prompt.config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from peftkit.methods.prompt.encoders import (
    VirtualTokens,
    lstm_head,
    mlp_head,
    prefix_projection_head,
)

__all__ = ["ModelSpec", "complete_config", "initial_tokens", "inspect_model"]


@dataclass(frozen=True)
class ModelSpec:
    """What the soft-prompt methods read from a model.

    Args:
        embed_path: module path of the input word embeddings.
        embed_dim: their width.
        vocab_size: their number of rows.
        num_layers: transformer layers (None when the model has no config).
        cache_layers: layers whose attention reads the prefix cache (the decoder's for
            encoder–decoder models).
        num_heads: attention heads.
        kv_heads: key/value heads (fewer than ``num_heads`` with grouped-query attention).
        head_dim: width of one head.
        is_encoder_decoder: T5-style model.
        has_lm_head: the model predicts tokens (``get_output_embeddings()`` is set).
    """

    embed_path: str
    embed_dim: int
    vocab_size: int
    num_layers: int | None
    cache_layers: int | None
    num_heads: int | None
    kv_heads: int | None
    head_dim: int | None
    is_encoder_decoder: bool
    has_lm_head: bool


def _int_attr(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _input_embeddings(model: nn.Module) -> tuple[str, nn.Embedding]:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get_in):
        try:
            emb = get_in()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is None:
        vocab = _int_attr(getattr(model, "config", None), "vocab_size")
        emb = next(
            (m for m in model.modules() if isinstance(m, nn.Embedding) and (vocab is None or m.num_embeddings == vocab)),
            None,
        )
    if emb is None or getattr(emb, "weight", None) is None:
        raise ValueError(
            "soft prompts are placed before the input embeddings, but this model has no get_input_embeddings() and "
            "no nn.Embedding of its vocabulary size"
        )
    for name, module in model.named_modules():
        if module is emb:
            return name, emb
    raise ValueError("the input embeddings are not a submodule of the model")


def inspect_model(model: nn.Module) -> ModelSpec:
    """Reads sizes from ``model.config`` (its text config for multimodal models)."""
    path, emb = _input_embeddings(model)
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        config = get_text()
    num_layers = _int_attr(config, "num_hidden_layers", "num_layers", "n_layer")
    num_heads = _int_attr(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _int_attr(config, "hidden_size", "n_embd", "d_model")
    head_dim = _int_attr(config, "head_dim", "d_kv")
    if head_dim is None and hidden is not None and num_heads:
        head_dim = hidden // num_heads
    is_enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        has_lm_head = callable(get_out) and get_out() is not None
    except (NotImplementedError, AttributeError):
        has_lm_head = False
    return ModelSpec(
        embed_path=path,
        embed_dim=int(emb.weight.shape[1]),
        vocab_size=int(emb.weight.shape[0]),
        num_layers=num_layers,
        cache_layers=_int_attr(config, "num_decoder_layers") if is_enc_dec else num_layers,
        num_heads=num_heads,
        kv_heads=_int_attr(config, "num_key_value_heads") or num_heads,
        head_dim=head_dim,
        is_encoder_decoder=is_enc_dec,
        has_lm_head=has_lm_head,
    )


def _resolve_task(config: PromptLearningConfig, spec: ModelSpec) -> str:
    task = config.task_type
    if task is None:
        if spec.is_encoder_decoder:
            task = TaskType.SEQ_2_SEQ_LM.value
        else:
            task = TaskType.CAUSAL_LM.value if spec.has_lm_head else TaskType.SEQ_CLS.value
        config.task_type = task
    if task == TaskType.SEQ_2_SEQ_LM.value and not spec.is_encoder_decoder:
        raise ValueError("task_type='SEQ_2_SEQ_LM' needs an encoder–decoder model (T5-style); this model is not one")
    if task != TaskType.SEQ_2_SEQ_LM.value and spec.is_encoder_decoder:
        raise ValueError(f"this is an encoder–decoder model: use task_type='SEQ_2_SEQ_LM', not {task!r}")
    return task


def complete_config(config: PromptLearningConfig, spec: ModelSpec, uses_cache: bool) -> None:
    """Fills the model-derived fields left None and checks those given against the model.

    Raises:
        ValueError: naming the field, the file's value and the model's, when they differ.
    """
    task = _resolve_task(config, spec)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if task == TaskType.SEQ_2_SEQ_LM.value else 1
    if config.num_layers is None:
        config.num_layers = spec.num_layers
    if uses_cache:
        if spec.num_layers is None or spec.kv_heads is None or spec.head_dim is None:
            raise ValueError("prefix tuning needs a transformers model whose config gives layers, heads and head size")
        if config.num_attention_heads is None:
            config.num_attention_heads = spec.kv_heads
        if config.token_dim is None:
            config.token_dim = spec.kv_heads * spec.head_dim
        model_values = {"num_layers": spec.num_layers, "num_attention_heads": spec.kv_heads,
                        "token_dim": spec.kv_heads * spec.head_dim}
    else:
        if config.num_attention_heads is None:
            config.num_attention_heads = spec.num_heads
        if config.token_dim is None:
            config.token_dim = spec.embed_dim
        model_values = {"token_dim": spec.embed_dim}
    for name, expected in model_values.items():
        if getattr(config, name) != expected:
            raise ValueError(
                f"{type(config).__name__}.{name} is {getattr(config, name)} but the model has {expected}; the adapter "
                f"was made for a different model (or leave {name}=None to read it from the model)"
            )
    if getattr(config, "encoder_hidden_size", "absent") is None:
        config.encoder_hidden_size = config.token_dim  # type: ignore[attr-defined]


def _param_dtype(weight: torch.Tensor) -> torch.dtype:
    # Train in float32 even on a half-precision model; vectors are cast where used.
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _random(rows: int, width: int, embedding: torch.Tensor) -> torch.Tensor:
    """Normal with the spread of the word embeddings: the scale real inputs have."""
    std = float(embedding.detach().float().std()) or 1.0
    return torch.randn(rows, width, device=embedding.device, dtype=_param_dtype(embedding)) * std


def _text_token_ids(config: PromptTuningConfig, vocab_size: int, rows: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover
        raise ImportError("prompt_tuning_init='TEXT' loads a tokenizer: pip install transformers") from exc
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = list(tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens")
    if max(ids) >= vocab_size:
        raise ValueError(f"the tokenizer gives ids up to {max(ids)} but the model's vocabulary has {vocab_size} rows")
    ids = (ids * math.ceil(rows / len(ids)))[:rows]
    return torch.tensor(ids, dtype=torch.long)


def _prompt_table(config: PromptTuningConfig, embedding: torch.Tensor, rows: int) -> torch.Tensor:
    if config.inference_mode:  # the table is about to be loaded from a file
        return torch.zeros(rows, embedding.shape[1], device=embedding.device, dtype=_param_dtype(embedding))
    init = config.prompt_tuning_init
    if init == PromptTuningInit.RANDOM.value:
        return _random(rows, embedding.shape[1], embedding)
    vocab = embedding.shape[0]
    if init == PromptTuningInit.SAMPLE_VOCAB.value:
        ids = torch.randperm(vocab)[:rows] if rows <= vocab else torch.randint(0, vocab, (rows,))
    else:
        ids = _text_token_ids(config, vocab, rows)
    return embedding.detach()[ids.to(embedding.device)].to(_param_dtype(embedding)).clone()


def initial_tokens(config: PromptLearningConfig, spec: ModelSpec, embedding: torch.Tensor) -> VirtualTokens:
    """The trained module for ``config``, on the device of the model's embeddings.

    In inference mode no re-parametrisation is built: the saved table is loaded as is.
    """
    rows, width = config.total_virtual_tokens, int(config.token_dim)  # type: ignore[arg-type]
    train_head = not config.inference_mode
    head: nn.Module | None = None
    if isinstance(config, PromptTuningConfig):
        table = _prompt_table(config, embedding, rows)
    elif isinstance(config, PromptEncoderConfig):
        table = _random(rows, width, embedding)
        if train_head:
            make = lstm_head if config.encoder_reparameterization_type == "LSTM" else mlp_head
            head = make(width, int(config.encoder_hidden_size), config.encoder_num_layers, float(config.encoder_dropout))  # type: ignore[arg-type]
    elif isinstance(config, PrefixTuningConfig):
        n, out_width = config.num_virtual_tokens, 2 * int(config.num_layers) * width  # type: ignore[arg-type]
        if config.prefix_projection and train_head:
            table = _random(int(n), width, embedding)
            head = prefix_projection_head(width, int(config.encoder_hidden_size), out_width)  # type: ignore[arg-type]
            if config.init_weights == "zero":
                nn.init.zeros_(head[-1].weight)  # type: ignore[index]
                nn.init.zeros_(head[-1].bias)  # type: ignore[index]
        elif config.init_weights == "zero":
            table = torch.zeros(int(n), out_width, device=embedding.device, dtype=_param_dtype(embedding))
        else:
            table = _random(int(n), out_width, embedding)
    else:  # pragma: no cover - registration maps only the three configs here
        raise TypeError(f"not a soft-prompt config: {type(config).__name__}")
    tokens = VirtualTokens(table, head)
    return tokens.to(device=embedding.device, dtype=table.dtype)
