"""Task classes of :class:`~peftkit.PeftModel` and the ``AutoPeftModel`` loaders.

``PeftModelForCausalLM`` and its siblings carry PEFT's names and constructor so that code
and ``isinstance`` checks written for PEFT keep working; ``get_peft_model`` and
``PeftModel.from_pretrained`` pick the one ``task_type`` names. They compute as
:class:`~peftkit.PeftModel` does: the wrapped model's own forward already is the task.

``AutoPeftModelFor...`` load the base model named in the adapter's
``base_model_name_or_path`` (a hub id, or a local folder, which works offline) with the
matching transformers ``AutoModelFor...`` class, then the adapter on top.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from peftkit.core.config import PeftConfig, TaskType
from peftkit.core.io import resolve_adapter_dir
from peftkit.peft_model import _TASK_CLASSES, DEFAULT, PeftModel

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]


class _TaskPeftModel(PeftModel):
    task_type: str = ""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = DEFAULT, **kwargs: Any) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)


class PeftModelForCausalLM(_TaskPeftModel):
    """A PeftModel of a causal language model (``task_type="CAUSAL_LM"``)."""

    task_type = TaskType.CAUSAL_LM.value


class PeftModelForSequenceClassification(_TaskPeftModel):
    """A PeftModel of a sequence classifier (``"SEQ_CLS"``); its head is trained and saved."""

    task_type = TaskType.SEQ_CLS.value


class PeftModelForSeq2SeqLM(_TaskPeftModel):
    """A PeftModel of an encoder-decoder language model (``"SEQ_2_SEQ_LM"``)."""

    task_type = TaskType.SEQ_2_SEQ_LM.value


class PeftModelForTokenClassification(_TaskPeftModel):
    """A PeftModel of a token classifier (``"TOKEN_CLS"``); its head is trained and saved."""

    task_type = TaskType.TOKEN_CLS.value


class PeftModelForQuestionAnswering(_TaskPeftModel):
    """A PeftModel of an extractive question-answering model (``"QUESTION_ANS"``)."""

    task_type = TaskType.QUESTION_ANS.value


class PeftModelForFeatureExtraction(_TaskPeftModel):
    """A PeftModel of an encoder used for its hidden states (``"FEATURE_EXTRACTION"``)."""

    task_type = TaskType.FEATURE_EXTRACTION.value


for _cls in (PeftModelForCausalLM, PeftModelForSequenceClassification, PeftModelForSeq2SeqLM,
             PeftModelForTokenClassification, PeftModelForQuestionAnswering, PeftModelForFeatureExtraction):
    _TASK_CLASSES[_cls.task_type] = _cls


class _BaseAutoPeftModel:
    _auto_class = ""  # the transformers Auto class that loads the base
    _peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_folder_or_id)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = DEFAULT,
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Loads the base model the adapter names, then the adapter.

        Args:
            pretrained_model_name_or_path: the adapter folder (or hub id).
            adapter_name, is_trainable, config: as for :meth:`PeftModel.from_pretrained`.
            revision: the adapter's hub revision.
            kwargs: passed to the transformers ``from_pretrained`` of the base
                (``torch_dtype``, ``device_map``, ``local_files_only``...).

        Raises:
            ValueError: the adapter records no base model, or its ``task_type`` calls for
                another class (the message names it).
        """
        subfolder = kwargs.pop("subfolder", None)
        directory = resolve_adapter_dir(pretrained_model_name_or_path, subfolder)
        peft_config = config if config is not None else PeftConfig.from_pretrained(directory)
        task_type = peft_config.task_type
        if task_type is not None:
            expected = _TASK_CLASSES[str(task_type)]
            if cls is AutoPeftModel:
                raise ValueError(
                    f"Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type: "
                    f"this adapter has task_type={task_type!r}, load it with AutoPeft{expected.__name__[len('Peft'):]}"
                )
            if expected is not cls._peft_class:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: {cls._peft_class.__name__}; "
                    f"the adapter has task_type={task_type!r}, load it with AutoPeft{expected.__name__[len('Peft'):]}"
                )
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"{os.fspath(pretrained_model_name_or_path)!r} records no base_model_name_or_path; load the base model "
                "yourself and call PeftModel.from_pretrained(base_model, adapter_folder)"
            )
        import transformers

        auto = getattr(transformers, cls._auto_class or "AutoModel")
        if peft_config.revision is not None:
            kwargs.setdefault("revision", peft_config.revision)
        base = auto.from_pretrained(base_path, **kwargs)
        _resize_to_saved_tokenizer(base, directory)
        peft_class = cls._peft_class if task_type is not None else PeftModel
        return peft_class.from_pretrained(base, directory, adapter_name=adapter_name, is_trainable=is_trainable,
                                          config=peft_config)


def _resize_to_saved_tokenizer(base: nn.Module, directory: str) -> None:
    """A tokenizer saved with the adapter (new tokens added) sets the embedding size, as in PEFT."""
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")) or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if len(tokenizer) != base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """Loads an adapter without a task type onto the base named in its config (``AutoModel``)."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _auto_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _auto_class = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _auto_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _auto_class = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _auto_class = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _auto_class = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction
