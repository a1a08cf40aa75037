"""What peftkit needs to know about Hugging Face transformers models.

Nothing here imports transformers (but ``auto_model_class``, when called): models are
recognised by duck typing, so users of plain ``nn.Module``s need nothing else installed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "all_linear_exclusions",
    "auto_model_class",
    "enable_input_require_grads",
    "install_trainer_hook",
    "is_linear_like",
    "is_transformers_conv1d",
    "output_head_names",
    "task_head_names",
    "teach_trainer",
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


def all_linear_exclusions(model: nn.Module) -> list[str]:
    """What ``"all-linear"`` leaves out, as Hugging Face PEFT does: the output embeddings (LM
    head) of a transformers model; nothing of a plain module. (A task's head is left out as
    a ``modules_to_save`` module when ``task_type`` names the task.)"""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out) or not hasattr(model, "config"):
        return []
    try:
        head = get_out()
    except (NotImplementedError, AttributeError):
        return []
    return [name for name, module in model.named_modules() if head is not None and module is head][:1]


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


# --- transformers' Trainer ------------------------------------------------------------
# The Trainer decides that a model holds adapters with `trainer_utils._is_peft_model`
# (an isinstance check against peft's classes, False when peft is not installed) and, in
# `Trainer._save`, with `isinstance(model, (PreTrainedModel, peft.PeftModel))`. A model it
# does not recognise is saved whole (`model.safetensors`) and reloaded with
# `load_state_dict`. `teach_trainer` makes both checks accept peftkit's PeftModel; nothing
# else in transformers changes, and peft's own models are recognised as before. peftkit
# applies it by itself when transformers' trainer is (or gets) imported.

_TRAINER_MODULES = ("transformers.trainer_utils", "transformers.trainer", "transformers.integrations.neftune")


def _peftkit_model_class() -> type:
    from peftkit.peft_model import PeftModel

    return PeftModel


def teach_trainer() -> bool:
    """Makes transformers' ``Trainer`` treat a peftkit :class:`~peftkit.PeftModel` as a PEFT
    model: ``save_model()`` and checkpoints write the adapter (``adapter_config.json``,
    ``adapter_model.safetensors``), ``resume_from_checkpoint`` and ``load_best_model_at_end``
    load it with ``load_adapter``. Idempotent; needs no import of peft.

    Returns:
        True when the trainer modules were loaded and are now taught; False when
        transformers' trainer is not imported yet (peftkit then teaches it on import).
    """
    import sys

    if "transformers.trainer_utils" not in sys.modules:
        return False
    peftkit_model = _peftkit_model_class()
    utils = sys.modules["transformers.trainer_utils"]
    if getattr(utils, "_is_peft_model", None) is None and hasattr(utils, "TrainOutput"):
        _warn_not_taught()
        return False
    for module_name in _TRAINER_MODULES:
        module = sys.modules.get(module_name)
        original = getattr(module, "_is_peft_model", None) if module is not None else None
        if original is None or getattr(original, "_peftkit_taught", False):
            continue

        def _is_peft_model(model: object, _original: object = original) -> bool:
            return isinstance(model, peftkit_model) or bool(_original(model))  # type: ignore[operator]

        _is_peft_model._peftkit_taught = True  # type: ignore[attr-defined]
        module._is_peft_model = _is_peft_model  # type: ignore[attr-defined]
    trainer = sys.modules.get("transformers.trainer")
    if trainer is not None and not hasattr(trainer, "Trainer"):
        trainer = None  # still being imported (its imports load trainer_utils); taught once it is done
    if trainer is not None and not getattr(trainer, "_peftkit_taught", False):
        # `_save` keeps `(PreTrainedModel, PeftModel)` when peft is available; peftkit's class
        # joins that tuple (isinstance accepts nested tuples).
        peft_class = getattr(trainer, "PeftModel", None) if trainer.is_peft_available() else None
        trainer.PeftModel = (peftkit_model,) if peft_class is None else (peft_class, peftkit_model)
        trainer.is_peft_available = lambda: True
        trainer._peftkit_taught = True
    return trainer is not None


_WARNED: list[bool] = []


def _warn_not_taught() -> None:
    if _WARNED:
        return
    _WARNED.append(True)
    import warnings

    warnings.warn(
        "this transformers version has no trainer_utils._is_peft_model, so peftkit cannot teach its Trainer that a "
        "peftkit PeftModel holds adapters: Trainer.save_model() and checkpoints would hold the whole model. Save the "
        "adapter with model.save_pretrained(folder) (e.g. from a TrainerCallback's on_save)",
        UserWarning,
        stacklevel=3,
    )


class _TeachOnImport:
    """An import hook that runs :func:`teach_trainer` right after transformers' trainer
    modules are first imported (they are heavy, so peftkit never imports them itself)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in _TRAINER_MODULES:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # type: ignore[arg-type]
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_teach(module: object) -> None:
            exec_module(module)  # type: ignore[arg-type]
            teach_trainer()

        loader.exec_module = exec_and_teach  # type: ignore[method-assign]
        return spec


def install_trainer_hook() -> None:
    """Teaches an imported Trainer now, and one imported later on import."""
    import sys

    teach_trainer()
    if not any(isinstance(finder, _TeachOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TeachOnImport())
