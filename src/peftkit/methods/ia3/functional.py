"""(IA)³ math as pure functions on tensors.

A vector ``l`` rescales either a layer's outputs, ``h = l ⊙ (W x + b)``, or its inputs,
``h = W (l ⊙ x) + b`` (feed-forward layers). Both are a rescaled weight:
``W' = diag(l)·W, b' = l ⊙ b`` and ``W' = W·diag(l)``.
"""

from __future__ import annotations

import torch

__all__ = ["channel_view", "weight_factor"]


def channel_view(vector: torch.Tensor, dims_after: int) -> torch.Tensor:
    """``vector`` flattened to one entry per channel, followed by ``dims_after`` singleton
    dimensions so that it broadcasts over a channel axis followed by that many axes."""
    return vector.reshape(-1, *([1] * dims_after))


def weight_factor(
    vector: torch.Tensor,
    weight: torch.Tensor,
    feedforward: bool,
    fan_in_fan_out: bool = False,
    groups: int = 1,
) -> torch.Tensor:
    """The factor that, multiplied into ``weight``, folds the vector into the layer.

    Args:
        vector: the (IA)³ vector (any shape; one entry per output, or per input when
            ``feedforward``).
        weight: the base weight: (out, in) linear, (in, out) with ``fan_in_fan_out``
            (GPT-2 ``Conv1D``), or (out, in / groups, *kernel) convolution.
        feedforward: whether the vector scales inputs (else outputs).
        fan_in_fan_out: the linear weight is stored (in, out).
        groups: convolution groups.

    Returns:
        A tensor broadcastable to ``weight``: ``W' = W * factor``.
    """
    v = vector.reshape(-1)
    if weight.dim() == 2:
        scales_rows = feedforward == fan_in_fan_out  # outputs of (out, in), or inputs of (in, out)
        return v[:, None] if scales_rows else v[None, :]
    kernel_dims = weight.dim() - 2
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    if not feedforward:
        return channel_view(v, weight.dim() - 1)
    # inputs: the input channels of group g are v[g·in_per_group : (g+1)·in_per_group]
    factor = v.reshape(groups, 1, in_per_group).expand(groups, out_channels // groups, in_per_group)
    return factor.reshape(out_channels, in_per_group, *([1] * kernel_dims))
