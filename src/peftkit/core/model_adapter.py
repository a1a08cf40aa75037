"""Adapters that act on the model as a whole instead of inside chosen modules.

Some methods leave every module alone and change what the model is fed: learned vectors
placed before the input embeddings, or an attention cache pre-filled with learned keys and
values. They have nothing to wrap. Their registry entry provides ``create_model_adapter``
and :class:`~peftkit.PeftModel` keeps one :class:`ModelAdapter` per adapter name (in
``PeftModel.model_adapters``); while such an adapter is active, ``forward`` and ``generate``
go through it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ModelAdapter"]


class ModelAdapter(nn.Module):
    """The interface :class:`~peftkit.PeftModel` uses for a model-level adapter.

    Subclasses hold the adapter's parameters and implement the four methods below. They
    must not keep the user's model as a submodule (its parameters would be counted twice);
    the model is passed to every call instead.
    """

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors written to the adapter file, keyed as in the file (top level, no
        ``base_model.`` prefix). May be computed (e.g. a re-parametrisation evaluated)."""
        raise NotImplementedError

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads ``state``, whose keys and shapes the caller has checked against
        :meth:`adapter_state_dict`."""
        raise NotImplementedError

    def forward_model(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Runs ``model`` on ``args``/``kwargs`` with the adapter applied."""
        raise NotImplementedError

    def generate_model(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Runs ``model.generate`` with the adapter applied; returns what it returns."""
        raise NotImplementedError
