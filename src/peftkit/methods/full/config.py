"""Full fine-tuning configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.core.config import TargetedConfig

__all__ = ["FullFineTuningConfig"]


@dataclass
class FullFineTuningConfig(TargetedConfig):
    """Full fine-tuning through the adapter API: the baseline every comparison needs.

    Every parameter of the model is trained where it is: no wrapper, no copy, so memory
    and speed are those of plain fine-tuning. The "adapter" is the whole trained state,
    saved as ``adapter_model.safetensors`` with keys ``base_model.model.<parameter>``.

    Because the weights change in place the adapter is always merged (``merge_adapter()``
    does nothing, ``merge_and_unload()`` returns the trained model). Disabling, unmerging,
    deleting or unloading it need the original weights: with ``keep_original=True`` a copy
    of them is kept in CPU memory (as much host memory as the model's weights) and those
    operations swap it in; without it they raise an error.

    Args:
        target_modules: modules to train, with everything inside them (names or a regex).
            None: the whole model.
        exclude_modules: modules left frozen, with everything inside them (e.g.
            ``["embeddings"]``).
        keep_original: keep a CPU copy of the original weights so that the adapter can be
            disabled, unmerged, deleted and unloaded.
        modules_to_save: modules trained as a separate copy and saved under their own names
            (``task_type="SEQ_CLS"`` adds the classifier by itself).
    """

    peft_type: ClassVar[str] = "FULL"

    keep_original: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.keep_original, bool):
            raise ValueError(f"keep_original must be True or False, got {self.keep_original!r}")
        if self.layers_to_transform is not None:
            raise ValueError(
                "FullFineTuningConfig does not take layers_to_transform; to train some blocks only use "
                "LayerwiseConfig(layers=[...]) or LayerwiseConfig(top_layers=k)"
            )
