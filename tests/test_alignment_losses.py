"""The preference and GRPO losses of ``peftkit.alignment`` equal TRL's, values and gradients,
on the same tiny model and batch (TRL as a test-only peer); the reference with adapters off
equals an untouched copy of the base exactly, and holds no second copy of its weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peftkit.alignment import (
    completion_logps,
    dpo_loss,
    group_advantages,
    grpo_loss,
    orpo_loss,
    pairwise_reward_loss,
    per_token_logps,
    reference_mode,
    simpo_loss,
)
from pref_helpers import perturb, save_model_dir, tiny_word_llama, word_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TOL = 1e-5
PAIRS = [
    {"prompt": "the film was", "chosen": " great and lovely", "rejected": " awful"},
    {"prompt": "i liked the", "chosen": " acting", "rejected": " plot but not the story"},
    {"prompt": "this movie is", "chosen": " very good", "rejected": " very dull and boring"},
    {"prompt": "the story", "chosen": " is superb", "rejected": " is poor"},
]


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=TOL, rtol=1e-4)


@pytest.fixture(scope="module")
def dpo():
    from trl import DPOConfig, DPOTrainer

    tok = word_tokenizer()
    policy = tiny_word_llama(len(tok))
    ref = copy.deepcopy(policy)
    perturb(policy)
    args = DPOConfig(output_dir="unused", per_device_train_batch_size=4, report_to=[], use_cpu=True, beta=0.1)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    return SimpleNamespace(trainer=trainer, batch=batch, policy=trainer.model, ref=trainer.ref_model)


def _our_logps(d):
    b = d.batch
    logps, tokens = completion_logps(d.policy, b["input_ids"], b["attention_mask"], b["completion_mask"])
    with reference_mode(d.policy, d.ref) as ref:
        ref_logps, _ = completion_logps(ref, b["input_ids"], b["attention_mask"], b["completion_mask"])
    return logps, tokens, ref_logps


def _trl_dpo(dpo, loss_types, loss_weights, beta, smoothing=0.0):
    """TRL's DPO loss on the fixture's batch and its gradients (the policy's grads zeroed after)."""
    tr = dpo.trainer
    tr.loss_types, tr.loss_weights, tr.beta, tr.label_smoothing = loss_types, loss_weights, beta, smoothing
    dpo.policy.zero_grad()
    theirs = tr.compute_loss(dpo.policy, dict(dpo.batch))
    theirs.backward()
    their_grads = _grads(dpo.policy)
    dpo.policy.zero_grad()
    return theirs, their_grads


@pytest.mark.parametrize(("loss_type", "beta", "smoothing"), [("sigmoid", 0.1, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.1, 0.0),
                                                              ("robust", 0.3, 0.2)])
def test_dpo_losses_and_gradients_equal_trl(dpo, loss_type, beta, smoothing):
    tr = dpo.trainer
    theirs, their_grads = _trl_dpo(dpo, [loss_type], [1.0], beta, smoothing)
    logps, tokens, ref_logps = _our_logps(dpo)
    (c, r), (rc, rr), (tc, tr_) = logps.chunk(2), ref_logps.chunk(2), tokens.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                                                        chosen_tokens=tc, rejected_tokens=tr_)
    ours = losses.mean()
    ours.backward()
    assert abs(float(ours) - float(theirs)) < TOL and float(ours) != 0.0
    _close(_grads(dpo.policy), their_grads)
    metrics = tr._metrics["train"]
    assert abs(metrics["rewards/chosen"][-1] - float(chosen_rewards.mean())) < TOL
    assert abs(metrics["rewards/margins"][-1] - float((chosen_rewards - rejected_rewards).mean())) < TOL
    assert abs(metrics["logps/rejected"][-1] - float(r.mean())) < 1e-4


