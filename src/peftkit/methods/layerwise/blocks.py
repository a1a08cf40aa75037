"""Finding a model's list of repeated blocks and choosing some of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from peftkit.core.targeting import TargetError, name_matches

__all__ = ["BlockList", "find_blocks", "select_blocks"]


@dataclass(frozen=True)
class BlockList:
    """The repeated blocks of a model.

    Args:
        name: the full name of the ``nn.ModuleList`` holding them.
        blocks: the full names of the blocks, bottom (input side) first.
    """

    name: str
    blocks: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.blocks)


def _candidates(model: nn.Module) -> list[BlockList]:
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not all(any(True for _ in m.parameters()) for m in module):
            continue
        prefix = f"{name}." if name else ""
        out.append(BlockList(name, tuple(f"{prefix}{i}" for i in range(len(module)))))
    return out


def find_blocks(model: nn.Module, layers_pattern: str | None = None) -> BlockList:
    """The model's block list: the longest ``nn.ModuleList`` of modules of one class (on a
    tie the last one in module order, nearest the output), or the one ``layers_pattern``
    names (its full name or a dotted suffix of it).

    Raises:
        TargetError: when no such list exists, or none fits ``layers_pattern``.
    """
    candidates = _candidates(model)
    if layers_pattern is not None:
        named = [c for c in candidates if name_matches(c.name, layers_pattern)]
        if not named:
            shown = [c.name for c in candidates] or "none"
            raise TargetError(
                f"layers_pattern {layers_pattern!r} names no list of repeated blocks in {type(model).__name__}; "
                f"block lists found: {shown}"
            )
        candidates = named
    if not candidates:
        raise TargetError(
            f"{type(model).__name__} has no list of repeated blocks (an nn.ModuleList of modules of one class); "
            "name the modules to train in target_modules instead"
        )
    longest = max(len(c) for c in candidates)
    return [c for c in candidates if len(c) == longest][-1]


def select_blocks(blocks: BlockList, top_layers: int | None = None, layers: Sequence[int] | None = None) -> list[str]:
    """The names of the chosen blocks, bottom first.

    Args:
        blocks: the block list.
        top_layers: the last ``top_layers`` blocks.
        layers: block indices (negative ones count from the top).

    Raises:
        TargetError: when the model has fewer blocks than asked for.
    """
    n = len(blocks)
    if top_layers is not None:
        if top_layers > n:
            raise TargetError(f"top_layers={top_layers} but {blocks.name!r} holds {n} blocks; use at most {n}")
        return list(blocks.blocks[n - top_layers :])
    chosen = set()
    for i in layers or ():
        if not -n <= i < n:
            raise TargetError(f"layers has index {i} but {blocks.name!r} holds {n} blocks (indices 0..{n - 1}, or -{n}..-1)")
        chosen.add(i % n)
    return [blocks.blocks[i] for i in sorted(chosen)]
