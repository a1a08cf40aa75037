"""Preference and reinforcement-learning losses as pure functions of log-probabilities and
scores; no model, no trainer.

Notation: for a prompt ``x`` with a preferred completion ``y_w`` and a dispreferred one
``y_l``, ``log π(y|x)`` is the summed log-probability of the completion tokens under the
trained policy and ``log π_ref(y|x)`` under the reference (the same model with its adapters
switched off). The implicit reward of a completion is ``r(y) = β·(log π(y|x) − log π_ref(y|x))``.

Every function returns per-example losses (the caller takes the mean) and, where the
method defines them, the rewards that training logs as ``rewards/chosen`` and
``rewards/rejected``. KTO's examples are unpaired (one completion, labelled desirable or
not); its rewards are per example.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "PREFERENCE_LOSS_TYPES",
    "chosen_nll",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "kto_loss",
    "orpo_loss",
    "pairwise_reward_loss",
    "simpo_loss",
]

#: losses of a policy against a reference
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
#: every offline pairwise loss: the DPO family and the reference-free ones
PREFERENCE_LOSS_TYPES = (*DPO_LOSS_TYPES, "orpo", "simpo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
#: losses of unpaired examples labelled desirable or undesirable
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of the chosen completions, mean per token over the batch
    (ORPO's likelihood term; added to DPO it is RPO), from their summed log-probabilities
    and token counts."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


def pairwise_reward_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                         margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """The Bradley–Terry loss of a reward model, per pair:
    ``−log σ(r(x, y_w) − r(x, y_l) − m)`` (``m``: an optional margin, default 0).

    Args:
        chosen_scores, rejected_scores: ``(pairs,)`` scalar scores of the model.
        margin: how much higher the chosen score should be, per pair or for all.
    """
    delta = chosen_scores - rejected_scores
    if margin is not None:
        delta = delta - margin
    return -F.logsigmoid(delta)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its variants on summed completion log-probabilities.

    With the log-ratio margin ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``:

    - ``sigmoid`` (DPO): ``−log σ(β·h)``
    - ``hinge`` (SLiC): ``max(0, 1 − β·h)``
    - ``ipo``: ``(h̄ − 1/(2β))²`` where ``h̄`` uses each completion's log-ratio divided by its
      token count (so β means the same for short and long completions)
    - ``robust`` (label smoothing ``ε``, the share of pairs assumed flipped):
      ``(−(1−ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε)``

    Args:
        chosen_logps, rejected_logps: ``(pairs,)`` policy log-probabilities of the completions.
        ref_chosen_logps, ref_rejected_logps: the reference's.
        beta: the strength of the pull towards the reference.
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: ``ε`` of ``robust`` (in [0, 0.5)).
        chosen_tokens, rejected_tokens: ``(pairs,)`` completion token counts (``ipo`` needs them).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(pairs,)``; the rewards are
        ``β·(log π − log π_ref)``, detached.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' needs the completions' token counts (chosen_tokens, rejected_tokens)")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type 'robust', got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl_logps: torch.Tensor | None = None,
             ref_kl_logps: torch.Tensor | None = None, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Kahneman–Tversky optimisation) on unpaired examples, each a completion ``y`` of
    a prompt ``x`` labelled desirable or undesirable.

    With the log-ratio ``r = log π(y|x) − log π_ref(y|x)`` and the reference point
    ``z = max(0, mean_j (log π(y'_j|x_j) − log π_ref(y'_j|x_j)))``, an estimate of
    KL(π ‖ π_ref) from mismatched pairs ``(x_j, y'_j)`` of the batch (a prompt with another
    example's completion), detached:

    - ``kto``: desirable ``λ_D·(1 − σ(β·(r − z)))``, undesirable ``λ_U·(1 − σ(β·(z − r)))``
    - ``apo_zero_unpaired`` (APO-zero, no reference point): desirable ``λ_D·(1 − σ(β·r))``,
      undesirable ``λ_U·σ(β·r)``

    Args:
        logps, ref_logps: ``(batch,)`` summed completion log-probabilities under the policy
            (with gradient) and the reference.
        desirable: ``(batch,)`` booleans, True where the completion is desirable.
        kl_logps, ref_kl_logps: ``(batch,)`` the same for the mismatched pairs (``kto`` needs
            them; only their mean enters, without gradient). Across several processes, pass
            every process's values to get the mean over the whole batch.
        beta: the strength of the pull towards the reference.
        desirable_weight, undesirable_weight: ``λ_D`` and ``λ_U``, to balance unequal counts.
        loss_type: one of :data:`KTO_LOSS_TYPES`.

    Returns:
        ``(losses, rewards, kl)``: ``(batch,)`` weighted losses (their mean is the loss),
        ``(batch,)`` rewards ``β·r`` (detached), and the scalar ``z`` (0 for
        ``apo_zero_unpaired``).
    """
    ratio = logps - ref_logps
    if loss_type == "kto":
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("loss_type 'kto' needs the mismatched pairs' log-probabilities (kl_logps, ref_kl_logps)")
        kl = (kl_logps - ref_kl_logps).detach().mean().clamp(min=0)
        desirable_losses = 1 - torch.sigmoid(beta * (ratio - kl))
        undesirable_losses = 1 - torch.sigmoid(beta * (kl - ratio))
    elif loss_type == "apo_zero_unpaired":
        kl = ratio.new_zeros(()).detach()
        desirable_losses = 1 - torch.sigmoid(beta * ratio)
        undesirable_losses = torch.sigmoid(beta * ratio)
    else:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    losses = torch.where(desirable.to(torch.bool), desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)
    return losses, (beta * ratio).detach(), kl


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of ``−log 2``."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (reference-free): the language-modelling loss of the chosen completion plus an
    odds-ratio term, ``L = NLL(y_w) − β·log σ(log odds(y_w) − log odds(y_l))`` with
    ``odds(y) = p / (1 − p)`` and ``p = exp(mean token log-probability)``.

    Args:
        chosen_mean_logps, rejected_mean_logps: ``(pairs,)`` per-token mean log-probabilities.
        chosen_nll: the mean negative log-likelihood of the chosen completions' tokens (a
            scalar over the batch, or ``(pairs,)``).
        beta: the weight of the odds-ratio term (λ in the paper).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``: ``losses`` is ``(pairs,)`` whose mean
        is ``L``; rewards are ``β·mean log p`` (detached).
    """
    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, (beta * c).detach(), (beta * r).detach()


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (reference-free, length-normalised):
    ``−(1−ε)·log σ(β·(m_w − m_l) − γ) − ε·log σ(−β·(m_w − m_l) + γ)`` with ``m`` a
    completion's mean token log-probability and ``γ`` the target reward margin.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``; rewards are ``β·m`` (detached).
    """
    logits = (chosen_mean_logps - rejected_mean_logps) - gamma / beta
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    return losses, (beta * chosen_mean_logps).detach(), (beta * rejected_mean_logps).detach()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages: each completion's reward minus the mean reward of its group (the
    completions of the same prompt, consecutive in ``rewards``), divided by the group's
    standard deviation (``scale="group"``, Bessel-corrected, plus 1e-4), by the whole
    batch's (``"batch"``), or not at all (``"none"``).

    Args:
        rewards: ``(prompts × group_size,)``.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centred / (std + 1e-4)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, loss_type: str = "grpo",
              max_completion_length: int | None = None,
              kl_bias_correction: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped policy-ratio objective, per token ``t`` of each completion ``i``:

    ``ℓ_it = −min(ρ_it·A_i, clip(ρ_it, 1−ε_low, 1+ε_high)·A_i) + β·KL_it``

    with ``ρ = exp(log π − log π_old)`` and the KL estimate
    ``KL = exp(log π_ref − log π) − (log π_ref − log π) − 1``, multiplied by ``ρ`` when
    ``kl_bias_correction`` (then its gradient is that of the reverse KL even off-policy,
    DeepSeek-V3.2's correction, as TRL does by default). The token losses are averaged
    per completion then over completions (``grpo``), over all tokens of the batch
    (``bnpo``), or summed and divided by ``completions × max_completion_length``
    (``dr_grpo``).

    Args:
        logps: ``(completions, T)`` per-token log-probabilities of the policy (with gradient).
        old_logps: those of the policy that sampled the completions (detached; equal to
            ``logps`` when each batch of samples is used for one step).
        advantages: ``(completions,)``, e.g. from :func:`group_advantages`.
        mask: ``(completions, T)``, 1 on completion tokens.
        ref_logps: the reference's per-token log-probabilities (needed when ``beta`` ≠ 0).

    Returns:
        ``(loss, metrics)``: the scalar loss and detached ``kl`` (mean per token, when
        ``beta`` ≠ 0) and ``clip_ratio`` (the share of tokens whose ratio was clipped in
        the direction that limits the update).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    tokens = mask.sum().clamp(min=1.0)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probabilities (ref_logps)")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / tokens).detach()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    else:
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    metrics["clip_ratio"] = (((low | high).to(mask.dtype) * mask).sum() / tokens).detach()
    return loss, metrics