def test_orpo_equals_trl(dpo):
    from trl.experimental.orpo import ORPOTrainer

    b, policy = dpo.batch, dpo.policy
    labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    policy.zero_grad()
    logits = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    half = len(mean_logps) // 2
    nll = F.cross_entropy(logits[:half, :-1].reshape(-1, logits.size(-1)), labels[:half, 1:].reshape(-1), ignore_index=-100)
    ns = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    ratio_losses = ORPOTrainer.odds_ratio_loss(ns, mean_logps[:half], mean_logps[half:])[0]
    theirs = nll - ratio_losses.mean()
    theirs.backward()
    their_grads = _grads(policy)
    policy.zero_grad()
    logps, tokens, _ = _our_logps(dpo)
    (c, r), (tc, trj) = logps.chunk(2), tokens.chunk(2)
    ours = orpo_loss(c / tc, r / trj, -c.sum() / tc.sum(), beta=0.25)[0].mean()
    ours.backward()
    assert abs(float(ours) - float(theirs)) < TOL
    _close(_grads(policy), their_grads)


def test_simpo_equals_trl(dpo):
    from trl.experimental.cpo import CPOTrainer

    b, policy = dpo.batch, dpo.policy
    labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
    policy.zero_grad()
    logits = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mean_logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    half = len(mean_logps) // 2
    ns = SimpleNamespace(beta=2.0, loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.1, alpha=0.0,
                         accelerator=SimpleNamespace(device="cpu"))
    theirs_losses, their_chosen, _ = CPOTrainer.cpo_loss(ns, mean_logps[:half], mean_logps[half:])
    theirs_losses.mean().backward()
    their_grads = _grads(policy)
    policy.zero_grad()
    logps, tokens, _ = _our_logps(dpo)
    (c, r), (tc, trj) = logps.chunk(2), tokens.chunk(2)
    losses, chosen_rewards, _ = simpo_loss(c / tc, r / trj, beta=2.0, gamma=0.5, label_smoothing=0.1)
    losses.mean().backward()
    assert abs(float(losses.mean()) - float(theirs_losses.mean())) < TOL
    torch.testing.assert_close(chosen_rewards, their_chosen, atol=TOL, rtol=0)
    _close(_grads(policy), their_grads)


def test_bradley_terry_loss_equals_trls_reward_trainer_loss():
    from transformers import BertConfig, BertForSequenceClassification
    from trl.trainer.reward_trainer import RewardTrainer

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=37, num_labels=1)).eval()
    ids = torch.randint(3, 40, (6, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "margin": torch.tensor([0.0, 0.5, 1.0])}
    ns = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=None), _metrics={"eval": __import__("collections").defaultdict(list)},
                         accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x), _tp_size=1, _total_train_tokens=0)
    theirs = RewardTrainer.compute_loss(ns, model, dict(inputs))
    theirs.backward()
    their_grads = _grads(model)
    model.zero_grad()
    scores = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.squeeze(-1)
    ours = pairwise_reward_loss(scores[:3], scores[3:], inputs["margin"]).mean()
    ours.backward()
    assert abs(float(ours) - float(theirs)) < TOL
    _close(_grads(model), their_grads)
    assert abs(ns._metrics["eval"]["accuracy"][-1] - float((scores[:3] > scores[3:]).float().mean())) < TOL


