"""BitFit configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.core.config import TargetedConfig

__all__ = ["BitFitConfig"]


@dataclass
class BitFitConfig(TargetedConfig):
    """BitFit: train the bias terms only, ``h = W x + b'`` with ``W`` frozen.

    Each adapter holds its own trained copy of every selected bias; the model's biases stay
    as they were, so adapters can be switched, disabled and unloaded. Merging writes the
    trained biases into the model; the file holds only the trained biases, under their own
    names (``base_model.model.<module>.bias``).

    Args:
        target_modules: modules whose bias is trained (names, a regex, or ``"all-linear"``).
            None: every module that has a bias (linear layers, convolutions, LayerNorms).
            The BitFit paper's cheapest variant trains only the query and the first
            feed-forward biases: ``target_modules=["query", "intermediate.dense"]`` on BERT.
        exclude_modules: modules whose bias stays frozen.
        layers_to_transform / layers_pattern: restrict to these blocks.
        modules_to_save: modules trained in full and saved with the adapter (a new
            classification head; ``task_type="SEQ_CLS"`` adds it by itself).
    """

    peft_type: ClassVar[str] = "BITFIT"
