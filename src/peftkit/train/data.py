"""Reading records (JSONL, CSV, Parquet, saved ``datasets``) and turning them into batches."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.train.schema import ConfigError, DataSection

__all__ = ["TaskData", "batch_order", "data_folder", "is_saved_dataset", "load_saved_dataset", "prepare_task_data", "read_class_folders", "read_records"]

_SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in _SAVED_DATASET_FILES)


def data_folder(path: str) -> str:
    """The folder that relative paths inside a data file (or data folder) are relative to."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def read_class_folders(path: str, extensions: tuple[str, ...], file_column: str, label_column: str) -> list[dict[str, Any]]:
    """Records ``{file_column: file path, label_column: sub-folder name}`` of a folder with
    one sub-folder per class (files with one of ``extensions``); empty when ``path`` is not
    such a folder (or is a saved ``datasets`` folder). Classes are interleaved (the first
    file of each class, then the second, ...) so that the first n records
    (``data.max_train_examples``) hold every class."""
    if not os.path.isdir(path) or is_saved_dataset(path):
        return []
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    files = {label: [f for f in sorted(os.listdir(os.path.join(path, label))) if f.lower().endswith(extensions)]
             for label in classes}
    return [{file_column: os.path.join(path, label, names[i]), label_column: label}
            for i in range(max((len(v) for v in files.values()), default=0))
            for label, names in files.items() if i < len(names)]


def load_saved_dataset(path: str) -> Any:
    """A saved ``datasets`` dataset (the first split of a saved ``DatasetDict``)."""
    try:
        from datasets import load_from_disk
    except ImportError as exc:
        raise ConfigError(f"{path} is a folder; reading a saved dataset needs `pip install datasets`") from exc
    data = load_from_disk(path)
    if hasattr(data, "keys") and not hasattr(data, "column_names"):
        data = data[next(iter(data.keys()))]
    return data


def _undecodable(path: str, encoding: str, exc: UnicodeDecodeError) -> ConfigError:
    """The line of ``path`` that ``encoding`` cannot decode, as a config error."""
    bad = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                bad = number
                break
    where = f"{path}:{bad}" if bad else path
    return ConfigError(f"{where} is not valid {encoding} ({exc.reason} at byte {exc.start} of the line); convert the file, "
                       "or set data.encoding to its encoding (e.g. latin-1, cp1252, utf-16)")


def read_records(path: str, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """All records of a data file as dicts (text files decoded with ``encoding``)."""
    try:
        return _read_records(path, encoding)
    except UnicodeDecodeError as exc:
        raise _undecodable(path, encoding, exc) from exc


def _read_records(path: str, encoding: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        raise ConfigError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        return [dict(row) for row in load_saved_dataset(path)]
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        with open(path, encoding=encoding) as fh:
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
        with open(path, encoding=encoding, newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if ext == ".tsv" else ","))
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ConfigError("reading Parquet needs `pip install pyarrow`") from exc
        return pq.read_table(path).to_pylist()
    raise ConfigError(f"{path}: unknown data format {ext!r}; use .jsonl, .csv, .tsv, .parquet or a saved datasets folder")


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


def prepare_task_data(task: Any, data: DataSection, seed: int) -> TaskData:
    """Reads and checks the train/validation records of ``task`` (a ``Task``)."""
    train = task.read(data.train, data)
    if not train:
        raise ConfigError(f"{data.train} holds no records")
    if data.validation:
        validation = task.read(data.validation, data)
    elif data.validation_fraction > 0:
        train, validation = _split(train, data.validation_fraction, seed)
    else:
        validation = []
    if data.max_train_examples:
        train = train[: data.max_train_examples]
    if data.max_eval_examples:
        validation = validation[: data.max_eval_examples]
    for records, path in ((train, data.train), (validation, data.validation or data.train)):
        task.check_records(records, path, data)
    return TaskData(train, validation, task.labels(train, validation, data))


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


