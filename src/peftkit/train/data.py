"""Reading records (JSONL, CSV, Parquet, saved ``datasets``) and turning them into batches."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.train.config import ConfigError, DataSection

__all__ = ["Collator", "TaskData", "batch_order", "prepare_task_data", "read_records"]

IGNORE_INDEX = -100


def read_records(path: str) -> list[dict[str, Any]]:
    """All records of a data file as dicts."""
    if os.path.isdir(path):
        try:
            from datasets import load_from_disk
        except ImportError as exc:
            raise ConfigError(f"{path} is a folder; reading a saved dataset needs `pip install datasets`") from exc
        data = load_from_disk(path)
        if hasattr(data, "keys") and not hasattr(data, "column_names"):
            data = data[next(iter(data.keys()))]
        return [dict(row) for row in data]
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            if ext == ".json" and fh.read(1) == "[":
                fh.seek(0)
                return list(json.load(fh))
            fh.seek(0)
            out = []
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{path}:{number} is not valid JSON: {exc}") from exc
            return out
    if ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if ext == ".tsv" else ","))
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ConfigError("reading Parquet needs `pip install pyarrow`") from exc
        return pq.read_table(path).to_pylist()
    raise ConfigError(f"{path}: unknown data format {ext!r}; use .jsonl, .csv, .tsv, .parquet or a saved datasets folder")


def _require(records: list[dict[str, Any]], column: str, path: str, setting: str) -> None:
    if records and column not in records[0]:
        raise ConfigError(f"{path} has no column {column!r} ({setting}); its columns are {sorted(records[0])}")


@dataclass
class TaskData:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    labels: list[Any] | None  # classification: label values in id order


def _split(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * fraction)))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def prepare_task_data(task: str, data: DataSection, seed: int) -> TaskData:
    """Reads and checks the train/validation records of ``task``."""
    train = read_records(data.train)
    if not train:
        raise ConfigError(f"{data.train} holds no records")
    if data.validation:
        validation = read_records(data.validation)
    elif data.validation_fraction > 0:
        train, validation = _split(train, data.validation_fraction, seed)
    else:
        validation = []
    if data.max_train_examples:
        train = train[: data.max_train_examples]
    if data.max_eval_examples:
        validation = validation[: data.max_eval_examples]
    labels = None
    for records, path in ((train, data.train), (validation, data.validation or data.train)):
        if not records:
            continue
        if task == "classification":
            _require(records, data.text_column, path, "data.text_column")
            _require(records, data.label_column, path, "data.label_column")
            if data.text_pair_column:
                _require(records, data.text_pair_column, path, "data.text_pair_column")
        elif task == "seq2seq":
            _require(records, data.text_column, path, "data.text_column")
            _require(records, data.target_column, path, "data.target_column")
        else:
            first = records[0]
            if not any(c in first for c in (data.text_column, data.prompt_column, data.messages_column)):
                raise ConfigError(
                    f"{path}: causal_lm needs a {data.text_column!r} column, {data.prompt_column!r}/"
                    f"{data.response_column!r} columns, or a {data.messages_column!r} column; found {sorted(first)}"
                )
    if task == "classification":
        values = {r[data.label_column] for r in train} | {r[data.label_column] for r in validation}
        ints = all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values)
        labels = sorted({int(v) for v in values}) if ints else sorted(str(v) for v in values)
        if ints:
            labels = list(range(max(labels) + 1)) if min(labels) >= 0 else labels
    return TaskData(train, validation, labels)


class Encoder:
    """Turns records into token ids (and labels) for one task."""

    def __init__(self, task: str, tokenizer: Any, data: DataSection, max_length: int, labels: list[Any] | None) -> None:
        self.task, self.tok, self.data, self.max_length = task, tokenizer, data, max_length
        self.label_ids = {(str(v) if not isinstance(v, int) else v): i for i, v in enumerate(labels or [])}

    def label_id(self, value: Any) -> int:
        key = value if isinstance(value, int) else (int(value) if isinstance(value, str) and value.lstrip("-").isdigit() and isinstance(next(iter(self.label_ids), 0), int) else str(value))
        if key not in self.label_ids:
            raise ConfigError(f"label {value!r} was not seen in the training data; known labels: {list(self.label_ids)}")
        return self.label_ids[key]

    def encode(self, record: dict[str, Any]) -> dict[str, list[int]]:
        d = self.data
        if self.task == "classification":
            pair = record.get(d.text_pair_column) if d.text_pair_column else None
            enc = self.tok(str(record[d.text_column]), str(pair) if pair is not None else None, truncation=True, max_length=self.max_length)
            item = {"input_ids": enc["input_ids"]}
            if "token_type_ids" in enc:
                item["token_type_ids"] = enc["token_type_ids"]
            item["labels"] = self.label_id(record[d.label_column])
            return item
        if self.task == "seq2seq":
            src = self.tok(str(record[d.text_column]), truncation=True, max_length=self.max_length)["input_ids"]
            tgt = self.tok(text_target=str(record[d.target_column]), truncation=True, max_length=self.max_length)["input_ids"]
            return {"input_ids": src, "labels": tgt}
        return self._encode_causal(record)

    def _encode_causal(self, record: dict[str, Any]) -> dict[str, list[int]]:
        d = self.data
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        if d.messages_column in record:
            messages = record[d.messages_column]
            if not messages or messages[-1].get("role") != "assistant":
                raise ConfigError("chat records must end with an assistant message (the part the loss covers)")
            prompt_text, response_text = self._chat_split(messages)
        elif d.prompt_column in record:
            prompt_text, response_text = str(record[d.prompt_column]), str(record.get(d.response_column, ""))
        else:
            ids = self.tok(str(record[d.text_column]), add_special_tokens=False)["input_ids"] + eos
            ids = ids[: self.max_length]
            return {"input_ids": ids, "labels": list(ids)}
        prompt = self.tok(prompt_text, add_special_tokens=False)["input_ids"]
        response = self.tok(response_text, add_special_tokens=False)["input_ids"] + eos
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
    """Pads a list of encoded items to the longest one (dynamic padding)."""

    def __init__(self, pad_id: int, task: str) -> None:
        self.pad_id, self.task = pad_id, task

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(i["input_ids"]) for i in items)
        batch: dict[str, torch.Tensor] = {}
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
            if self.task == "classification":
                batch["labels"] = torch.tensor([i["labels"] for i in items], dtype=torch.long)
            else:
                width = max(len(i["labels"]) for i in items)
                labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
                for row, item in enumerate(items):
                    labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
                batch["labels"] = labels
        return batch


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Batches of example indices for one epoch, repeatable from ``(seed, epoch)``.

    With ``group_by_length`` examples are shuffled, cut into windows of 50 batches, sorted by
    length inside each window (less padding), and the batches shuffled again.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 50
        order = [i for start in range(0, len(order), window) for i in sorted(order[start : start + window], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def iterate(items: list[dict[str, Any]], batches: list[list[int]], collate: Collator, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    for indices in batches[skip:]:
        yield collate([items[i] for i in indices])
