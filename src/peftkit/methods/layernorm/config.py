"""LayerNorm tuning configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.core.config import TargetedConfig

__all__ = ["LNTuningConfig"]


@dataclass
class LNTuningConfig(TargetedConfig):
    """LayerNorm tuning: train the normalisation layers' scale γ and shift β only,
    ``y = γ' ⊙ norm(x) + β'``.

    Each adapter holds a trained copy of each selected norm's parameters (tiny vectors);
    the model's own stay as they were, so adapters can be switched, disabled and unloaded.
    Merging writes the trained values into the model. The file layout is Hugging Face
    PEFT's ``LN_TUNING`` (``<path>.ln_tuning_layers.weight`` / ``.bias``), so the files
    move both ways.

    Norms are ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and, by duck typing, any
    module whose class name contains ``Norm`` and whose only parameters are a 1-D
    ``weight`` (and ``bias``) of one size (transformers' ``LlamaRMSNorm``,
    ``T5LayerNorm``, ...). Batch norms qualify too; their running statistics are the
    model's and are updated in training mode as usual.

    Args:
        target_modules: the norms to train (names or a regex). None: every norm of the
            model; the saved config then lists them.
        exclude_modules: norms left frozen.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    peft_type: ClassVar[str] = "LN_TUNING"

    def to_dict(self) -> dict[str, Any]:
        """As the base class, without the unset block selection, which Hugging Face PEFT's
        config of this method does not have (it would warn about unknown keys)."""
        out = super().to_dict()
        for key in ("layers_to_transform", "layers_pattern"):
            if out.get(key) is None:
                out.pop(key, None)
        return out
