"""A reward model: a sequence-classification head with one output, trained on preference
pairs with the Bradley–Terry loss ``−log σ(r(x, y_w) − r(x, y_l))``; its metric is the share
of validation pairs it orders correctly (``accuracy``). Its run folder can score GRPO's
samples (``task: {name: grpo, reward: <run folder>}``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from peftkit.alignment.losses import pairwise_reward_loss
from peftkit.train.schema import DataSection, RunConfig
from peftkit.train.tasks.base import Batch, Item, Task, logits_of
from peftkit.train.tasks.preference import MetricSums, PairData, check_pairs, evaluate_means, pair_of, render
from peftkit.train.tasks.text import TextModel

__all__ = ["RewardEncoder", "RewardTask"]


class RewardEncoder:
    """Prompt plus completion, tokenized together and cut to ``max_length``, for each side."""

    def __init__(self, tokenizer: Any, data: PairData, max_length: int) -> None:
        self.tok, self.data, self.max_length = tokenizer, data, max_length

    def __call__(self, record: dict[str, Any]) -> Item:
        prompt, chosen, rejected = pair_of(record, self.data)
        item: Item = {}
        for key, completion in (("chosen", chosen), ("rejected", rejected)):
            head, text = render(self.tok, prompt, completion)
            item[f"{key}_ids"] = self.tok(head + text, truncation=True, max_length=self.max_length)["input_ids"]
        return item


class RewardCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Item]) -> Batch:
        rows = [i["chosen_ids"] for i in items] + [i["rejected_ids"] for i in items]
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for n, row in enumerate(rows):
            ids[n, : len(row)] = torch.tensor(row)
            mask[n, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class RewardTask(Task):
    """A reward model trained on preference pairs with the Bradley–Terry loss."""

    name = "reward"
    task_type = "SEQ_CLS"
    unit = "tokens"
    model_options = TextModel
    data_options = PairData
    default_metric = "accuracy"

    def __init__(self) -> None:
        self.train_sums = MetricSums()

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        check_pairs(records, path, data, self.name)

    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        from peftkit.train.modeling import load_model_and_tokenizer

        self.train_sums = MetricSums()
        return load_model_and_tokenizer(cfg, "AutoModelForSequenceClassification", num_labels=1)

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        return RewardEncoder(processor, cfg.data, cfg.model.max_length)

    def collator(self, cfg: RunConfig, processor: Any) -> RewardCollator:
        return RewardCollator(processor.pad_token_id if processor.pad_token_id is not None else 0)

    def length(self, item: Item) -> int:
        return max(len(item["chosen_ids"]), len(item["rejected_ids"]))

    def units(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def scores(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` scores of the batch's pairs."""
        scores = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])).squeeze(-1).float()
        chosen, rejected = scores.chunk(2)
        return chosen, rejected

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        chosen, rejected = self.scores(model, batch)
        if model.training:
            self.train_sums.add({"accuracy": (chosen > rejected).float(), "margin": chosen - rejected})
        return pairwise_reward_loss(chosen, rejected).mean()

    def train_metrics(self) -> dict[str, float]:
        return self.train_sums.means()

    @torch.no_grad()
    def evaluate(self, model: Any, items: list[Item], collate: Callable[[Sequence[Item]], Batch],
                 batch_size: int, accelerator: Any = None) -> dict[str, float]:
        """The loss, the share of pairs ordered correctly and the mean margin."""
        def metrics_of(batch: Batch) -> dict[str, torch.Tensor]:
            chosen, rejected = self.scores(model, batch)
            return {"eval_loss": pairwise_reward_loss(chosen, rejected), "accuracy": (chosen > rejected).float(),
                    "margin": chosen - rejected}
        return evaluate_means(self, model, items, collate, batch_size, accelerator, metrics_of,
                              ["eval_loss", "accuracy", "margin"])
