"""Configurations of the soft-prompt methods: prompt tuning, prefix tuning, P-tuning.

Field names and meanings follow Hugging Face PEFT (``PromptTuningConfig``,
``PrefixTuningConfig``, ``PromptEncoderConfig``) so that ``adapter_config.json`` files move
between the two libraries. Fields describing the model (``token_dim``, ``num_layers``,
``num_attention_heads``, ``num_transformer_submodules``) may be left None: they are read
from the model when the adapter is created and written to the file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Union

from peftkit.core.config import PeftConfig, TaskType

__all__ = [
    "PROMPT_TASK_TYPES",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
]

# Task types whose inputs these methods know how to extend.
PROMPT_TASK_TYPES = (TaskType.SEQ_CLS.value, TaskType.CAUSAL_LM.value, TaskType.SEQ_2_SEQ_LM.value)


class PromptTuningInit(str, enum.Enum):
    """How prompt-tuning vectors start."""

    RANDOM = "RANDOM"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    TEXT = "TEXT"


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The small network that produces P-tuning's virtual tokens."""

    MLP = "MLP"
    LSTM = "LSTM"


def _positive_or_none(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None (read from the model), got {value!r}")


def _enum_value(name: str, value: Any, allowed: type[enum.Enum]) -> str:
    text = str(getattr(value, "value", value)).upper()
    names = [m.value for m in allowed]  # type: ignore[attr-defined]
    if text not in names:
        raise ValueError(f"{name} must be one of {names}, got {value!r}")
    return text


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the soft-prompt methods.

    Args:
        num_virtual_tokens: how many learned positions are added (required to build an adapter;
            a config may be made without it and completed later, as in PEFT).
        token_dim: width of each learned vector: the embedding size for prompt and
            P-tuning, the key/value width (heads × head size) for prefix tuning. Read from
            the model when None.
        num_transformer_submodules: 1, or 2 for encoder–decoder models (``SEQ_2_SEQ_LM``);
            the saved table then holds twice ``num_virtual_tokens`` rows. Set from the task
            when None.
        num_attention_heads: attention heads (key/value heads for prefix tuning). Read from
            the model when None.
        num_layers: transformer layers. Read from the model when None.
        modules_to_save: modules trained in full (the classification head of ``SEQ_CLS``
            models is added automatically).
    """

    num_virtual_tokens: Union[int, None] = None
    token_dim: Union[int, None] = None
    num_transformer_submodules: Union[int, None] = None
    num_attention_heads: Union[int, None] = None
    num_layers: Union[int, None] = None
    modules_to_save: Union[list[str], None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # As in PEFT, a config may be built without it (and completed later); an adapter cannot.
        n = self.num_virtual_tokens
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _positive_or_none(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules must be 1, 2 (encoder–decoder) or None, got {self.num_transformer_submodules!r}"
            )
        if self.task_type is not None and self.task_type not in PROMPT_TASK_TYPES:
            raise ValueError(
                f"{type(self).__name__} supports task_type {list(PROMPT_TASK_TYPES)}, got {self.task_type!r}"
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the saved table: ``num_virtual_tokens × num_transformer_submodules``."""
        return int(self.num_virtual_tokens) * int(self.num_transformer_submodules or 1)  # type: ignore[arg-type]


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings placed before the input
    embeddings, ``x' = [P; E(x)]`` with ``P`` (n × d) trained and every weight frozen.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (normal with the spread of the word embeddings),
            ``"SAMPLE_VOCAB"`` (embeddings of tokens drawn from the vocabulary) or
            ``"TEXT"`` (embeddings of the tokens of ``prompt_tuning_init_text``, repeated to
            fill the prompt).
        prompt_tuning_init_text: the text for ``"TEXT"``, e.g. ``"Classify the sentiment:"``.
        tokenizer_name_or_path: the tokenizer (a local folder or hub name) for ``"TEXT"``.
        tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained``.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: Union[str, None] = None
    tokenizer_name_or_path: Union[str, None] = None
    tokenizer_kwargs: Union[dict[str, Any], None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = _enum_value("prompt_tuning_init", self.prompt_tuning_init, PromptTuningInit)
        text = self.prompt_tuning_init == PromptTuningInit.TEXT.value
        if text and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from")
        if text and not self.tokenizer_name_or_path:
            raise ValueError(
                "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the model's tokenizer) to turn the text into tokens"
            )
        if self.tokenizer_kwargs and not text:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned keys and values placed before those of every attention layer,
    ``attn(q, [P_k; K], [P_v; V])``, handed to the model as a pre-filled attention cache.

    Args:
        prefix_projection: train the prefixes through a two-layer MLP
            ``P = W₂·tanh(W₁·E + b₁) + b₂`` (more stable training); the MLP is evaluated and
            folded away when saving, so files hold the final prefixes only.
        encoder_hidden_size: hidden width of that MLP (``token_dim`` when None).
        init_weights: None (random) or ``"zero"`` (all prefixes start at zero).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: Union[int, None] = None
    prefix_projection: bool = False
    init_weights: Union[str, None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_or_none("encoder_hidden_size", self.encoder_hidden_size)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual tokens produced by a small trained network from learned inputs,
    ``P = f(E)`` with ``f`` an MLP or a bidirectional LSTM followed by an MLP; the result
    is placed before the input embeddings. Files hold ``P`` itself.

    Args:
        encoder_reparameterization_type: ``"MLP"`` or ``"LSTM"``.
        encoder_hidden_size: hidden width of the network (``token_dim`` when None).
        encoder_num_layers: hidden layers of the MLP, or LSTM layers.
        encoder_dropout: dropout inside the network while training.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: Union[int, None] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_value(
            "encoder_reparameterization_type", self.encoder_reparameterization_type, PromptEncoderReparameterizationType
        )
        _positive_or_none("encoder_hidden_size", self.encoder_hidden_size)
        _positive_or_none("encoder_num_layers", self.encoder_num_layers)
        if self.encoder_num_layers is None:
            raise ValueError("encoder_num_layers must be a positive integer, e.g. 2")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
