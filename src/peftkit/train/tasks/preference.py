"""Offline preference tuning of a causal LM from pairs: DPO (``sigmoid``), ``ipo``, ``hinge``,
``robust`` (label smoothing), and the reference-free ``orpo`` and ``simpo``.

A record holds a prompt, a chosen and a rejected completion, as text or as chat messages
(rendered with the tokenizer's chat template), or OpenAI's preference format
(``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``).
Only completion tokens count in the log-probabilities.

The reference is the model with its adapters switched off: no second copy of the base. A
method that trains the base weights in place (full fine-tuning, BitFit, ...) keeps a frozen
copy of the model instead, which costs as much memory as the model's weights once more.
With ``precompute_ref_logps`` the reference scores every pair once before training (with the
untouched base) and training makes no reference forward at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftkit.alignment.logprobs import completion_logps, disable_dropout, frozen_copy, reference_mode, unwrap
from peftkit.alignment.losses import PREFERENCE_LOSS_TYPES, chosen_nll, dpo_loss, orpo_loss, simpo_loss
from peftkit.train.schema import ConfigError, DataSection, RunConfig
from peftkit.train.tasks.base import Batch, Item, Task, _device_of
from peftkit.train.tasks.text import TextModel

__all__ = ["PairData", "PairEncoder", "PreferenceOptions", "PreferenceTask", "check_pairs", "pair_of", "render"]

Text = str | list[dict[str, Any]]


@dataclass
class PairData(DataSection):
    """Columns of a pair: the prompt, the chosen and the rejected completion (text, or chat
    messages). Records in OpenAI's preference format are read as they are."""

    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"


@dataclass
class PreferenceOptions:
    """Options of ``task: {name: preference, ...}``.

    Args:
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``; reference-free ``orpo``, ``simpo``.
        beta: the strength of the pull towards the reference (the odds-ratio weight λ for
            ``orpo``; SimPO's reward scale for ``simpo``).
        label_smoothing: the assumed share of flipped pairs (``robust``; ``simpo`` too).
        simpo_gamma: SimPO's target reward margin.
        precompute_ref_logps: score every pair with the reference once before training and
            make no reference forward during training.
        disable_dropout: set dropout to 0 in the model (policy and reference then agree on
            the same weights).
        max_prompt_length: keep at most the last this many prompt tokens (``model.max_length``
            bounds prompt plus completion).
        sft_weight: for the DPO family, the weight of the chosen completions' negative
            log-likelihood (mean per token over the batch) added to the loss: RPO, TRL's
            ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, sft_weight]``. It keeps
            the chosen completions likely while their margin grows (plain DPO can lower both).
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    precompute_ref_logps: bool = False
    disable_dropout: bool = True
    max_prompt_length: int | None = None
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in PREFERENCE_LOSS_TYPES:
            raise ConfigError(f"task.loss_type must be one of {list(PREFERENCE_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"task.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"task.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"task.max_prompt_length must be at least 1 (or left out), got {self.max_prompt_length}")
        if self.sft_weight < 0:
            raise ConfigError(f"task.sft_weight must be non-negative, got {self.sft_weight}")
        if self.sft_weight and not self.uses_reference:
            raise ConfigError(f"task.sft_weight applies to the DPO family; loss_type {self.loss_type!r} "
                              f"{'has its own likelihood term (beta weighs the odds ratio)' if self.loss_type == 'orpo' else 'takes none'}")
        if self.precompute_ref_logps and self.loss_type in ("orpo", "simpo"):
            raise ConfigError(f"task.loss_type {self.loss_type!r} uses no reference; drop task.precompute_ref_logps")

    @property
    def uses_reference(self) -> bool:
        return self.loss_type not in ("orpo", "simpo")


# -- records ------------------------------------------------------------------------------------
def pair_of(record: dict[str, Any], data: PairData) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a record (None where missing); OpenAI's preference
    format is recognised by its keys."""
    if "preferred_output" in record or "non_preferred_output" in record:
        source = record.get("input")
        prompt = source.get("messages") if isinstance(source, dict) else None
        return prompt, record.get("preferred_output"), record.get("non_preferred_output")
    return record.get(data.prompt_column), record.get(data.chosen_column), record.get(data.rejected_column)


def text_of(value: Any) -> str:
    """The text of a completion: a string, or the contents of its messages."""
    if isinstance(value, list):
        return "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return "" if value is None else str(value)


