"""How soft prompts reach the model in ``forward`` and ``generate``.

Two ways, chosen by the method:

- **input vectors** (prompt tuning, P-tuning): ``inputs_embeds = [P; E(input_ids)]``, for
  encoder–decoder models on the encoder side;
- **attention cache** (prefix tuning): ``past_key_values`` pre-filled with the learned keys
  and values of every layer, for encoder–decoder models the decoder's self-attention.

The ``task_type`` decides which arguments are extended (see :mod:`.inputs`): masks and
position ids always, labels of causal LMs (virtual positions get -100), token types.

For causal LMs ``generate`` keeps transformers' own bookkeeping (lengths, masks, cache
positions, position ids from the mask, beam expansion) exact by generating from ``n``
placeholder ids in front of the input whose embeddings (input vectors) or cache entries
(prefix) are the virtual tokens; they are removed from the returned sequences. Encoder–
decoder models get the prompt on the encoder side, or start the decoder from the prefix
cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftkit.core.config import TaskType
from peftkit.core.model_adapter import ModelAdapter
from peftkit.methods.prompt.build import ModelSpec
from peftkit.methods.prompt.config import PromptLearningConfig
from peftkit.methods.prompt.encoders import VirtualTokens
from peftkit.methods.prompt.inputs import (
    cache_length,
    prefilled_cache,
    prefix_layers,
    prepend_ignored_labels,
    prepend_ones,
    prepend_positions,
    prepend_zeros,
    shift_positions,
)

__all__ = ["FILE_KEY", "PromptAdapter"]

FILE_KEY = "prompt_embeddings"

_CAUSAL = TaskType.CAUSAL_LM.value
_SEQ2SEQ = TaskType.SEQ_2_SEQ_LM.value


def _as_keywords(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    if not args:
        return kw
    if len(args) > 1 or "input_ids" in kw:
        raise TypeError("with a soft-prompt adapter pass the inputs by keyword (input_ids=..., attention_mask=...)")
    kw["input_ids"] = args[0]
    return kw


def _batch_size(kw: dict[str, Any], names: tuple[str, ...]) -> int:
    for name in names:
        value = kw.get(name)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
        if name == "encoder_outputs" and value is not None:
            return int(value[0].shape[0])
    raise ValueError(f"cannot tell the batch size: pass one of {list(names)}")


def _update(kw: dict[str, Any], name: str, fn: Any, n: int) -> None:
    if kw.get(name) is not None:
        kw[name] = fn(kw[name], n)


class PromptAdapter(ModelAdapter):
    """The model-level adapter of prompt tuning, prefix tuning and P-tuning.

    Args:
        config: the completed config (model-derived fields filled).
        tokens: the trained virtual tokens.
        spec: what was read from the model.
        uses_cache: True for prefix tuning (attention cache), False for input vectors.
    """

    def __init__(self, config: PromptLearningConfig, tokens: VirtualTokens, spec: ModelSpec, uses_cache: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.config = config
        self.spec = spec
        self.uses_cache = uses_cache

    @property
    def n(self) -> int:
        return int(self.config.num_virtual_tokens)  # type: ignore[arg-type]

    # -- files ----------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"prompt_embeddings": P}``: the virtual tokens with any re-parametrisation
        evaluated (``total_virtual_tokens × token_dim``; prefix tuning:
        ``num_virtual_tokens × 2·num_layers·token_dim``)."""
        return {FILE_KEY: self.tokens.table()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads ``P``. A re-parametrised adapter (P-tuning's network, prefix projection)
        is folded first: training continues on the loaded table itself."""
        table = state[FILE_KEY]
        if self.tokens.reparametrised:
            self.tokens.fold(table)
            return
        with torch.no_grad():
            self.tokens.embedding.copy_(table.to(self.tokens.embedding.device, self.tokens.embedding.dtype))

    # -- pieces ---------------------------------------------------------------------------
    def _embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.spec.embed_path)

    def _embed(self, model: nn.Module, input_ids: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("pass input_ids or inputs_embeds")
        return self._embedding(model)(input_ids)

    def _prompts(self, like: torch.Tensor) -> torch.Tensor:
        """``(batch, n, dim)`` virtual input vectors in the dtype of ``like``. The saved
        table of an encoder–decoder model holds 2n rows; the first n feed the encoder."""
        prompts = self.tokens()[: self.n].to(device=like.device, dtype=like.dtype)
        return prompts.unsqueeze(0).expand(like.shape[0], -1, -1)

    def _cache(self, model: nn.Module, batch: int) -> Any:
        weight = self._embedding(model).weight
        table = self.tokens().to(device=weight.device, dtype=weight.dtype)
        encoder_decoder = self.config.task_type == _SEQ2SEQ
        layers = prefix_layers(
            table,
            num_layers=int(self.config.num_layers),  # type: ignore[arg-type]
            num_heads=int(self.config.num_attention_heads),  # type: ignore[arg-type]
            cache_layers=int(self.spec.cache_layers or self.config.num_layers),  # type: ignore[arg-type]
            encoder_decoder=encoder_decoder,
            batch=batch,
        )
        return prefilled_cache(layers, getattr(model, "config", None), encoder_decoder)

    # -- forward --------------------------------------------------------------------------
    def forward_model(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kw = _as_keywords(args, kwargs)
        return model(**(self._with_cache(model, kw) if self.uses_cache else self._with_vectors(model, kw)))

    def _with_vectors(self, model: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        """Input vectors. A causal LM continuing from a cache (that already holds the
        prompt) only gets its mask and positions extended."""
        n, task = self.n, self.config.task_type
        if task != _SEQ2SEQ and cache_length(_given_cache(kw)) > 0:
            _update(kw, "attention_mask", prepend_ones, n)
            _update(kw, "position_ids", shift_positions, n)
            return kw
        if task == _SEQ2SEQ and kw.get("input_ids") is None and kw.get("inputs_embeds") is None:
            # Encoder outputs computed earlier (by this model) hold the prompt already; a mask
            # that covers only the caller's tokens is extended to them.
            encoded = kw.get("encoder_outputs")
            mask = kw.get("attention_mask")
            if encoded is not None and mask is not None and mask.shape[1] + n == encoded[0].shape[1]:
                kw["attention_mask"] = prepend_ones(mask, n)
            return kw
        embeds = kw.pop("inputs_embeds", None)
        input_ids = kw.pop("input_ids", None)
        if embeds is None:
            embeds = self._embed(model, input_ids)
        kw["inputs_embeds"] = torch.cat([self._prompts(embeds), embeds], dim=1)
        _update(kw, "attention_mask", prepend_ones, n)
        _update(kw, "token_type_ids", prepend_zeros, n)
        _update(kw, "position_ids", prepend_positions, n)
        if task == _CAUSAL:
            _update(kw, "labels", prepend_ignored_labels, n)
        return kw

    def _with_cache(self, model: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        """Attention cache: a fresh prefix cache unless the caller continues from one (it
        then holds the prefix already); masks and positions cover the prefix."""
        n = self.n
        if self.config.task_type == _SEQ2SEQ:
            if cache_length(_given_cache(kw)) == 0:
                names = ("decoder_input_ids", "decoder_inputs_embeds", "labels", "input_ids", "inputs_embeds",
                         "encoder_outputs")
                _set_cache(model, kw, self._cache(model, _batch_size(kw, names)))
            _update(kw, "decoder_attention_mask", prepend_ones, n)
            return kw
        if cache_length(_given_cache(kw)) == 0:
            _set_cache(model, kw, self._cache(model, _batch_size(kw, ("input_ids", "inputs_embeds"))))
        _update(kw, "attention_mask", prepend_ones, n)
        _update(kw, "position_ids", shift_positions, n)
        return kw

    # -- generate -------------------------------------------------------------------------
    def generate_model(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kw = _as_keywords(args, kwargs)
        task = self.config.task_type
        if task not in (_CAUSAL, _SEQ2SEQ):
            raise ValueError(f"generate() needs task_type 'CAUSAL_LM' or 'SEQ_2_SEQ_LM'; this adapter is for {task!r}")
        if cache_length(_given_cache(kw)) > 0:
            raise ValueError("generate() with a soft-prompt adapter starts from the inputs: pass no cache (past_key_values)")
        if self.uses_cache and kw.get("use_cache") is False:
            raise ValueError("prefix tuning lives in the attention cache: generate() needs use_cache=True")
        settings = _GenerationSettings(model, kw)
        if task == _SEQ2SEQ:
            if self.uses_cache:
                return self._generate_decoder_prefix(model, kw, settings)
            return self._generate_encoder_prompt(model, kw, settings)
        return self._generate_with_placeholders(model, kw, settings)

    def _generate_decoder_prefix(self, model: nn.Module, kw: dict[str, Any], s: _GenerationSettings) -> Any:
        """Encoder–decoder prefixes: the decoder starts from the pre-filled cache (its
        positions count from ``n``, as in ``forward``)."""
        batch = _batch_size(kw, ("input_ids", "inputs_embeds", "encoder_outputs"))
        _update(kw, "decoder_attention_mask", prepend_ones, self.n)
        _set_cache(model, kw, self._cache(model, batch * s.expand))
        return model.generate(**kw)

    def _generate_encoder_prompt(self, model: nn.Module, kw: dict[str, Any], s: _GenerationSettings) -> Any:
        """Encoder–decoder with input vectors: the encoder reads ``[P; E(x)]``."""
        input_ids = kw.pop("input_ids", None)
        embeds = kw.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self._embed(model, input_ids)
        mask = kw.pop("attention_mask", None)
        if mask is None:
            mask = s.default_mask(input_ids, embeds)
        kw["inputs_embeds"] = torch.cat([self._prompts(embeds), embeds], dim=1)
        kw["attention_mask"] = prepend_ones(mask, self.n)
        return model.generate(**kw)

    def _generate_with_placeholders(self, model: nn.Module, kw: dict[str, Any], s: _GenerationSettings) -> Any:
        """Causal LMs: ``n`` placeholder ids stand for the virtual tokens in the sequence
        transformers tracks; their embeddings (input vectors) or cache entries (prefix)
        are the virtual tokens. They are cut off the result."""
        n = self.n
        input_ids = kw.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate() with a soft-prompt adapter needs input_ids")
        batch = input_ids.shape[0]
        mask = kw.pop("attention_mask", None)
        if mask is None:
            mask = s.default_mask(input_ids, None)
        kw["input_ids"] = torch.cat([input_ids.new_full((batch, n), s.placeholder_id()), input_ids], dim=1)
        kw["attention_mask"] = prepend_ones(mask, n)
        _update(kw, "position_ids", prepend_positions, n)
        if self.uses_cache:
            _set_cache(model, kw, self._cache(model, batch * s.expand))
        else:
            embeds = kw.pop("inputs_embeds", None)
            if embeds is None:
                embeds = self._embed(model, input_ids)
            kw["inputs_embeds"] = torch.cat([self._prompts(embeds), embeds], dim=1)
        s.lengthen(kw, n)
        return _drop_leading(model.generate(**kw), n)


def _cache_name(model: nn.Module) -> str:
    """The keyword that carries the attention cache: ``cache`` in newer transformers
    releases, ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _given_cache(kw: dict[str, Any]) -> Any:
    cache = kw.get("cache")
    return cache if cache is not None else kw.get("past_key_values")


def _set_cache(model: nn.Module, kw: dict[str, Any], cache: Any) -> None:
    kw.pop("past_key_values", None)
    kw.pop("cache", None)
    kw[_cache_name(model)] = cache


def _drop_leading(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    if getattr(out, "sequences", None) is not None:
        out.sequences = out.sequences[:, n:]
    return out


class _GenerationSettings:
    """The generation settings that matter here: the call's keywords over the model's
    ``generation_config``."""

    def __init__(self, model: nn.Module, kw: dict[str, Any]) -> None:
        self.model = model
        self.kw = kw
        self.config = kw.get("generation_config") or getattr(model, "generation_config", None)
        beams = self.get("num_beams") or 1
        sequences = self.get("num_return_sequences") or 1
        self.expand = max(int(beams), int(sequences))

    def get(self, name: str) -> Any:
        if self.kw.get(name) is not None:
            return self.kw[name]
        return getattr(self.config, name, None)

    def _first(self, name: str) -> int | None:
        value = self.get(name)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is None:
            value = getattr(getattr(self.model, "config", None), name, None)
        return int(value) if value is not None else None

    def placeholder_id(self) -> int:
        pad = self._first("pad_token_id")
        if pad is None:
            pad = self._first("eos_token_id")
        return pad if pad is not None else 0

    def default_mask(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        """As transformers infers it: padding masked when the pad token differs from EOS."""
        if input_ids is None:
            if embeds is None:
                raise ValueError("pass input_ids or inputs_embeds")
            return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad, eos = self._first("pad_token_id"), self.get("eos_token_id")
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        if pad is not None and pad not in eos_ids and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)

    def lengthen(self, kw: dict[str, Any], n: int) -> None:
        """Length limits count the placeholders: lengthen them by ``n`` so the caller's
        ``max_length``/``min_length`` mean what they mean without a prompt."""
        if self.get("max_new_tokens") is None and self.get("max_length") is not None:
            kw["max_length"] = int(self.get("max_length")) + n
        if self.get("min_new_tokens") is None and self.get("min_length"):
            kw["min_length"] = int(self.get("min_length")) + n
