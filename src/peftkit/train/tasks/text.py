"""Text tasks: sequence classification, causal language modelling (plain text,
prompt/response pairs, chat messages) and sequence-to-sequence, on transformers models."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.train.schema import ConfigError, DataSection, ModelSection, RunConfig
from peftkit.train.tasks.base import Batch, ClassData, Item, LabelIds, Task, class_labels, logits_of, require_column

__all__ = ["CausalLMData", "CausalLMEncoder", "CausalLMTask", "ClassificationData", "ClassificationEncoder", "Collator",
           "Seq2SeqData", "Seq2SeqEncoder", "Seq2SeqTask", "TextClassificationTask", "TextModel"]

IGNORE_INDEX = -100


@dataclass
class TextModel(ModelSection):
    """``max_length``: inputs are cut to this many tokens."""

    max_length: int = 128

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ConfigError(f"model.max_length must be at least 1, got {self.max_length}")


@dataclass
class ClassificationData(ClassData):
    text_column: str = "text"
    text_pair_column: str | None = None


@dataclass
class CausalLMData(DataSection):
    """Records hold plain text (``text_column``), a prompt and a response (the loss covers the
    response only), or chat messages ending with the assistant's (the loss covers that one)."""

    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"


@dataclass
class Seq2SeqData(DataSection):
    text_column: str = "text"
    target_column: str = "target"


class ClassificationEncoder:
    """A record's text (and text pair) as token ids, and its class id when it has a label."""

    def __init__(self, tokenizer: Any, data: ClassificationData, max_length: int, labels: list[Any] | None) -> None:
        self.tok, self.data, self.max_length = tokenizer, data, max_length
        self.label_id = LabelIds(labels)

    def __call__(self, record: dict[str, Any]) -> Item:
        d = self.data
        pair = record.get(d.text_pair_column) if d.text_pair_column else None
        enc = self.tok(str(record[d.text_column]), str(pair) if pair is not None else None, truncation=True, max_length=self.max_length)
        item = {"input_ids": enc["input_ids"]}
        if "token_type_ids" in enc:
            item["token_type_ids"] = enc["token_type_ids"]
        if d.label_column in record:
            item["labels"] = self.label_id(record[d.label_column])
        return item

    def encode_many(self, records: Sequence[dict[str, Any]], chunk: int = 256) -> list[Item]:
        """The items of ``records``, equal to ``[self(r) for r in records]``, from one tokenizer
        call per ``chunk`` records (a fast tokenizer's batch call: 8,000 short texts in 1.9 s
        instead of 2.5 s). Chunks, not one call: the tokenizer's output for all records at once
        (offsets, attention masks, Rust encodings) held ~100 MiB that raised the run's peak."""
        if len(records) > chunk:
            return [item for start in range(0, len(records), chunk) for item in self.encode_many(records[start : start + chunk], chunk)]
        d = self.data
        pairs = [r.get(d.text_pair_column) for r in records] if d.text_pair_column else None
        if pairs is not None and any(p is None for p in pairs):
            return [self(r) for r in records]
        enc = self.tok([str(r[d.text_column]) for r in records], [str(p) for p in pairs] if pairs is not None else None,
                       truncation=True, max_length=self.max_length)
        types = enc.get("token_type_ids")
        items: list[Item] = []
        for n, record in enumerate(records):
            item: Item = {"input_ids": enc["input_ids"][n]}
            if types is not None:
                item["token_type_ids"] = types[n]
            if d.label_column in record:
                item["labels"] = self.label_id(record[d.label_column])
            items.append(item)
        return items


class Seq2SeqEncoder:
    """Source and target texts as token ids."""

    def __init__(self, tokenizer: Any, data: Seq2SeqData, max_length: int) -> None:
        self.tok, self.data, self.max_length = tokenizer, data, max_length

    def __call__(self, record: dict[str, Any]) -> Item:
        d = self.data
        src = self.tok(str(record[d.text_column]), truncation=True, max_length=self.max_length)["input_ids"]
        tgt = self.tok(text_target=str(record[d.target_column]), truncation=True, max_length=self.max_length)["input_ids"]
        return {"input_ids": src, "labels": tgt}


