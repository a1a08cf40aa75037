"""(IA)³ configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Union

from peftkit.core.config import TargetedConfig

__all__ = ["IA3Config"]


@dataclass
class IA3Config(TargetedConfig):
    """(IA)³: learned vectors that rescale activations, ``h = l ⊙ (W x)`` or ``h = W (l ⊙ x)``.

    Every target gets one vector ``l`` per adapter, initialised to ones (the output is
    unchanged at first). On attention targets (keys, values) it scales the layer's output
    (``l`` has one entry per output, stored with shape (out, 1)); on feed-forward targets it
    scales the layer's input (one entry per input, stored (1, in)). Both fold into the
    weight: ``W' = diag(l)·W`` (and ``b' = l ⊙ b``), or ``W' = W·diag(l)``.

    Args:
        target_modules: the layers to adapt (names, a regex, or ``"all-linear"``). When
            None the keys, values and feed-forward output layer of known architectures
            (BERT, RoBERTa, ViT, GPT-2, Llama, Mistral, T5, OPT, ...) are chosen, and the
            saved config names them.
        feedforward_modules: which targets are feed-forward layers (input scaled): names or
            a regex, a subset of ``target_modules``. When None, the feed-forward output layer
            of a known architecture, else none.
        init_ia3_weights: start from ones (True) or from random values (False: the output
            changes at once; for tests).
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2 ``Conv1D``); detected from
            the module type and set automatically, kept for file compatibility.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: Union[list[str], str, None] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = self.feedforward_modules
        if isinstance(ff, (set, tuple)):
            self.feedforward_modules = ff = sorted(ff)
        if ff is not None and not isinstance(ff, (str, list)):
            raise TypeError(f"feedforward_modules must be a list of names or a regex string, got {type(ff).__name__}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"fan_in_fan_out must be True or False, got {self.fan_in_fan_out!r}")
        if isinstance(ff, list) and isinstance(self.target_modules, list):
            outside = sorted(set(ff) - set(self.target_modules))
            if outside:
                raise ValueError(
                    f"feedforward_modules {outside} are not in target_modules {self.target_modules}: a feed-forward "
                    "module must also be a target; add it to target_modules or drop it from feedforward_modules"
                )

    def to_dict(self) -> dict[str, Any]:
        """As the base class, without the unset block selection, which Hugging Face PEFT's
        config of this method does not have (it would warn about unknown keys)."""
        out = super().to_dict()
        for key in ("layers_to_transform", "layers_pattern"):
            if out.get(key) is None:
                out.pop(key, None)
        return out