# -- GRPO ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    from trl import GRPOConfig, GRPOTrainer

    tok = word_tokenizer()
    folder = save_model_dir(tmp_path_factory.mktemp("grpo"), "llama", tiny_word_llama(len(tok)), tok)
    args = GRPOConfig(output_dir=str(folder / "out"), per_device_train_batch_size=4, num_generations=4, report_to=[], use_cpu=True,
                      beta=0.04, temperature=0.7, max_completion_length=6, bf16=False)
    trainer = GRPOTrainer(model=str(folder), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=datasets.Dataset.from_list([{"prompt": p["prompt"]} for p in PAIRS]), processing_class=tok)
    perturb(trainer.model, scale=0.02)
    trainer.model.train()  # (no dropout in this Llama) TRL logs training metrics under "train"
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which does not run here
    gen = torch.Generator().manual_seed(3)
    prompt_ids = torch.tensor([[3, 5, 7], [3, 5, 7], [0, 4, 6], [0, 4, 6]])  # left-padded prompts, two groups of two
    prompt_mask = (prompt_ids != 0).long()
    completion_ids = torch.randint(3, len(tok), (4, 5), generator=gen)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        # the samples came from a slightly different policy: ratios away from 1, some clipped
        old = per_token_logps(trainer.model, ids, mask, logits_to_keep=5, temperature=0.7) + 0.3 * torch.randn(4, 5, generator=gen)
        ref = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, 5)[0]
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.9])
    return SimpleNamespace(trainer=trainer, policy=trainer.model, ids=ids, mask=mask, completion_mask=completion_mask,
                           inputs={"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                                   "completion_mask": completion_mask, "old_per_token_logps": old, "ref_per_token_logps": ref},
                           rewards=rewards, old=old, ref=ref)


def test_group_advantages_equal_trls_normalisation():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.9, 0.3, 0.3])
    grouped = rewards.view(-1, 4)
    expected = (rewards - grouped.mean(1).repeat_interleave(4)) / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), expected, atol=1e-6, rtol=0)
    expected_batch = (rewards - grouped.mean(1).repeat_interleave(4)) / (nanstd(rewards) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, scale="batch"), expected_batch, atol=1e-6, rtol=0)
    assert torch.equal(group_advantages(torch.ones(4), 2), torch.zeros(4))  # equal rewards: no signal


@pytest.mark.parametrize(("loss_type", "beta", "correction"), [("grpo", 0.0, True), ("grpo", 0.04, True), ("grpo", 0.04, False),
                                                               ("bnpo", 0.04, True), ("dr_grpo", 0.0, True)])
def test_grpo_loss_and_gradients_equal_trl(grpo, loss_type, beta, correction):
    tr = grpo.trainer
    tr.loss_type, tr.beta, tr.args.use_bias_correction_kl = loss_type, beta, correction
    advantages = group_advantages(grpo.rewards, 2)
    grpo.policy.zero_grad()
    theirs = tr._compute_loss(grpo.policy, {**grpo.inputs, "advantages": advantages})
    theirs.backward()
    their_grads = _grads(grpo.policy)
    grpo.policy.zero_grad()
    logps = per_token_logps(grpo.policy, grpo.ids, grpo.mask, logits_to_keep=5, temperature=0.7)
    ours, metrics = grpo_loss(logps, grpo.old, advantages, grpo.completion_mask, ref_logps=grpo.ref, beta=beta, loss_type=loss_type,
                              max_completion_length=6, kl_bias_correction=correction)
    ours.backward()
    assert abs(float(ours) - float(theirs)) < TOL and float(ours) != 0.0
    _close(_grads(grpo.policy), their_grads)
    logged = tr._metrics["train"]
    assert abs(logged["clip_ratio/region_mean"][-1] - float(metrics["clip_ratio"])) < TOL
    if beta:
        assert abs(logged["kl"][-1] - float(metrics["kl"])) < TOL


