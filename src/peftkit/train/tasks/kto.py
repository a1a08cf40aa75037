"""KTO (Kahneman–Tversky optimisation) of a causal LM from unpaired feedback: each record is a
prompt, one completion and a label saying whether the completion is desirable, so thumbs up /
thumbs down data trains without being paired.

A record holds ``prompt``, ``completion`` (text, or chat messages rendered with the
tokenizer's chat template) and ``label`` (a boolean, 0/1, or the text true/false/1/0 of a
CSV). Only completion tokens count in the log-probabilities.

**The KL reference point** ``z`` is estimated as TRL does: from mismatched pairs inside the
batch, row ``i``'s prompt followed by the completion of row ``i − 1`` (cyclically), so the
mismatched completions are the batch's own. Here the pairing is made when the batch is
collated, so it holds for shuffled and length-grouped batches (TRL fixes it when the dataset
is prepared and needs sequential sampling for it). Only the mean over a process's batch enters,
without gradient; a batch of one example has no other completion and scores its own pair.
With ``precompute_ref_logps`` the reference's log-probability of each mismatched pair is
computed before training, so the pairing is fixed then: each record is paired with the
completion of the record before it in its split (cyclically).

The reference is the model with its adapters switched off, as in the ``preference`` task; a
method that trains the base weights in place keeps a frozen copy (unless the reference
log-probabilities are precomputed).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftkit.alignment.logprobs import completion_logps, disable_dropout, frozen_copy, reference_mode
from peftkit.alignment.losses import KTO_LOSS_TYPES, kto_loss
from peftkit.train.schema import ConfigError, DataSection, RunConfig
from peftkit.train.tasks.base import Batch, Item, Task
from peftkit.train.tasks.preference import (
    BaseGuard,
    MetricSums,
    encoded_splits,
    evaluate_means,
    predicted_lines,
    record_line,
    reference_on,
    render,
    report_bad,
    text_of,
    trains_base_in_place,
)
from peftkit.train.tasks.text import TextModel

__all__ = ["KTOOptions", "KTOTask", "UnpairedCollator", "UnpairedData", "UnpairedEncoder", "check_unpaired", "desirable_of"]

_TRUE, _FALSE = ("true", "1"), ("false", "0")


@dataclass
class UnpairedData(DataSection):
    """Columns of an unpaired example: the prompt, the completion (text, or chat messages) and
    the label (True/1: desirable, False/0: undesirable)."""

    prompt_column: str = "prompt"
    completion_column: str = "completion"
    label_column: str = "label"


@dataclass
class KTOOptions:
    """Options of ``task: {name: kto, ...}``.

    Args:
        loss_type: ``kto``, or ``apo_zero_unpaired`` (no KL reference point, no mismatched pairs).
        beta: the strength of the pull towards the reference.
        desirable_weight, undesirable_weight: ``λ_D`` and ``λ_U``, the weights of the two
            kinds of example; the KTO paper advises ``λ_D·n_D / (λ_U·n_U)`` in [1, 4/3].
        precompute_ref_logps: score every example (and its mismatched pair) with the
            reference once before training and make no reference forward during training.
        disable_dropout: set dropout to 0 in the model.
        max_prompt_length: keep at most the last this many prompt tokens.
    """

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref_logps: bool = False
    disable_dropout: bool = True
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ConfigError(f"task.loss_type must be one of {list(KTO_LOSS_TYPES)}, got {self.loss_type!r} (paired data "
                              "trains with task: preference)")
        if self.beta <= 0:
            raise ConfigError(f"task.beta must be positive, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("task.desirable_weight and task.undesirable_weight must be positive, got "
                              f"{self.desirable_weight} and {self.undesirable_weight}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"task.max_prompt_length must be at least 1 (or left out), got {self.max_prompt_length}")

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"


# -- records ------------------------------------------------------------------------------------
def desirable_of(value: Any) -> bool | None:
    """A record's label as a boolean: True/False, 1/0, or the text true/false/1/0 (any case);
    None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    return None


