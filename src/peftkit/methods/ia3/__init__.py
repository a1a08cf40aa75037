"""(IA)³: learned vectors rescale keys, values and the feed-forward activations
(``h = l ⊙ W x`` or ``h = W (l ⊙ x)``), initialised to ones; mergeable into the weights."""

from __future__ import annotations

import copy
import re
from typing import Union

from torch import nn

from peftkit.core.registry import Method, register_method
from peftkit.core.targeting import TargetError, name_matches
from peftkit.methods.ia3.config import IA3Config
from peftkit.methods.ia3.layer import SUPPORTED, IA3Layer, create_ia3_layer, is_ia3_supported

__all__ = ["DEFAULT_TARGETS", "IA3Config", "IA3Layer"]

Spec = Union[list[str], str]

# Encoders built like BERT name both the attention output and the feed-forward output
# `output.dense`; the feed-forward one sits directly in the block (`layer.N.output.dense`).
_BERT_LIKE: tuple[Spec, Spec] = (r".*\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense")
_DECODER: tuple[Spec, Spec] = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_FUSED_QKV: tuple[Spec, Spec] = (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
_FC2: tuple[Spec, Spec] = (["k_proj", "v_proj", "fc2"], ["fc2"])
# wav2vec 2.0-style speech encoders (HuBERT, WavLM, data2vec-audio, UniSpeech)
_SPEECH: tuple[Spec, Spec] = (["k_proj", "v_proj", "feed_forward.output_dense"], ["feed_forward.output_dense"])

#: ``model_type -> [(target_modules, feedforward_modules), ...]``: the keys and values of
#: the attention and the feed-forward output layer (whose input, the feed-forward
#: activation, is scaled), as in the (IA)³ paper. GPT-2 and the fused-QKV models scale the
#: fused query-key-value projection. Where module names changed between transformers
#: versions the first pair that matches the model is used.
DEFAULT_TARGETS: dict[str, list[tuple[Spec, Spec]]] = {
    "bert": [_BERT_LIKE],
    "roberta": [_BERT_LIKE],
    "xlm-roberta": [_BERT_LIKE],
    "electra": [_BERT_LIKE],
    "vit": [_BERT_LIKE, (["k_proj", "v_proj", "mlp.fc2"], ["mlp.fc2"])],
    "distilbert": [(["k_lin", "v_lin", "lin2"], ["lin2"])],
    "gpt2": [(["c_attn", "mlp.c_proj"], ["mlp.c_proj"])],
    "llama": [_DECODER],
    "mistral": [_DECODER],
    "qwen2": [_DECODER],
    "qwen3": [_DECODER],
    "gemma": [_DECODER],
    "gemma2": [_DECODER],
    "t5": [(["k", "v", "wo"], ["wo"])],
    "mt5": [(["k", "v", "wo"], ["wo"])],
    "clip": [_FC2],
    "opt": [_FC2],
    "bart": [_FC2],
    "phi": [_FC2],
    "bloom": [_FUSED_QKV],
    "gpt_neox": [_FUSED_QKV],
    "falcon": [_FUSED_QKV],
    "wav2vec2": [_SPEECH],
    "hubert": [_SPEECH],
    "wavlm": [_SPEECH],
    "data2vec-audio": [_SPEECH],
    "unispeech": [_SPEECH],
    "unispeech-sat": [_SPEECH],
    "whisper": [_FC2],
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _matches_any(spec: Spec, names: list[str]) -> bool:
    if isinstance(spec, str):
        return any(re.fullmatch(spec, n) for n in names)
    return any(name_matches(n, entry) for n in names for entry in spec)


def architecture_defaults(model: nn.Module) -> tuple[Spec, Spec] | None:
    """``(target_modules, feedforward_modules)`` for the model's architecture, or None."""
    candidates = DEFAULT_TARGETS.get(_model_type(model) or "")
    if not candidates:
        return None
    names = [n for n, _ in model.named_modules()]
    return next((pair for pair in candidates if _matches_any(pair[0], names)), candidates[0])


def prepare_ia3_config(model: nn.Module, config: IA3Config) -> None:
    """Fills ``target_modules`` / ``feedforward_modules`` left None from
    :data:`DEFAULT_TARGETS` for the model's architecture.

    Raises:
        TargetError: when ``target_modules`` is None and the architecture is not known.
    """
    defaults = architecture_defaults(model)
    if config.target_modules is None:
        if defaults is None:
            known = ", ".join(sorted(DEFAULT_TARGETS))
            raise TargetError(
                f"IA3Config(target_modules=None): no default targets for model type {_model_type(model)!r} "
                f"({type(model).__name__}). Name the key, value and feed-forward layers, e.g. "
                f"IA3Config(target_modules=['k_proj', 'v_proj', 'down_proj'], feedforward_modules=['down_proj']). "
                f"Known model types: {known}"
            )
        config.target_modules = copy.copy(defaults[0])
    if config.feedforward_modules is None:
        config.feedforward_modules = copy.copy(defaults[1]) if defaults is not None else []


METHOD = register_method(
    Method(
        peft_type="IA3",
        config_cls=IA3Config,
        description="(IA)³: trains vectors that rescale keys, values and feed-forward activations (~0.01-0.1%), mergeable",
        supported=SUPPORTED,
        is_supported=is_ia3_supported,
        create_layer=create_ia3_layer,
        prepare_config=prepare_ia3_config,  # default targets, written into the saved config
        presets={"ia3": {"method": {"name": "ia3"}, "train": {"lr": 1e-2}}},
    )
)
