"""Mixed-adapter batches at inference: example ``i`` through its own adapter,
``h_i = W₀x_i + s_i·B_i·A_i·x_i``, as pure functions on tensors.

The base output of the whole batch is computed once; what differs per example is the
adapter's term, added in the cheapest way that applies (the layer chooses):

- **stacked**: every example has a plain adapter of one rank. The examples' factors are
  stacked once per block (``stack_factors``) and two batched products add every term
  (``add_stacked_``), instead of a handful of small operations per group, which dominate a
  decoding step.
- **rows in place**: a group of consecutive examples whose base output the layer owns: the
  term is accumulated into a view of those rows (``fused.add_lora_`` for linear layers).
- **index_add**: any other group: its rows are gathered, and the term scattered back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from peftkit.core.layer import contiguous_rows

__all__ = ["add_groups", "add_stacked_", "stack_factors"]

Addend = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
AddRows = Callable[[str, torch.Tensor, torch.Tensor], None]


def stack_factors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                  scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example ``(A, B, s)``: ``(n, r, in)``, ``(n, out, r)``, ``(n, 1, 1)``."""
    a_all, b_all = torch.stack(list(a)), torch.stack(list(b))
    s = torch.tensor(list(scalings), dtype=a_all.dtype, device=a_all.device).view(-1, 1, 1)
    return a_all, b_all, s


def add_stacked_(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> None:
    """``result[i] += s_i · x[i]·A_iᵀ·B_iᵀ`` for every example ``i``, in place, by two batched
    products (``result`` contiguous, ``(n, ..., out)``; ``x`` ``(n, ..., in)``)."""
    n = a.shape[0]
    u = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2)).mul_(s)
    result.view(n, -1, result.shape[-1]).baddbmm_(u, b.transpose(1, 2))


def add_groups(result: torch.Tensor, x: torch.Tensor, groups: Sequence[tuple[str, torch.Tensor, bool]],
               addend: Addend, add_rows_: AddRows) -> torch.Tensor:
    """``result`` with each group's rows plus its adapter's term, as in a batch of that
    adapter alone.

    Args:
        result: the base output of the batch.
        x: the batch's input.
        groups: ``(adapter, ascending example indices, whether its rows may be updated in place)``.
        addend: ``(adapter, x rows, result rows) -> term`` to add.
        add_rows_: ``(adapter, x rows, result rows view) -> None`` adds the term in place.
    """
    for name, idx, in_place in groups:
        rows = contiguous_rows(idx) if in_place else None
        if rows is not None:
            add_rows_(name, x[rows], result[rows])
            continue
        idx = idx.to(x.device)
        result = result.index_add(0, idx, addend(name, x[idx], result[idx]))
    return result