def record_line(path: str, index: int) -> str:
    """Where record ``index`` (0-based) of ``path`` is, for error messages: its line in a JSONL
    or CSV file (CSV has a header line), else its record number."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return f"{path}:{index + 1}"
    if ext in (".csv", ".tsv"):
        return f"{path}:{index + 2}"
    return f"{path} record {index + 1}"


def report_bad(bad: list[str], path: str, what: str) -> None:
    """Raises one error that lists every bad record (the first 10)."""
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ConfigError(f"{path}: {len(bad)} bad {what} record(s), nothing was trained: " + "; ".join(bad[:10]) + more
                          + ". Fix or remove them")


def check_pairs(records: list[dict[str, Any]], path: str, data: PairData, task: str) -> None:
    """Every record has a prompt, a non-empty chosen and rejected completion, and they differ."""
    bad = []
    for n, record in enumerate(records):
        prompt, chosen, rejected = pair_of(record, data)
        where = record_line(path, n)
        missing = [name for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if value is None]
        if missing:
            bad.append(f"{where}: no {' and no '.join(missing)} (columns {data.prompt_column!r}, {data.chosen_column!r}, "
                       f"{data.rejected_column!r}, or OpenAI's input/preferred_output/non_preferred_output)")
        elif not text_of(chosen).strip() or not text_of(rejected).strip():
            bad.append(f"{where}: empty {'chosen' if not text_of(chosen).strip() else 'rejected'} completion")
        elif text_of(chosen) == text_of(rejected):
            bad.append(f"{where}: chosen is identical to rejected (the pair teaches nothing)")
    report_bad(bad, path, task)


def render(tokenizer: Any, prompt: Text, completion: Text | None = None) -> tuple[str, str]:
    """``(prompt text, completion text)``. Chat messages go through the tokenizer's chat
    template (the prompt with the assistant's turn opened); without a template each message
    is written ``role: content``."""
    if not isinstance(prompt, list):
        return str(prompt), text_of(completion)
    turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": text_of(completion)}]
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if completion is None:
            return head, ""
        whole = tokenizer.apply_chat_template(prompt + turns, tokenize=False)
        return head, whole[len(head):] if whole.startswith(head) else text_of(turns)
    head = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
    return head, text_of(turns)


def generate_completions(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> Iterator[str]:
    """Greedy completions of ``prompts`` (texts), 16 at a time, left-padded."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), 16):
            enc = tokenizer(prompts[start : start + 16], padding=True, add_special_tokens=False, return_tensors="pt")
            enc = {k: v.to(_device_of(model)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            for ids in out[:, enc["input_ids"].shape[1] :]:
                yield tokenizer.decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side


def predicted_lines(model: Any, tokenizer: Any, prompts: list[str], options: dict[str, Any]) -> Iterator[str]:
    """``peftkit predict``'s lines for a causal LM: each prompt, a tab, its greedy completion."""
    completions = generate_completions(model, tokenizer, prompts, options.get("max_new_tokens", 32))
    for prompt, completion in zip(prompts, completions, strict=True):
        yield f"{prompt}\t{completion}"


def reference_on(reference: Any, device: torch.device) -> Any:
    """A frozen reference copy (or None: the adapters switched off) moved to ``device``."""
    if reference is not None and _device_of(reference) != device:
        reference.to(device)
    return reference


def encoded_splits(task: Task, cfg: RunConfig, encode: Callable[[dict[str, Any]], Item]) -> list[list[Item]]:
    """The run's training and validation items, checked: a prompt that leaves no room for a
    completion after truncation (``item["no_room"]``) is an error naming every such record."""
    from peftkit.train.data import prepare_task_data

    data = prepare_task_data(task, cfg.data, cfg.train.seed)
    out = []
    for records, path in ((data.train, cfg.data.train), (data.validation, cfg.data.validation or cfg.data.train)):
        items = [encode(r) for r in records]
        bad = [f"{record_line(path, n)}: the prompt takes all {cfg.model.max_length} tokens of model.max_length, leaving "
               "no room for a completion (raise model.max_length or set task.max_prompt_length)"
               for n, item in enumerate(items) if item["no_room"]]
        report_bad(bad, path, task.name)
        out.append(items)
    return out


class PairEncoder:
    """A pair as token ids: the prompt (its last ``max_prompt_length`` tokens) followed by each
    completion and the end-of-text token, cut to ``max_length``. Items that leave no room for
    a completion are marked (``"no_room"``); :meth:`PreferenceTask.load` reports them."""

    def __init__(self, tokenizer: Any, data: PairData, max_length: int, max_prompt_length: int | None,
                 cached: dict[tuple, tuple[float, float]] | None = None) -> None:
        self.tok, self.data, self.max_length, self.max_prompt_length = tokenizer, data, max_length, max_prompt_length
        self.cached = cached

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, record: dict[str, Any]) -> Item:
        prompt, chosen, rejected = pair_of(record, self.data)
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        head, chosen_text = render(self.tok, prompt, chosen)
        _, rejected_text = render(self.tok, prompt, rejected)
        prompt_ids = self.ids(head)
        if self.max_prompt_length:
            prompt_ids = prompt_ids[-self.max_prompt_length:]
        room = self.max_length - len(prompt_ids)
        item: Item = {"prompt_length": len(prompt_ids), "no_room": room < 1}
        for key, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            item[f"{key}_ids"] = prompt_ids + (self.ids(text) + eos)[: max(room, 0)]
        if self.cached is not None:
            ref = self.cached.get(pair_key(item))
            if ref is not None:
                item["ref_chosen_logps"], item["ref_rejected_logps"] = ref
        return item


def pair_key(item: Item) -> tuple:
    return tuple(item["chosen_ids"]), tuple(item["rejected_ids"])


class PairCollator:
    """Chosen rows then rejected rows, right-padded, with the mask of completion tokens."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Item]) -> Batch:
        rows = [(i["chosen_ids"], i["prompt_length"]) for i in items] + [(i["rejected_ids"], i["prompt_length"]) for i in items]
        longest = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        completion = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, (row, start) in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            completion[r, start : len(row)] = 1
        batch: Batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
        if all("ref_chosen_logps" in i for i in items):
            batch["ref_chosen_logps"] = torch.tensor([i["ref_chosen_logps"] for i in items], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([i["ref_rejected_logps"] for i in items], dtype=torch.float32)
        return batch


class MetricSums:
    """Running sums of per-example metrics, reported as means (and reset) on request."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float().reshape(-1)
            self.sums[key] = self.sums.get(key, 0.0) + float(value.sum())
            self.counts[key] = self.counts.get(key, 0) + value.numel()

    def means(self, reset: bool = True) -> dict[str, float]:
        out = {k: self.sums[k] / max(1, self.counts[k]) for k in self.sums}
        if reset:
            self.sums, self.counts = {}, {}
        return out


def evaluate_means(task: Task, model: Any, items: list[Item], collate: Callable[[Sequence[Item]], Batch],
                   batch_size: int, accelerator: Any, metrics_of: Callable[[Batch], dict[str, torch.Tensor]],
                   keys: list[str]) -> dict[str, float]:
    """Means of the per-example values ``metrics_of(batch)`` gives over ``items`` (each process
    takes a shard; the sums are added across processes)."""
    was_training = model.training
    model.eval()
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    device = accelerator.device if accelerator else _device_of(model)
    sums = MetricSums()
    for batch in task.batches(items[rank::world], collate, batch_size, device):
        sums.add(metrics_of(batch))
    totals = torch.tensor([[sums.sums.get(k, 0.0), sums.counts.get(k, 0)] for k in keys], dtype=torch.float64,
                          device=device)
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, "sum")
    model.train(was_training)
    return {k: float(s / max(c, 1)) for k, (s, c) in zip(keys, totals.tolist(), strict=True)}


def trains_base_in_place(cfg: RunConfig) -> bool:
    """Whether the run's method is the model's own weights trained in place (it wraps no
    module and names base parameters it trains), so switching it off cannot give the
    reference."""
    from peftkit.train.config import split_method

    method, _, _ = split_method(cfg)
    return method.create_layer is None and method.trainable_base_parameters is not None


class BaseGuard:
    """Refuses, at the first reference forward, a model whose adapters train some of the base
    parameters themselves (LoRA with ``bias`` trained, say): with the adapters off those
    parameters would still be the trained ones, not the reference's."""

    def __init__(self, model: Any) -> None:
        self.base = {id(p) for p in model.parameters()}
        self.checked = False

    def check(self, model: Any) -> None:
        if self.checked:
            return
        trained = [n for n, p in unwrap(model).named_parameters() if p.requires_grad and id(p) in self.base]
        if trained:
            raise ConfigError(f"the method trains {len(trained)} of the base model's own parameters in place (e.g. "
                              f"{trained[0]}), so switching the adapters off does not give the reference model; train "
                              "only adapter parameters (e.g. bias: none), or set task.precompute_ref_logps: true")
        self.checked = True


class PreferenceTask(Task):
    """Offline preference tuning of a causal LM from pairs: DPO and its family, ORPO, SimPO."""

    name = "preference"
    task_type = "CAUSAL_LM"
    unit = "tokens"
    model_options = TextModel
    data_options = PairData
    options = PreferenceOptions
    default_metric = "rewards/accuracies"
    progress_metrics: ClassVar[tuple[str, ...]] = ("rewards/accuracies", "rewards/margins")

    def __init__(self) -> None:
        self.opts = PreferenceOptions()
        self.reference: Any = None  # a frozen copy, for methods that train the base in place
        self.cached: dict[tuple, tuple[float, float]] | None = None
        self.guard: BaseGuard | None = None
        self.train_sums = MetricSums()

    # -- data -------------------------------------------------------------------------------
    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        check_pairs(records, path, data, self.name)

    # -- model ------------------------------------------------------------------------------
    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        from peftkit.train.modeling import load_model_and_tokenizer

        self.opts = cfg.task_options or PreferenceOptions()
        self.train_sums = MetricSums()
        model, tokenizer = load_model_and_tokenizer(cfg, "AutoModelForCausalLM")
        if self.opts.disable_dropout:
            disable_dropout(model)
        encode = PairEncoder(tokenizer, cfg.data, cfg.model.max_length, self.opts.max_prompt_length)
        splits = encoded_splits(self, cfg, encode)
        self.cached = self._reference_logps(model, tokenizer, splits, cfg) if self.opts.precompute_ref_logps else None
        needs_copy = self.opts.uses_reference and not self.opts.precompute_ref_logps and trains_base_in_place(cfg)
        self.reference = frozen_copy(model) if needs_copy else None
        self.guard = BaseGuard(model)
        return model, tokenizer


    @torch.no_grad()
    def _reference_logps(self, model: Any, tokenizer: Any, splits: list[list[Item]], cfg: RunConfig) -> dict[tuple, tuple[float, float]]:
        """One pass of the untouched model over every pair: the reference's log-probabilities."""
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model.to(device).eval()
        collate = self.collator(cfg, tokenizer)
        cached: dict[tuple, tuple[float, float]] = {}
        items = [i for split in splits for i in split]
        for start in range(0, len(items), cfg.train.eval_batch_size):
            chunk = items[start : start + cfg.train.eval_batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            logps, _ = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            chosen, rejected = logps.chunk(2)
            for item, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                cached[pair_key(item)] = (c, r)
        model.train()
        return cached

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        opts = cfg.task_options or PreferenceOptions()
        return PairEncoder(processor, cfg.data, cfg.model.max_length, opts.max_prompt_length, self.cached)

    def collator(self, cfg: RunConfig, processor: Any) -> PairCollator:
        return PairCollator(processor.pad_token_id if processor.pad_token_id is not None else 0)

    def length(self, item: Item) -> int:
        return max(len(item["chosen_ids"]), len(item["rejected_ids"]))

    def units(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    # -- prediction: what the tuned model writes after each prompt -----------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        prompts = [render(processor, pair_of(r, cfg.data)[0] or "")[0] for r in records]
        return predicted_lines(model, processor, prompts, options)

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        return text_of(pair_of(record, cfg.data)[0])

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        return [{cfg.data.prompt_column: line} for line in lines]

    # -- the loss ---------------------------------------------------------------------------
    def pair_outputs(self, model: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-pair losses and what training logs of them (TRL's metric names)."""
        o = self.opts
        ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        reference_free = o.loss_type in ("orpo", "simpo")
        if not reference_free and "ref_chosen_logps" not in batch:
            # before the policy's forward, so that its activations do not wait on the reference's
            if self.reference is None:
                self.guard.check(model)
            with reference_mode(model, reference_on(self.reference, ids.device)) as ref:
                ref_chosen, ref_rejected = completion_logps(ref, ids, mask, completion)[0].chunk(2)
        elif not reference_free:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        logps, tokens = completion_logps(model, ids, mask, completion)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        if reference_free:
            chosen_mean, rejected_mean = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
            if o.loss_type == "orpo":
                losses, chosen_rewards, rejected_rewards = orpo_loss(chosen_mean, rejected_mean, chosen_nll(chosen, chosen_tokens),
                                                                     beta=o.beta)
            else:
                losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_mean, rejected_mean, beta=o.beta, gamma=o.simpo_gamma,
                                                                      label_smoothing=o.label_smoothing)
            logged_chosen, logged_rejected = chosen_mean, rejected_mean
        else:
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=o.beta,
                                                                loss_type=o.loss_type, label_smoothing=o.label_smoothing,
                                                                chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
            if o.sft_weight:
                losses = losses + o.sft_weight * chosen_nll(chosen, chosen_tokens)
            logged_chosen, logged_rejected = chosen, rejected
        return {"losses": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/margins": chosen_rewards - rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "logps/chosen": logged_chosen.detach(), "logps/rejected": logged_rejected.detach()}


    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        out = self.pair_outputs(model, batch)
        if model.training:
            self.train_sums.add({k: v for k, v in out.items() if k != "losses"})
        return out["losses"].mean()

    def train_metrics(self) -> dict[str, float]:
        return self.train_sums.means()

    @torch.no_grad()
    def evaluate(self, model: Any, items: list[Item], collate: Callable[[Sequence[Item]], Batch],
                 batch_size: int, accelerator: Any = None) -> dict[str, float]:
        """The loss and TRL's reward metrics over the validation pairs (means over pairs)."""
        keys = ["eval_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"]

        def metrics_of(batch: Batch) -> dict[str, torch.Tensor]:
            return {"eval_loss" if k == "losses" else k: v for k, v in self.pair_outputs(model, batch).items()}
        return evaluate_means(self, model, items, collate, batch_size, accelerator, metrics_of, keys)