# -- log-probabilities on the completion's positions only -------------------------------------------
class _AllLogits(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep``: the output head runs everywhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_completion_logps_from_the_kept_positions_equal_those_of_every_position(dpo):
    """The output head computed on the completion's positions only (``logits_to_keep``) gives
    the log-probabilities and gradients of the head on every position; prompts of different
    lengths in one batch (the shortest decides what is kept)."""
    tok = word_tokenizer()
    model = tiny_word_llama(len(tok), seed=3)
    b = dpo.batch
    assert len(set(b["completion_mask"].argmax(-1).tolist())) > 1  # the rows' completions start at different places
    kept, kept_tokens = completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
    kept.sum().backward()
    kept_grads = _grads(model)
    model.zero_grad()
    full, full_tokens = completion_logps(_AllLogits(model), b["input_ids"], b["attention_mask"], b["completion_mask"])
    full.sum().backward()
    # the same sums over the same tokens; only the head's matrix product runs on fewer rows
    assert torch.equal(kept_tokens, full_tokens) and bool((full < 0).all())
    torch.testing.assert_close(kept, full, atol=TOL, rtol=1e-5)
    _close(kept_grads, _grads(model))


def test_left_padded_rows_are_scored_at_the_positions_they_were_sampled_at():
    """GRPO scores prompts left-padded for sampling. With absolute position embeddings
    (GPT-2) a padded row scored without position ids would be read as shifted right; its
    log-probabilities equal the unpadded row's, as generate() saw it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]  # prompt then 3 sampled tokens; the second prompt is shorter
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        padded = per_token_logps(model, ids, mask, logits_to_keep=3)
        for n, r in enumerate(rows):
            alone = per_token_logps(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), logits_to_keep=3)
            torch.testing.assert_close(padded[n], alone[0], atol=TOL, rtol=1e-5)
        # the shift does matter to this model: read from position 0, the padded row scores otherwise
        shifted = model(input_ids=ids, attention_mask=mask).logits[1, -4:-1].log_softmax(-1)
        shifted = shifted.gather(-1, ids[1, -3:].unsqueeze(-1)).squeeze(-1)
    assert (shifted - padded[1]).abs().max() > 1e-3


# -- the reference is the base, with no copy -----------------------------------------------------
def _storage_ptrs(model) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()} | {b.untyped_storage().data_ptr() for b in model.buffers()}


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_reference_with_adapters_off_is_the_untouched_base_without_a_copy(dpo, method):
    from peftkit import IA3Config, LoraConfig, get_peft_model

    tok = word_tokenizer()
    base = tiny_word_llama(len(tok), seed=5)
    untouched = copy.deepcopy(base)
    before = _storage_ptrs(base)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    config = (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if method == "lora"
              else IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model = get_peft_model(base, config)
    perturb(model, scale=0.1, trainable_only=True)  # the adapters move, as training would move them
    b = dpo.batch
    with torch.no_grad():
        policy_logps, _ = completion_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
    with reference_mode(model) as ref:
        ours, _ = completion_logps(ref, b["input_ids"], b["attention_mask"], b["completion_mask"])
    with torch.no_grad():
        expected, _ = completion_logps(untouched, b["input_ids"], b["attention_mask"], b["completion_mask"])
    # same weights, same computation: exactly equal; and the policy does differ from it
    assert torch.equal(ours, expected)
    assert not torch.allclose(policy_logps, expected)
    # no base weight was copied: every original storage is still in use, and what was added is only adapters
    after = _storage_ptrs(model)
    assert before <= after
    added = sum(p.numel() * p.element_size() for p in model.parameters() if p.untyped_storage().data_ptr() not in before)
    assert 0 < added < 0.1 * base_bytes


def test_dpo_with_sft_weight_equals_trls_sigmoid_plus_sft(dpo):
    """RPO: DPO plus the chosen completions' NLL, TRL's loss_type [sigmoid, sft], loss_weights [1, w]."""
    from peftkit.alignment import chosen_nll

    theirs, their_grads = _trl_dpo(dpo, ["sigmoid", "sft"], [1.0, 0.7], 0.1)
    logps, tokens, ref_logps = _our_logps(dpo)
    (c, r), (rc, rr), (tc, _) = logps.chunk(2), ref_logps.chunk(2), tokens.chunk(2)
    losses, _, _ = dpo_loss(c, r, rc, rr, beta=0.1)
    nll = chosen_nll(c, tc)
    ours = (losses + 0.7 * nll).mean()
    ours.backward()
    assert float(nll) > 1.0  # the term is there: the NLL of a tiny random model's completions is large
    assert abs(float(ours) - float(theirs)) < TOL
    _close(_grads(dpo.policy), their_grads)
