"""What peftkit needs to know about Hugging Face transformers models.

Nothing here imports transformers (but ``auto_model_class``, when called): models are
recognised by duck typing, so users of plain ``nn.Module``s need nothing else installed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "auto_model_class",
    "enable_input_require_grads",
    "is_linear_like",
    "is_transformers_conv1d",
    "output_head_names",
    "task_head_names",
]

# Heads that a task type adds on top of a pretrained body; trained in full and saved.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def is_transformers_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_transformers_conv1d(module)


def output_head_names(model: nn.Module) -> list[str]:
    """Names of the output head(s): the LM head of a transformers model, the task heads of
    classification models, or for a plain module its last linear layer."""
    names: list[str] = []
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    linear_names = []
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.append(name)
        if is_linear_like(module):
            linear_names.append(name)
        if name.rsplit(".", 1)[-1] in ("classifier", "score", "qa_outputs", "lm_head") and is_linear_like(module):
            names.append(name)
    if not names and not hasattr(model, "config") and linear_names:
        names.append(linear_names[-1])
    return names


# The transformers Auto class that builds the model of an adapter's task_type.
_AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def auto_model_class(task_type: Any) -> Any:
    """The transformers Auto class for an adapter's ``task_type`` (``AutoModel`` for none)."""
    import transformers

    key = str(getattr(task_type, "value", task_type)) if task_type else ""
    return getattr(transformers, _AUTO_CLASSES.get(key, "AutoModel"))


def task_head_names(task_type: str | None) -> tuple[str, ...]:
    return _TASK_HEADS.get(str(task_type), ()) if task_type else ()


def enable_input_require_grads(model: nn.Module) -> None:
    """Makes the input embeddings' output require grad so that (reentrant) gradient
    checkpointing propagates gradients through a frozen base into the adapters."""
    fn = getattr(model, "enable_input_require_grads", None)
    if callable(fn):
        try:
            fn()
            return
        except (NotImplementedError, AttributeError):
            pass
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None:
        return

    def _require_grad(_module: nn.Module, _inputs: object, output: object) -> None:
        if hasattr(output, "requires_grad_"):
            output.requires_grad_(True)  # type: ignore[union-attr]

    emb.register_forward_hook(_require_grad)
