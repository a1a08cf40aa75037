"""Default targets for methods that adapt attention projections when the config names none.

The query and value projections, as the LoRA paper adapts them, under whichever naming
convention the model uses; a model that matches none gets every linear layer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["ATTENTION_PAIRS", "attention_targets"]

# query/value projections per naming convention (BERT, Llama/OPT/ViT, T5, fused projections)
ATTENTION_PAIRS = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"), ("to_q", "to_v"), ("qkv",), ("query_key_value",))


def attention_targets(model: nn.Module, is_supported: Callable[[nn.Module], bool]) -> list[str] | str:
    """The first pair of :data:`ATTENTION_PAIRS` whose names all belong to modules the method
    can adapt, else ``"all-linear"``."""
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_supported(module)}
    for pair in ATTENTION_PAIRS:
        if all(p in leaves for p in pair):
            return list(pair)
    return "all-linear"
