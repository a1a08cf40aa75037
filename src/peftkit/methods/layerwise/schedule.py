"""Layer-wise learning rates and gradual unfreezing, for any training loop.

- :func:`layerwise_param_groups`: optimiser parameter groups in which a block ``d`` blocks
  below the top gets the learning rate ``lr · decay^d`` (layer-wise learning-rate decay).
- :class:`GradualUnfreezer`: trains the top block first and unfreezes one more block per
  epoch (or as a schedule says), as in ULMFiT.

Both work on any model with a list of repeated blocks (see :func:`find_blocks`), wrapped
in a :class:`~peftkit.PeftModel` or not, and act only on the parameters that are
trainable: with a LoRA adapter they schedule the LoRA factors of each block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

from torch import nn

from peftkit.methods.layerwise.blocks import BlockList, find_blocks

__all__ = ["GradualUnfreezer", "layerwise_param_groups"]

Schedule = Union[Sequence[int], Callable[[int], int], None]


def _block_of(name: str, blocks: BlockList) -> int | None:
    for i, block in enumerate(blocks.blocks):
        if name.startswith(block + "."):
            return i
    return None


def layerwise_param_groups(
    model: nn.Module,
    lr: float,
    decay: float = 0.8,
    layers_pattern: str | None = None,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with learning rates that shrink towards the input.

    Block ``i`` of ``L`` gets ``lr · decay^(L-1-i)``; parameters after the blocks (final
    norm, head) get ``lr``; parameters before them (embeddings) get ``lr · decay^L``.

    Args:
        model: the model (a :class:`~peftkit.PeftModel` or any module).
        lr: the learning rate of the top block and the head.
        decay: the factor per block, in (0, 1].
        layers_pattern: the block list (see :func:`find_blocks`); found automatically when None.
        trainable_only: leave out parameters with ``requires_grad=False``.

    Returns:
        ``[{"params": [...], "lr": ..., "name": ...}]``, top first, empty groups left out;
        pass it to any ``torch.optim`` optimiser.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    blocks = find_blocks(model, layers_pattern)
    n = len(blocks)
    groups: dict[int, list[nn.Parameter]] = {}
    seen_block = False
    for name, p in model.named_parameters():
        index = _block_of(name, blocks)
        if index is not None:
            seen_block = True
            distance = n - 1 - index
        else:
            distance = 0 if seen_block else n
        if trainable_only and not p.requires_grad:
            continue
        groups.setdefault(distance, []).append(p)
    out = []
    for distance in sorted(groups):
        if distance == n:
            label = "below the blocks"
        elif distance == 0 and n > 0:
            label = f"block {n - 1} and above"
        else:
            label = f"block {n - 1 - distance}"
        out.append({"params": groups[distance], "lr": lr * decay**distance, "name": label})
    if not out:
        raise ValueError("the model has no trainable parameter; wrap it with an adapter or unfreeze some first")
    return out


class GradualUnfreezer:
    """Unfreezes the blocks of a model from the top, one more per epoch (or per ``schedule``).

    At construction the blocks are set as for epoch 0 (by default only the top block
    trains); parameters outside the blocks (a classification head) keep training
    throughout. Call :meth:`step` at the start of each epoch. Build the optimiser over :meth:`parameters` (all parameters
    the unfreezer manages, frozen or not, plus the rest) — frozen parameters get no
    gradient and optimisers skip them. ``PeftModel.set_adapter()`` and ``add_adapter()``
    reset which parameters train; call :meth:`step` again after them.

    Args:
        model: the model (a :class:`~peftkit.PeftModel` or any module). Its parameters
            with ``requires_grad=True`` now are the ones it schedules.
        schedule: how many top blocks are trainable at epoch ``e``: None for ``e + 1``, a
            sequence (``schedule[e]``, the last entry for later epochs), or a callable.
        layers_pattern: the block list (see :func:`find_blocks`); found automatically when None.

    Example::

        unfreezer = GradualUnfreezer(model)
        optimizer = torch.optim.AdamW(unfreezer.parameters(), lr=1e-4)
        for epoch in range(num_epochs):
            unfreezer.step(epoch)
            train_one_epoch(model, optimizer)
    """

    def __init__(self, model: nn.Module, schedule: Schedule = None, layers_pattern: str | None = None) -> None:
        self.blocks = find_blocks(model, layers_pattern)
        self.schedule = schedule
        self._per_block: list[list[nn.Parameter]] = [[] for _ in self.blocks.blocks]
        self._others: list[nn.Parameter] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            index = _block_of(name, self.blocks)
            (self._others if index is None else self._per_block[index]).append(p)
        if not any(self._per_block):
            raise ValueError(
                f"no trainable parameter inside the blocks of {self.blocks.name!r}: nothing to unfreeze. "
                "Make them trainable first (e.g. LayerwiseConfig(top_layers=<all blocks>))"
            )
        self.unfrozen = 0
        self.step(0)

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the unfreezer manages and the other trainable ones."""
        return [p for block in self._per_block for p in block] + self._others

    def blocks_at(self, epoch: int) -> int:
        """How many top blocks are trainable at ``epoch``."""
        if self.schedule is None:
            n = epoch + 1
        elif callable(self.schedule):
            n = int(self.schedule(epoch))
        else:
            if not self.schedule:
                raise ValueError("schedule is an empty sequence; give the number of blocks per epoch")
            n = int(self.schedule[min(epoch, len(self.schedule) - 1)])
        return max(0, min(n, len(self.blocks)))

    def _apply(self, n: int) -> None:
        top = len(self._per_block) - n
        for i, params in enumerate(self._per_block):
            for p in params:
                p.requires_grad_(i >= top)
        self.unfrozen = n

    def step(self, epoch: int) -> int:
        """Sets which blocks train during ``epoch`` (0-based). Returns their number."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        n = self.blocks_at(epoch)
        self._apply(n)
        return n
