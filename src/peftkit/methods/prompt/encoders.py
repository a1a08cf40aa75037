"""The trained part of the soft-prompt methods: a table of learned vectors, optionally
produced by a small network (re-parametrisation) that is folded away for saving.

``VirtualTokens`` returns a ``(rows, width)`` tensor:

- prompt tuning: the table itself, ``P = E``;
- P-tuning: ``P = f(E)`` with ``f`` an MLP or a bidirectional LSTM followed by an MLP;
- prefix tuning: ``P = E`` or, with ``prefix_projection``, ``P = W₂·tanh(W₁·E + b₁) + b₂``;
  each row then holds every layer's key and value for one virtual position.

:meth:`VirtualTokens.fold` replaces ``f`` and ``E`` by the table ``P`` they produce.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VirtualTokens", "lstm_head", "mlp_head", "prefix_projection_head"]


class VirtualTokens(nn.Module):
    """A learned ``(rows, in_width)`` table, optionally followed by a network ``head``.

    Args:
        table: the initial table ``E``.
        head: a module mapping ``(rows, in_width)`` to ``(rows, out_width)``, or None.
    """

    def __init__(self, table: torch.Tensor, head: nn.Module | None = None) -> None:
        super().__init__()
        self.embedding = nn.Parameter(table.detach().clone())
        self.head = head

    @property
    def reparametrised(self) -> bool:
        return self.head is not None

    def forward(self) -> torch.Tensor:
        """``P``: the table, or the head applied to it."""
        return self.embedding if self.head is None else self.head(self.embedding)

    def table(self) -> torch.Tensor:
        """``P`` as a detached tensor (the head evaluated without dropout)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self().detach().clone()
        finally:
            self.train(was_training)

    def fold(self, table: torch.Tensor | None = None) -> None:
        """Drops the head; the plain table becomes ``table`` (default: the current ``P``).
        The new table keeps the trainability of the old parameters."""
        new = self.table() if table is None else table.detach().clone()
        requires_grad = self.embedding.requires_grad
        self.embedding = nn.Parameter(new.to(self.embedding.device, self.embedding.dtype), requires_grad=requires_grad)
        self.head = None


class _LSTMHead(nn.Module):
    """Bidirectional LSTM over the virtual positions, then a two-layer MLP back to the
    token width (the P-tuning paper's prompt encoder)."""

    def __init__(self, width: int, hidden: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                            bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(table.unsqueeze(0))
        return self.mlp(out.squeeze(0))


def mlp_head(width: int, hidden: int, num_layers: int, dropout: float) -> nn.Module:
    """``width → hidden (→ hidden)×(num_layers-1) → width`` with ReLU between layers."""
    layers: list[nn.Module] = []
    size = width
    for _ in range(num_layers):
        layers += [nn.Linear(size, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        size = hidden
    layers.append(nn.Linear(size, width))
    return nn.Sequential(*layers)


def lstm_head(width: int, hidden: int, num_layers: int, dropout: float) -> nn.Module:
    return _LSTMHead(width, hidden, num_layers, dropout)


def prefix_projection_head(width: int, hidden: int, out_width: int) -> nn.Module:
    """``P = W₂·tanh(W₁·E + b₁) + b₂``: ``width → hidden → out_width``."""
    return nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out_width))
