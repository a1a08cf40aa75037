"""Log-probabilities of completions under a causal LM, and the reference model that adapters
give for free.

The reference of preference tuning is the model before training. With adapters that is the
trained model itself with its adapters switched off (:func:`reference_mode`): no second copy
of the base weights exists. A method that changes the base weights in place (full
fine-tuning) has no such switch; its caller keeps a frozen copy (:func:`frozen_copy`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["completion_logps", "disable_dropout", "frozen_copy", "per_token_logps", "reference_mode", "unwrap"]


def unwrap(model: Any) -> Any:
    """The model inside a DistributedDataParallel-style wrapper (``.module``), else itself."""
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def per_token_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    logits_to_keep: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """``(batch, length − 1)`` log-probabilities of each token given the tokens before it
    (position ``t`` scores ``input_ids[:, t + 1]``); with ``logits_to_keep = k`` only the last
    ``k`` tokens are scored, ``(batch, k)``. ``temperature``: the log-probabilities of the
    distribution sampled from (logits divided by it), as GRPO scores its own samples.

    The log-softmax is taken in float32 one row at a time: a token's log-probability is its
    logit minus the log-sum-exp of the row, without a second vocabulary-sized tensor. A model
    whose forward takes ``logits_to_keep`` (transformers' causal LMs) computes the output
    head on the kept positions only."""
    targets = input_ids[:, 1:]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if _takes(model, "position_ids"):
        # counted from each row's first token: a left-padded row (a prompt batch for sampling)
        # is scored at the positions it was generated at; models with absolute position
        # embeddings (GPT-2) would otherwise score its tokens as if shifted right
        inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if logits_to_keep is not None and _takes(model, "logits_to_keep"):
        logits = model(**inputs, logits_to_keep=logits_to_keep + 1).logits[:, :-1]
        targets = targets[:, -logits_to_keep:]
    else:
        logits = model(**inputs).logits[:, :-1]
        if logits_to_keep is not None:
            logits, targets = logits[:, -logits_to_keep:], targets[:, -logits_to_keep:]
    rows = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        row_logits = row_logits.float() if temperature == 1.0 else row_logits.float() / temperature
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def completion_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed log-probability of each row's completion tokens (the prompt and padding are
    masked out) and the number of those tokens.

    Args:
        input_ids, attention_mask: ``(batch, length)``: prompt then completion, right-padded.
        completion_mask: ``(batch, length)``, 1 on the completion's tokens.

    Returns:
        ``(logps, tokens)``, each ``(batch,)``.
    """
    scored = completion_mask[:, 1:].to(torch.float32)
    starts = completion_mask.to(torch.float32).argmax(-1)  # each row's first completion token
    keep = int(input_ids.shape[1] - starts.min().clamp(min=1))  # no logits for what only prompts need
    logps = per_token_logps(model, input_ids, attention_mask, logits_to_keep=keep)
    return (logps * scored[:, -keep:]).sum(-1), scored.sum(-1)


def _takes(model: Any, argument: str) -> bool:
    """Whether the forward of the causal LM inside ``model`` (a peftkit ``PeftModel``, a
    data-parallel wrapper or a plain transformers model) takes ``argument``."""
    inner = unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    try:
        return argument in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def reference_mode(model: Any, reference: Any = None) -> Iterator[Any]:
    """The reference model within the block, without gradients: ``reference`` when given
    (a frozen copy), else ``model`` with its adapters disabled (``disable_adapter()``)."""
    with torch.no_grad():
        if reference is not None:
            yield reference
            return
        inner = unwrap(model)
        switch = getattr(inner, "disable_adapter", None)
        with switch() if switch is not None else nullcontext():
            yield model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter frozen, in evaluation mode (the reference of a
    method that trains the base weights in place: as much memory as the model's weights)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def disable_dropout(model: nn.Module) -> int:
    """Sets every dropout probability of ``model`` to 0 (policy and reference then score the
    same tokens alike); returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p:
            module.p = 0.0
            changed += 1
        elif isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            module.attention_dropout = 0.0  # attention implementations that take the probability as a number
            changed += 1
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "dropout"):
        config = getattr(model, "config", None)
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return changed