def check_unpaired(records: list[dict[str, Any]], path: str, data: UnpairedData, task: str) -> None:
    """Every record has a prompt, a non-empty completion and a boolean label."""
    bad = []
    for n, record in enumerate(records):
        where = record_line(path, n)
        prompt, completion, label = (record.get(c) for c in (data.prompt_column, data.completion_column, data.label_column))
        missing = [name for name, value in (("prompt", prompt), ("completion", completion), ("label", label)) if value is None]
        if missing:
            bad.append(f"{where}: no {' and no '.join(missing)} (columns {data.prompt_column!r}, {data.completion_column!r}, "
                       f"{data.label_column!r})")
        elif not text_of(completion).strip():
            bad.append(f"{where}: empty completion")
        elif desirable_of(label) is None:
            bad.append(f"{where}: label {label!r} is not a boolean (true/false or 1/0)")
    report_bad(bad, path, task)


class UnpairedEncoder:
    """An example as token ids: the prompt (its last ``max_prompt_length`` tokens) and the
    completion with the end-of-text token, cut so that both fit in ``max_length``. Items that
    leave no room for a completion are marked (``"no_room"``); :meth:`KTOTask.load` reports them."""

    def __init__(self, tokenizer: Any, data: UnpairedData, max_length: int, max_prompt_length: int | None,
                 cached: dict[tuple, dict[str, Any]] | None = None) -> None:
        self.tok, self.data, self.max_length, self.max_prompt_length = tokenizer, data, max_length, max_prompt_length
        self.cached = cached

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, record: dict[str, Any]) -> Item:
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        head, text = render(self.tok, record.get(self.data.prompt_column) or "", record.get(self.data.completion_column))
        prompt_ids = self.ids(head)
        if self.max_prompt_length:
            prompt_ids = prompt_ids[-self.max_prompt_length:]
        room = self.max_length - len(prompt_ids)
        item: Item = {"prompt_ids": prompt_ids, "completion_ids": (self.ids(text) + eos)[: max(room, 0)], "no_room": room < 1,
                      "desirable": bool(desirable_of(record.get(self.data.label_column)))}
        if self.cached is not None:
            item.update(self.cached.get(example_key(item), {}))
        return item


def example_key(item: Item) -> tuple:
    return tuple(item["prompt_ids"]), tuple(item["completion_ids"])


def _rows(pairs: list[tuple[list[int], list[int]]], pad_id: int, max_length: int, prefix: str) -> Batch:
    """Prompt-then-completion rows, right-padded and cut to ``max_length``, with the mask of
    completion tokens."""
    rows = [(prompt + completion)[:max_length] for prompt, completion in pairs]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    completion = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, (row, (prompt, _)) in enumerate(zip(rows, pairs, strict=True)):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        completion[r, len(prompt) : len(row)] = 1
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}completion_mask": completion}


class UnpairedCollator:
    """The batch's examples, their labels, and (for ``kto``) the mismatched rows of the KL
    estimate under ``kl_*``: row ``i``'s prompt with row ``i − 1``'s completion, or with the
    completion fixed before training when the items carry one (precomputed references)."""

    def __init__(self, pad_id: int, max_length: int, kl: bool) -> None:
        self.pad_id, self.max_length, self.kl = pad_id, max_length, kl

    def __call__(self, items: Sequence[Item]) -> Batch:
        batch = _rows([(i["prompt_ids"], i["completion_ids"]) for i in items], self.pad_id, self.max_length, "")
        batch["desirable"] = torch.tensor([i["desirable"] for i in items], dtype=torch.bool)
        if all("ref_logps" in i for i in items):
            batch["ref_logps"] = torch.tensor([i["ref_logps"] for i in items], dtype=torch.float32)
        if self.kl:
            fixed = all("kl_completion_ids" in i for i in items)
            others = [i["kl_completion_ids"] for i in items] if fixed else [items[n - 1]["completion_ids"] for n in range(len(items))]
            batch.update(_rows([(i["prompt_ids"], other) for i, other in zip(items, others, strict=True)], self.pad_id,
                               self.max_length, "kl_"))
            if fixed and all("ref_kl_logps" in i for i in items):
                batch["ref_kl_logps"] = torch.tensor([i["ref_kl_logps"] for i in items], dtype=torch.float32)
        return batch


