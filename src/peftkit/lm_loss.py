"""The causal language-modelling loss without the full logits tensor in memory.

A step on a vocabulary of V tokens holds ``batch × length × V`` logits, their log-softmax and
their gradient: with 32,000 tokens and 512 positions that is 65 MiB per copy in float32,
more than the LoRA weights and often more than a quantised layer stack. Here the output head
and the cross entropy run on chunks of positions under activation checkpointing, so only one
chunk's logits exist at a time, in the forward pass and again in the backward pass. The
loss and gradients are those of the usual loss (same sum, same mean over predicted tokens),
up to floating-point summation order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_causal_lm_loss"]

IGNORE_INDEX = -100


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, Any]:
    """The decoder body, the output head and the config of a transformers causal LM (or of
    the base model inside a peftkit ``PeftModel``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if head is None or body is None:
        raise TypeError(
            f"{type(base).__name__} does not expose its decoder and output head (get_decoder / "
            "get_output_embeddings); chunked_causal_lm_loss needs a transformers causal LM"
        )
    return body, head, getattr(base, "config", None)


def chunked_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                           attention_mask: torch.Tensor | None = None, chunk_size: int = 1024, **kwargs: Any) -> torch.Tensor:
    """The next-token cross entropy of ``model`` on ``input_ids`` (mean over the predicted
    tokens whose label is not -100), computing the output head ``chunk_size`` positions at
    a time.

    Args:
        model: a transformers causal LM, plain or with peftkit adapters.
        input_ids: ``(batch, length)`` token ids.
        labels: ``(batch, length)`` targets (as for ``model(..., labels=...)``: shifted inside);
            defaults to ``input_ids``.
        attention_mask: passed to the decoder.
        chunk_size: positions per chunk (over the whole batch).
        kwargs: further decoder inputs (e.g. ``position_ids``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    body, head, config = _parts(model)
    labels = input_ids if labels is None else labels
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
    width = hidden.shape[-1]
    states = hidden[:, :-1].reshape(-1, width)
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    softcap = getattr(config, "final_logit_softcapping", None)
    count = (targets != IGNORE_INDEX).sum()

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk_size):
        h, y = states[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
        else:
            total = total + chunk_loss(h, y)
    return total / count.clamp(min=1)
