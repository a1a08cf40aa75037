"""GRPO, online: for each prompt of a batch the policy samples ``num_generations``
completions, a reward scores them, each completion's advantage is its reward normalised
within its group, and the clipped policy-ratio objective (optionally with a KL penalty to
the reference, the model with its adapters off) is minimised.

The reward is a peftkit run folder (a classifier run: the probability of ``reward_label``;
a ``reward`` run: its score) or a Python function ``file.py:function(prompts, completions)
-> list[float]``, called with the prompt texts (chat prompts rendered with the chat template)
and the decoded completions, one per sample.

``train.batch_size`` counts prompts: a step trains on ``batch_size × num_generations``
completions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftkit.alignment.logprobs import disable_dropout, frozen_copy, per_token_logps, reference_mode, unwrap
from peftkit.alignment.losses import GRPO_LOSS_TYPES, group_advantages, grpo_loss
from peftkit.train.schema import ConfigError, DataSection, RunConfig, path_field
from peftkit.train.specs import is_spec, load_object
from peftkit.train.tasks.base import Batch, Item, Task, _device_of, logits_of
from peftkit.train.tasks.preference import (
    BaseGuard,
    MetricSums,
    evaluate_means,
    predicted_lines,
    record_line,
    reference_on,
    render,
    report_bad,
    trains_base_in_place,
)
from peftkit.train.tasks.text import TextModel

__all__ = ["GRPOData", "GRPOOptions", "GRPOTask", "load_reward"]


@dataclass
class GRPOData(DataSection):
    """``prompt_column``: the prompt, as text or chat messages (OpenAI's ``input.messages`` too)."""

    prompt_column: str = "prompt"


@dataclass
class GRPOOptions:
    """Options of ``task: {name: grpo, ...}``.

    Args:
        reward: a run folder (classifier or reward model) or ``file.py:function``.
        reward_label: a classifier run's class whose probability is the reward (default: its
            last class).
        empty_reward: the reward of a completion with no text (only whitespace or the end
            token), instead of the reward's own score of it. A classifier scores an empty
            text like any other, often well, and a policy that learns to stop at once then
            collects the prompt's score for nothing; ``0`` closes that path.
        num_generations: completions sampled per prompt (the group).
        temperature: the sampling temperature.
        max_completion_length: the most tokens a completion has.
        beta: the weight of the KL penalty to the reference (0: no reference forward).
        epsilon, epsilon_high: the clipping range ``[1 − epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``).
        loss_type: ``grpo`` (mean per completion), ``bnpo`` (mean per token), ``dr_grpo``.
        scale_rewards: divide advantages by the ``group``'s standard deviation, the
            ``batch``'s, or ``none``.
        disable_dropout: set dropout to 0 in the model.
    """

    reward: str = path_field("")
    reward_label: str | None = None
    empty_reward: float | None = None
    num_generations: int = 4
    temperature: float = 1.0
    max_completion_length: int = 32
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if not self.reward:
            raise ConfigError("task.reward is required: a run folder (a classifier or reward run) or file.py:function")
        if self.num_generations < 2:
            raise ConfigError(f"task.num_generations must be at least 2 (advantages compare completions of one prompt), "
                              f"got {self.num_generations}")
        if self.temperature <= 0:
            raise ConfigError(f"task.temperature must be positive, got {self.temperature}")
        if self.max_completion_length < 1:
            raise ConfigError(f"task.max_completion_length must be at least 1, got {self.max_completion_length}")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("task.beta must be non-negative and task.epsilon / task.epsilon_high positive")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ConfigError(f"task.loss_type must be one of {list(GRPO_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"task.scale_rewards must be group, batch or none, got {self.scale_rewards!r}")


# -- rewards ------------------------------------------------------------------------------------
class RunReward:
    """The score a finished classifier or reward run gives ``prompt + completion``."""

    def __init__(self, folder: str, label: str | None) -> None:
        from peftkit.train.run import load_run

        self.run, self.model = load_run(folder)
        self.model.eval()
        labels = self.run.labels or []
        self.index = None
        if len(labels) > 1:
            names = [str(v) for v in labels]
            if label is not None and str(label) not in names:
                raise ConfigError(f"task.reward_label {label!r} is not a class of the run in {folder!r}; its classes are {names}")
            self.index = names.index(str(label)) if label is not None else len(names) - 1

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        tok = self.run.processor
        device = _device_of(self.model)
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        for start in range(0, len(texts), 64):
            enc = tok(texts[start : start + 64], padding=True, truncation=True, max_length=self.run.cfg.model.max_length,
                      return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            logits = logits_of(self.model(**enc)).float()
            scores = logits[:, 0] if self.index is None else torch.softmax(logits, -1)[:, self.index]
            out += scores.tolist()
        return out

    def to(self, device: torch.device) -> None:
        self.model.to(device)


def load_reward(spec: str, label: str | None = None) -> Callable[[list[str], list[str]], list[float]]:
    """The reward ``task.reward`` names: a run folder or a ``file.py:function`` spec."""
    if os.path.isdir(spec):
        return RunReward(spec, label)
    if is_spec(spec):
        fn = load_object(spec, setting="task.reward", what="function")
        if not callable(fn):
            raise ConfigError(f"task.reward {spec!r} is not a function")
        return fn
    raise ConfigError(f"task.reward {spec!r} is neither a run folder nor a file.py:function spec")


def prompt_of(record: dict[str, Any], data: GRPOData) -> Any:
    source = record.get("input")
    if isinstance(source, dict) and "messages" in source:
        return source["messages"]
    return record.get(data.prompt_column)


class PromptEncoder:
    """The prompt's last tokens that leave room for ``max_completion_length`` more."""

    def __init__(self, tokenizer: Any, data: GRPOData, room: int) -> None:
        self.tok, self.data, self.room = tokenizer, data, room

    def __call__(self, record: dict[str, Any]) -> Item:
        head, _ = render(self.tok, prompt_of(record, self.data))
        ids = self.tok(head, add_special_tokens=False)["input_ids"][-self.room:]
        return {"prompt_ids": ids, "prompt": head}


class PromptCollator:
    """Left-padded prompts (generation continues each row from its last token)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Item]) -> Batch:
        longest = max(len(i["prompt_ids"]) for i in items)
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["prompt_ids"])
            if n:
                ids[row, longest - n :] = torch.tensor(item["prompt_ids"])
                mask[row, longest - n :] = 1
        return {"input_ids": ids, "attention_mask": mask, "prompts": [i["prompt"] for i in items]}  # type: ignore[dict-item]


class GRPOTask(Task):
    """GRPO: online RL from a reward, on completions the policy samples."""

    name = "grpo"
    task_type = "CAUSAL_LM"
    unit = "tokens"
    model_options = TextModel
    data_options = GRPOData
    options = GRPOOptions
    default_metric = "reward"
    progress_metrics: ClassVar[tuple[str, ...]] = ("reward", "reward_std", "completions/mean_length")

    def __init__(self) -> None:
        self.opts: GRPOOptions | None = None
        self.reward: Any = None
        self.reference: Any = None
        self.guard: BaseGuard | None = None
        self.tokenizer: Any = None
        self.seed = 0
        self.generated = 0
        self.train_sums = MetricSums()

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        bad = []
        for n, record in enumerate(records):
            prompt = prompt_of(record, data)
            if prompt is None:
                bad.append(f"{record_line(path, n)}: no prompt (column {data.prompt_column!r} or OpenAI's input.messages)")
            elif not (prompt if isinstance(prompt, list) else str(prompt).strip()):
                bad.append(f"{record_line(path, n)}: empty prompt")
        report_bad(bad, path, self.name)

    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        from peftkit.train.modeling import load_model_and_tokenizer

        self.opts = cfg.task_options
        if cfg.model.max_length - self.opts.max_completion_length < 1:
            raise ConfigError(f"model.max_length={cfg.model.max_length} leaves no room for a prompt beside "
                              f"task.max_completion_length={self.opts.max_completion_length}; raise model.max_length")
        self.reward = load_reward(self.opts.reward, self.opts.reward_label)
        self.train_sums, self.seed = MetricSums(), cfg.train.seed
        model, tokenizer = load_model_and_tokenizer(cfg, "AutoModelForCausalLM")
        if self.opts.disable_dropout:
            disable_dropout(model)
        self.tokenizer = tokenizer
        self.reference = frozen_copy(model) if self.opts.beta and trains_base_in_place(cfg) else None
        self.guard = BaseGuard(model)
        return model, tokenizer

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> PromptEncoder:
        return PromptEncoder(processor, cfg.data, cfg.model.max_length - cfg.task_options.max_completion_length)

    def collator(self, cfg: RunConfig, processor: Any) -> PromptCollator:
        return PromptCollator(processor.pad_token_id if processor.pad_token_id is not None else 0)

    def length(self, item: Item) -> int:
        return len(item["prompt_ids"])

    def units(self, batch: Batch) -> int:
        return self.generated

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        prompts = [render(processor, prompt_of(r, cfg.data) or "")[0] for r in records]
        return predicted_lines(model, processor, prompts, options)

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        return [{cfg.data.prompt_column: line} for line in lines]

    # -- sampling and scoring -------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model: Any, batch: Batch) -> dict[str, Any]:
        """``num_generations`` completions of each prompt, their mask (up to the first
        end-of-text token) and their rewards."""
        o, tok = self.opts, self.tokenizer
        inner = unwrap(model)
        g = o.num_generations
        prompt_ids = batch["input_ids"].repeat_interleave(g, 0)
        prompt_mask = batch["attention_mask"].repeat_interleave(g, 0)
        was_training = inner.training
        inner.eval()
        out = inner.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=o.temperature, top_k=0,
                             top_p=1.0, max_new_tokens=o.max_completion_length, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        inner.train(was_training)
        completion_ids = out[:, prompt_ids.shape[1] :]
        if tok.eos_token_id is not None:
            is_eos = completion_ids == tok.eos_token_id
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], is_eos.shape[1], dtype=torch.long))
            mask = (torch.arange(completion_ids.shape[1], device=first.device).unsqueeze(0) <= first.unsqueeze(1)).long()
        else:
            mask = torch.ones_like(completion_ids)
        texts = [tok.decode(ids[: int(m.sum())], skip_special_tokens=True) for ids, m in zip(completion_ids, mask, strict=True)]
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        if hasattr(self.reward, "to"):
            self.reward.to(completion_ids.device)
        scores = self.reward(prompts, texts)
        if len(scores) != len(texts):
            raise ConfigError(f"task.reward returned {len(scores)} rewards for {len(texts)} completions")
        if o.empty_reward is not None:
            scores = [o.empty_reward if not text.strip() else s for s, text in zip(scores, texts, strict=True)]
        rewards = torch.tensor([float(s) for s in scores], dtype=torch.float32, device=completion_ids.device)
        grouped = rewards.view(-1, g)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids, "completion_mask": mask,
                "rewards": rewards, "texts": texts,
                "metrics": {"reward": rewards, "reward_std": grouped.std(1), "completions/mean_length": mask.sum(1).float(),
                            "frac_reward_zero_std": torch.isclose(grouped.std(1), torch.zeros_like(grouped[:, 0])).float()}}

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        o = self.opts
        s = self.sample(model, batch)
        advantages = group_advantages(s["rewards"], o.num_generations, o.scale_rewards)
        ids = torch.cat([s["prompt_ids"], s["completion_ids"]], 1)
        mask = torch.cat([s["prompt_mask"], s["completion_mask"]], 1)
        keep = s["completion_ids"].shape[1]
        logps = per_token_logps(model, ids, mask, logits_to_keep=keep, temperature=o.temperature)
        ref = None
        if o.beta:
            if self.reference is None:
                self.guard.check(model)
            with reference_mode(model, reference_on(self.reference, ids.device)) as reference:
                ref = per_token_logps(reference, ids, mask, logits_to_keep=keep, temperature=o.temperature)
        loss, metrics = grpo_loss(logps, logps.detach(), advantages, s["completion_mask"], ref_logps=ref, beta=o.beta,
                                  epsilon_low=o.epsilon, epsilon_high=o.epsilon_high or o.epsilon, loss_type=o.loss_type,
                                  max_completion_length=o.max_completion_length)
        self.generated = int(s["completion_mask"].sum())
        if model.training:
            self.train_sums.add({**s["metrics"], "clip_ratio/region_mean": metrics["clip_ratio"],
                                 **({"kl": metrics["kl"]} if "kl" in metrics else {})})
        return loss


    def train_metrics(self) -> dict[str, float]:
        return self.train_sums.means()

    def evaluate(self, model: Any, items: list[Item], collate: Callable[[Sequence[Item]], Batch],
                 batch_size: int, accelerator: Any = None) -> dict[str, float]:
        """The mean reward (and its spread within groups, and the completion length) of
        completions sampled for the validation prompts, from a fixed seed."""
        rank = accelerator.process_index if accelerator else 0
        device = accelerator.device if accelerator else _device_of(model)
        keys = ["reward", "reward_std", "completions/mean_length"]

        def metrics_of(batch: Batch) -> dict[str, torch.Tensor]:
            return {k: v for k, v in self.sample(model, batch)["metrics"].items() if k in keys}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + rank)
            return evaluate_means(self, model, items, collate, batch_size, accelerator, metrics_of, keys)