def _sides(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TRL's per-side metrics of one batch: rewards and log-probabilities of the desirable
    (``chosen``) and undesirable (``rejected``) examples, left out where a side is empty."""
    keep = out["desirable"]
    values = {"rewards/chosen": out["rewards"][keep], "rewards/rejected": out["rewards"][~keep],
              "logps/chosen": out["logps"][keep], "logps/rejected": out["logps"][~keep]}
    return {k: v for k, v in values.items() if v.numel()}


def _with_margin(means: dict[str, float]) -> dict[str, float]:
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


class KTOTask(Task):
    """KTO of a causal LM from unpaired desirable / undesirable completions."""

    name = "kto"
    task_type = "CAUSAL_LM"
    unit = "tokens"
    model_options = TextModel
    data_options = UnpairedData
    options = KTOOptions
    default_metric = "eval_loss"
    progress_metrics: ClassVar[tuple[str, ...]] = ("rewards/margins", "kl")

    def __init__(self) -> None:
        self.opts = KTOOptions()
        self.reference: Any = None  # a frozen copy, for methods that train the base in place
        self.cached: dict[tuple, dict[str, Any]] | None = None
        self.guard: BaseGuard | None = None
        self.train_sums = MetricSums()

    # -- data -------------------------------------------------------------------------------
    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        check_unpaired(records, path, data, self.name)

    def labels(self, train: list[dict[str, Any]], validation: list[dict[str, Any]], data: DataSection) -> list[Any] | None:
        """Checks that the training records hold both kinds of example (KTO has no class labels
        to return)."""
        wanted = [desirable_of(r.get(data.label_column)) for r in train]
        good = sum(wanted)
        if good in (0, len(wanted)):
            kind, other = ("desirable", "undesirable (label false)") if good else ("undesirable", "desirable (label true)")
            raise ConfigError(f"{data.train}: all {len(wanted)} training records are {kind}; KTO learns from both kinds, so add "
                              f"{other} examples")
        return None

    # -- model ------------------------------------------------------------------------------
    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        from peftkit.train.modeling import load_model_and_tokenizer

        self.opts = cfg.task_options or KTOOptions()
        self.train_sums = MetricSums()
        self._check_batch_sizes(cfg)
        model, tokenizer = load_model_and_tokenizer(cfg, "AutoModelForCausalLM")
        if self.opts.disable_dropout:
            disable_dropout(model)
        encode = UnpairedEncoder(tokenizer, cfg.data, cfg.model.max_length, self.opts.max_prompt_length)
        splits = self._encoded_splits(cfg, encode)
        self.cached = self._reference_logps(model, tokenizer, splits, cfg) if self.opts.precompute_ref_logps else None
        self.reference = frozen_copy(model) if not self.opts.precompute_ref_logps and trains_base_in_place(cfg) else None
        self.guard = BaseGuard(model)
        return model, tokenizer

    def _check_batch_sizes(self, cfg: RunConfig) -> None:
        """``kto`` needs two examples per process batch: one's completion is another's mismatch."""
        per_process = cfg.train.batch_size // max(1, int(os.environ.get("WORLD_SIZE", "1")))
        if self.opts.uses_kl and min(per_process, cfg.train.eval_batch_size) < 2:
            raise ConfigError(f"task kto estimates its KL reference point from mismatched pairs within a batch, and a batch of "
                              f"{min(per_process, cfg.train.eval_batch_size)} example has none: set train.batch_size (per "
                              "process) and train.eval_batch_size to at least 2, or use task.loss_type: apo_zero_unpaired, "
                              "which has no KL term")

    def _encoded_splits(self, cfg: RunConfig, encode: UnpairedEncoder) -> list[list[Item]]:
        """The run's training and validation items, checked: a prompt that leaves no room for
        a completion after truncation is an error naming every such record; the balance of
        the two kinds is compared with the KTO paper's advice."""
        out = encoded_splits(self, cfg, encode)
        good = sum(i["desirable"] for i in out[0])
        ratio = self.opts.desirable_weight * good / (self.opts.undesirable_weight * (len(out[0]) - good))
        if not 1.0 <= round(ratio, 2) <= 1.33:
            warnings.warn(f"task kto: desirable_weight × {good} desirable / (undesirable_weight × {len(out[0]) - good} "
                          f"undesirable) is {ratio:.2f}; the KTO paper advises 1 to 4/3, e.g. task.desirable_weight: "
                          f"{self.opts.undesirable_weight * (len(out[0]) - good) / good:.2f}", stacklevel=2)
        return out

    @torch.no_grad()
    def _reference_logps(self, model: Any, tokenizer: Any, splits: list[list[Item]], cfg: RunConfig) -> dict[tuple, dict[str, Any]]:
        """One pass of the untouched model over every example and its mismatched pair (the
        completion of the example before it in its split): the reference's log-probabilities."""
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        model.to(device).eval()
        collate = self.collator(cfg, tokenizer)
        cached: dict[tuple, dict[str, Any]] = {}
        for split in splits:
            items = [{**item, "kl_completion_ids": split[n - 1]["completion_ids"]} if self.opts.uses_kl else item
                     for n, item in enumerate(split)]
            for start in range(0, len(items), cfg.train.eval_batch_size):
                chunk = items[start : start + cfg.train.eval_batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                logps, _ = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
                kl_logps = self._kl_logps(model, batch).tolist() if self.opts.uses_kl else [None] * len(chunk)
                for item, ref, ref_kl in zip(chunk, logps.tolist(), kl_logps, strict=True):
                    value: dict[str, Any] = {"ref_logps": ref}
                    if self.opts.uses_kl:
                        value.update(kl_completion_ids=item["kl_completion_ids"], ref_kl_logps=ref_kl)
                    cached[example_key(item)] = value
        model.train()
        return cached

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        opts = cfg.task_options or KTOOptions()
        return UnpairedEncoder(processor, cfg.data, cfg.model.max_length, opts.max_prompt_length, self.cached)

    def collator(self, cfg: RunConfig, processor: Any) -> UnpairedCollator:
        opts = cfg.task_options or KTOOptions()
        return UnpairedCollator(processor.pad_token_id if processor.pad_token_id is not None else 0, cfg.model.max_length,
                                opts.uses_kl)

    def length(self, item: Item) -> int:
        return len(item["prompt_ids"]) + len(item["completion_ids"])

    def units(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())  # the examples' tokens; the mismatched rows are extra work

    # -- prediction: what the tuned model writes after each prompt -----------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        prompts = [render(processor, r.get(cfg.data.prompt_column) or "")[0] for r in records]
        return predicted_lines(model, processor, prompts, options)

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        return text_of(record.get(cfg.data.prompt_column))

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        return [{cfg.data.prompt_column: line} for line in lines]

    # -- the loss ---------------------------------------------------------------------------
    @staticmethod
    def _kl_logps(model: Any, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return completion_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])[0]

    def outputs(self, model: Any, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-example losses, rewards and log-probabilities, and the batch's KL estimate."""
        o = self.opts
        ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        if "ref_logps" in batch and (not o.uses_kl or "ref_kl_logps" in batch):
            ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_kl_logps")
        else:  # before the policy's forward, so that its activations do not wait on the reference's
            if self.reference is None:
                self.guard.check(model)
            with reference_mode(model, reference_on(self.reference, ids.device)) as ref:
                ref_logps, _ = completion_logps(ref, ids, mask, completion)
                ref_kl_logps = self._kl_logps(ref, batch) if o.uses_kl else None
        kl_logps = self._kl_logps(model, batch) if o.uses_kl else None
        logps, _ = completion_logps(model, ids, mask, completion)
        losses, rewards, kl = kto_loss(logps, ref_logps, batch["desirable"], kl_logps, ref_kl_logps, beta=o.beta,
                                       desirable_weight=o.desirable_weight, undesirable_weight=o.undesirable_weight,
                                       loss_type=o.loss_type)
        return {"losses": losses, "rewards": rewards, "logps": logps.detach(), "kl": kl.reshape(1),
                "desirable": batch["desirable"]}


    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        out = self.outputs(model, batch)
        if model.training:
            self.train_sums.add({**_sides(out), "kl": out["kl"]})
        return out["losses"].mean()

    def train_metrics(self) -> dict[str, float]:
        return _with_margin(self.train_sums.means())

    @torch.no_grad()
    def evaluate(self, model: Any, items: list[Item], collate: Callable[[Sequence[Item]], Batch],
                 batch_size: int, accelerator: Any = None) -> dict[str, float]:
        """The loss, the KL estimate (mean over batches) and TRL's per-side metrics (means over
        the examples of each side; a side with no examples is left out)."""
        keys = ["eval_loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "desirable"]

        def metrics_of(batch: Batch) -> dict[str, torch.Tensor]:
            out = self.outputs(model, batch)
            return {"eval_loss": out["losses"], "kl": out["kl"], "desirable": out["desirable"].float(), **_sides(out)}
        result = evaluate_means(self, model, items, collate, batch_size, accelerator, metrics_of, keys)
        share = result.pop("desirable")
        for side, present in (("chosen", share > 0), ("rejected", share < 1)):
            if not present:
                result.pop(f"rewards/{side}")
                result.pop(f"logps/{side}")
        return _with_margin(result)
