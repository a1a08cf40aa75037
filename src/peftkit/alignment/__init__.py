"""Preference tuning and reinforcement learning from feedback, as functions: the losses (DPO
and its family, ORPO, SimPO, KTO, the Bradley–Terry reward loss, GRPO) and the log-probabilities
they are computed from, with the reference model given by switching adapters off.

``peftkit train`` uses them in its ``reward``, ``preference``, ``kto`` and ``grpo`` tasks; a plain
PyTorch loop can call them directly::

    from peftkit.alignment import completion_logps, dpo_loss, reference_mode

    logps, _ = completion_logps(model, ids, mask, completion_mask)
    with reference_mode(model) as ref:
        ref_logps, _ = completion_logps(ref, ids, mask, completion_mask)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    losses, *_ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    losses.mean().backward()
"""

from peftkit.alignment.logprobs import completion_logps, disable_dropout, frozen_copy, per_token_logps, reference_mode
from peftkit.alignment.losses import (
    DPO_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    PREFERENCE_LOSS_TYPES,
    chosen_nll,
    dpo_loss,
    group_advantages,
    grpo_loss,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    simpo_loss,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "PREFERENCE_LOSS_TYPES",
    "chosen_nll",
    "completion_logps",
    "disable_dropout",
    "dpo_loss",
    "frozen_copy",
    "group_advantages",
    "grpo_loss",
    "kto_loss",
    "orpo_loss",
    "pairwise_reward_loss",
    "per_token_logps",
    "reference_mode",
    "simpo_loss",
]
