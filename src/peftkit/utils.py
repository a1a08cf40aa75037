"""Helpers that code written for Hugging Face PEFT imports from ``peft.utils``, under the
same names (see docs/porting.md for the full table)."""

from __future__ import annotations

import torch
from torch import nn

from peftkit.core.config import PeftType, TaskType
from peftkit.core.modules_to_save import ModulesToSaveWrapper
from peftkit.core.state import get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.quantization import prepare_model_for_kbit_training

__all__ = [
    "ModulesToSaveWrapper",
    "PeftType",
    "TaskType",
    "_get_submodules",
    "get_peft_model_state_dict",
    "infer_device",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]


def infer_device() -> str:
    """The accelerator torch sees (``"cuda"``, ``"xpu"``, ``"mps"``...), else ``"cpu"``."""
    if torch.cuda.is_available():
        return "cuda"
    for name in ("xpu", "mps", "npu", "mlu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and is_available():
            return name
    return "cpu"


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, target, target_name)`` for the module named ``key`` (as PEFT's helper).

    Raises:
        AttributeError: ``model`` has no module named ``key``.
    """
    parent_name, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, model.get_submodule(key), target_name
