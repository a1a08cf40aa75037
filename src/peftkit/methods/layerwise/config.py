"""Layer-wise (partial) fine-tuning configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from peftkit.core.config import PeftConfig, normalise_target_fields

__all__ = ["LayerwiseConfig"]


@dataclass
class LayerwiseConfig(PeftConfig):
    """Partial fine-tuning: train the top blocks of the network (and chosen modules) in full.

    The blocks are the model's list of repeated layers: found automatically (the longest
    ``nn.ModuleList`` whose entries are of one class; on ties the last one, nearest the
    output, e.g. the decoder of T5) or named by ``layers_pattern``. Their parameters are
    trained where they are (no copy), and the file holds only those, under their own names
    (``base_model.model.<parameter>``).

    As with full fine-tuning the adapter is always merged. Disabling, unmerging, deleting
    or unloading it need the original values of the trained parameters: with
    ``keep_original=True`` a CPU copy of them is kept (as much host memory as the trained
    blocks) and those operations swap it in; without it they raise an error.

    Args:
        top_layers: train the last ``top_layers`` blocks.
        layers: train these blocks, by index (negative indices count from the top: -1 is
            the last block). Use either this or ``top_layers``.
        layers_pattern: the block list, by name or dotted suffix (``"layers"``, ``"h"``,
            ``"encoder.layer"``, ``"decoder.block"``); found automatically when None.
        target_modules: further modules trained in full (names or a regex), e.g.
            ``["ln_f"]`` or ``["pooler", "classifier"]``.
        exclude_modules: modules inside the chosen ones left frozen (e.g. ``["LayerNorm"]``).
        keep_original: keep a CPU copy of the original values of the trained parameters.
        modules_to_save: modules trained as a separate copy and saved under their own names
            (``task_type="SEQ_CLS"`` adds the classifier by itself).
    """

    peft_type: ClassVar[str] = "LAYERWISE"

    top_layers: Union[int, None] = None
    layers: Union[list[int], int, None] = None
    layers_pattern: Union[str, None] = None
    target_modules: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    keep_original: bool = False
    modules_to_save: Union[list[str], None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_layers is not None and (
            not isinstance(self.top_layers, int) or isinstance(self.top_layers, bool) or self.top_layers <= 0
        ):
            raise ValueError(f"top_layers must be a positive integer, got {self.top_layers!r}")
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if self.layers is not None:
            if isinstance(self.layers, (tuple, set)):
                self.layers = sorted(self.layers)
            if not isinstance(self.layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise ValueError(f"layers must be a list of block indices, got {self.layers!r}")
            if not self.layers:
                raise ValueError("layers is empty; list the blocks to train, or use top_layers")
        if self.top_layers is not None and self.layers is not None:
            raise ValueError("give either top_layers or layers, not both")
        if self.top_layers is None and self.layers is None and self.target_modules is None:
            raise ValueError(
                "LayerwiseConfig trains nothing: set top_layers (the last k blocks), layers (block indices) "
                "or target_modules (modules trained in full)"
            )
        normalise_target_fields(self)
        if self.layers_pattern is not None and (not isinstance(self.layers_pattern, str) or not self.layers_pattern):
            raise ValueError(f"layers_pattern must name the block list, e.g. 'layers' or 'encoder.layer'; got {self.layers_pattern!r}")
        if not isinstance(self.keep_original, bool):
            raise ValueError(f"keep_original must be True or False, got {self.keep_original!r}")

    @property
    def uses_blocks(self) -> bool:
        return self.top_layers is not None or self.layers is not None