class CausalLMEncoder:
    """Token ids and labels for causal language modelling; prompt tokens get no loss."""

    def __init__(self, tokenizer: Any, data: CausalLMData, max_length: int) -> None:
        self.tok, self.data, self.max_length = tokenizer, data, max_length

    def __call__(self, record: dict[str, Any]) -> Item:
        return self.encode(record)

    def encode(self, record: dict[str, Any]) -> Item:
        d = self.data
        if d.messages_column in record:
            messages = record[d.messages_column]
            if not messages or messages[-1].get("role") != "assistant":
                raise ConfigError("chat records must end with an assistant message (the part the loss covers)")
            prompt_text, response_text = self._chat_split(messages)
        elif d.prompt_column in record:
            prompt_text, response_text = str(record[d.prompt_column]), str(record.get(d.response_column, ""))
        else:
            return self._plain(self.tok(str(record[d.text_column]), add_special_tokens=False)["input_ids"])
        prompt = self.tok(prompt_text, add_special_tokens=False)["input_ids"]
        return self._pair(prompt, self.tok(response_text, add_special_tokens=False)["input_ids"])

    def encode_many(self, records: Sequence[dict[str, Any]], chunk: int = 256) -> list[Item]:
        """The items of ``records``, equal to ``[self(r) for r in records]``: the texts of plain
        and prompt/response records tokenised in one call per ``chunk`` records (a fast
        tokenizer's batch call: 8,000 short texts in 1.4 s against 1.85 s one by one), chat
        records one by one (their template is applied per record)."""
        if len(records) > chunk:
            return [item for start in range(0, len(records), chunk) for item in self.encode_many(records[start : start + chunk], chunk)]
        d = self.data
        items: list[Item | None] = [None] * len(records)
        plain = [n for n, r in enumerate(records) if d.messages_column not in r and d.prompt_column not in r]
        pairs = [n for n, r in enumerate(records) if d.messages_column not in r and d.prompt_column in r]
        if plain:
            texts = self.tok([str(records[n][d.text_column]) for n in plain], add_special_tokens=False)["input_ids"]
            for n, ids in zip(plain, texts, strict=True):
                items[n] = self._plain(ids)
        if pairs:
            prompts = self.tok([str(records[n][d.prompt_column]) for n in pairs], add_special_tokens=False)["input_ids"]
            responses = self.tok([str(records[n].get(d.response_column, "")) for n in pairs], add_special_tokens=False)["input_ids"]
            for n, prompt, response in zip(pairs, prompts, responses, strict=True):
                items[n] = self._pair(prompt, response)
        return [item if item is not None else self.encode(records[n]) for n, item in enumerate(items)]

    def _eos(self) -> list[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _plain(self, ids: list[int]) -> Item:
        """Plain text: every token is predicted (the end-of-text token too)."""
        ids = (ids + self._eos())[: self.max_length]
        return {"input_ids": ids, "labels": list(ids)}

    def _pair(self, prompt: list[int], response: list[int]) -> Item:
        """A prompt and its response: the loss covers the response (and end-of-text) only."""
        response = response + self._eos()
        ids = (prompt + response)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[: self.max_length]
        return {"input_ids": ids, "labels": labels}

    def _chat_split(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        template = getattr(self.tok, "chat_template", None)
        if template:
            prompt = self.tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            return prompt, messages[-1]["content"]
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
        return prompt, messages[-1]["content"]


class Collator:
    """Pads a list of encoded items to the longest one (dynamic padding). Labels are one
    class id per item (``class_labels``) or one token id per position."""

    def __init__(self, pad_id: int, class_labels: bool) -> None:
        self.pad_id, self.class_labels = pad_id, class_labels

    def __call__(self, items: Sequence[Item]) -> Batch:
        longest = max(len(i["input_ids"]) for i in items)
        batch: Batch = {}
        ids = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            mask[row, :n] = 1
        batch["input_ids"], batch["attention_mask"] = ids, mask
        if "token_type_ids" in items[0]:
            types = torch.zeros_like(ids)
            for row, item in enumerate(items):
                types[row, : len(item["token_type_ids"])] = torch.tensor(item["token_type_ids"])
            batch["token_type_ids"] = types
        if "labels" in items[0]:
            if self.class_labels:
                batch["labels"] = torch.tensor([i["labels"] for i in items], dtype=torch.long)
            else:
                width = max(len(i["labels"]) for i in items)
                labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
                for row, item in enumerate(items):
                    labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
                batch["labels"] = labels
        return batch


class _TextTask(Task):
    unit = "tokens"
    model_options = TextModel
    #: the transformers auto class the task's model loads with
    auto_class = "AutoModel"
    #: whether labels are one class id per example (else one token id per position)
    class_labels = False

    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        from peftkit.train.modeling import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg, self.auto_class, **self.model_kwargs(labels))
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and cfg.model.max_length > positions:
            raise ConfigError(f"model.max_length={cfg.model.max_length} is more than the {positions} positions "
                              f"{cfg.model.name!r} has; use at most {positions}")
        return model, tokenizer

    def model_kwargs(self, labels: list[Any] | None) -> dict[str, Any]:
        """Keyword arguments of the auto class's ``from_pretrained`` for this run."""
        return {}

    def collator(self, cfg: RunConfig, processor: Any) -> Collator:
        return Collator(processor.pad_token_id if processor.pad_token_id is not None else 0, self.class_labels)

    def length(self, item: Item) -> int:
        return len(item["input_ids"])

    def units(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        return str(record.get(cfg.data.text_column, ""))

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        return [{cfg.data.text_column: line} for line in lines]

    def _texts(self, records: list[dict[str, Any]], cfg: RunConfig) -> list[str]:
        return [self.describe(r, cfg) for r in records]


class TextClassificationTask(_TextTask):
    name = "classification"
    default = True
    task_type = "SEQ_CLS"
    default_metric = "accuracy"
    data_options = ClassificationData
    auto_class = "AutoModelForSequenceClassification"
    class_labels = True

    def model_kwargs(self, labels: list[Any] | None) -> dict[str, Any]:
        labels = labels or []
        return {"num_labels": len(labels), "id2label": dict(enumerate(map(str, labels))),
                "label2id": {str(v): i for i, v in enumerate(labels)}}

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> ClassificationEncoder:
        return ClassificationEncoder(processor, cfg.data, cfg.model.max_length, labels)

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        require_column(records, data.text_column, path, "data.text_column")
        require_column(records, data.label_column, path, "data.label_column")
        if data.text_pair_column:
            require_column(records, data.text_pair_column, path, "data.text_pair_column")

    def labels(self, train: list[dict[str, Any]], validation: list[dict[str, Any]], data: DataSection) -> list[Any]:
        return class_labels(train, validation, data)

    def eval_batch(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        out = model(**batch)
        n = len(batch["labels"])
        return out.loss.detach().double() * n, n, logits_of(out).argmax(-1), batch["labels"]

    def class_probabilities(self, model: Any, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return torch.softmax(logits_of(model(**inputs)).float(), dim=-1)

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        texts = self._texts(records, cfg)
        for start in range(0, len(texts), 32):
            chunk = texts[start : start + 32]
            enc = processor(chunk, padding=True, truncation=True, max_length=cfg.model.max_length, return_tensors="pt")
            with torch.no_grad():
                pred = logits_of(model(**enc)).argmax(-1).tolist()
            for text, p in zip(chunk, pred, strict=True):
                yield f"{labels[p] if labels else p}\t{text}"


class _GenerativeTask(_TextTask):
    #: whether the model's output repeats the prompt before the generated tokens, and its
    #: loss predicts each label from the position before it (decoder-only models)
    decoder_only = False

    def extra_metrics(self, result: dict[str, float]) -> dict[str, float]:
        return {"perplexity": math.exp(min(result["eval_loss"], 50.0))}

    def eval_batch(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        out = model(**batch)
        # the loss is a mean over the predicted tokens: weight each batch by their number
        shift = len(batch["labels"]) if self.decoder_only else 0
        tokens = max(int((batch["labels"] != IGNORE_INDEX).sum()) - shift, 1)
        return out.loss.detach().double() * tokens, tokens, None, None

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        texts = self._texts(records, cfg)
        processor.padding_side = "left"
        for start in range(0, len(texts), 32):
            chunk = texts[start : start + 32]
            enc = processor(chunk, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=options.get("max_new_tokens", 32), do_sample=False)
            if self.decoder_only:
                out = out[:, enc["input_ids"].shape[1] :]
            for text, ids in zip(chunk, out, strict=True):
                yield f"{text}\t{processor.decode(ids, skip_special_tokens=True)}"


class CausalLMTask(_GenerativeTask):
    name = "causal_lm"
    task_type = "CAUSAL_LM"
    data_options = CausalLMData
    auto_class = "AutoModelForCausalLM"
    decoder_only = True

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> CausalLMEncoder:
        return CausalLMEncoder(processor, cfg.data, cfg.model.max_length)

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        if records and not any(c in records[0] for c in (data.text_column, data.prompt_column, data.messages_column)):
            raise ConfigError(
                f"{path}: causal_lm needs a {data.text_column!r} column, {data.prompt_column!r}/"
                f"{data.response_column!r} columns, or a {data.messages_column!r} column; found {sorted(records[0])}"
            )

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        return str(record.get(cfg.data.text_column, record.get(cfg.data.prompt_column, "")))

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        return [{cfg.data.prompt_column: line} for line in lines]


class Seq2SeqTask(_GenerativeTask):
    name = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"
    data_options = Seq2SeqData
    auto_class = "AutoModelForSeq2SeqLM"

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Seq2SeqEncoder:
        return Seq2SeqEncoder(processor, cfg.data, cfg.model.max_length)

    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        require_column(records, data.text_column, path, "data.text_column")
        require_column(records, data.target_column, path, "data.target_column")
