"""What a ``peftkit train`` task is: how its records are checked and encoded, how its model
is loaded, how a batch is made, what the loss is, and how it is evaluated.

The training loop, ``peftkit eval``/``predict`` and ``peftkit compare`` only talk to this
interface; each task (text, images, audio, ...) lives in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from peftkit.train.schema import ConfigError, DataSection, ModelSection, RunConfig, path_field

__all__ = [
    "CheckpointModel",
    "ClassData",
    "Task",
    "add_class_labels",
    "class_encoder",
    "class_labels",
    "classification_metrics",
    "infer_labels",
    "logits_of",
    "require_column",
    "to_device",
]


@dataclass
class CheckpointModel(ModelSection):
    """A model section for tasks that can load weights into the model after it is built.

    Args:
        checkpoint: safetensors or a torch state dict; tensors whose shape differs (a new
            classification head) keep their fresh values.
        checkpoint_exclude: modules (names or dotted suffixes) whose checkpoint weights are
            not loaded: a head re-initialised for the new task even when its shape matches.
    """

    checkpoint: str | None = path_field(None)
    checkpoint_exclude: list[str] | None = None

Item = dict[str, Any]
Batch = dict[str, torch.Tensor]


def require_column(records: list[dict[str, Any]], column: str, path: str, setting: str) -> None:
    if records and column not in records[0]:
        raise ConfigError(f"{path} has no column {column!r} ({setting}); its columns are {sorted(records[0])}")


def infer_labels(values: set[Any]) -> list[Any]:
    """Label values in id order: integers 0..max when all are non-negative integers, else
    the sorted values as strings."""
    ints = all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in values)
    if ints:
        labels = sorted({int(v) for v in values})
        return list(range(max(labels) + 1)) if labels and min(labels) >= 0 else labels
    return sorted(str(v) for v in values)


@dataclass
class ClassData(DataSection):
    """A data section of records with a class label.

    Args:
        label_column: the column holding each record's class.
        labels: the classes, in id order. Without it they are the training records' own,
            and a label seen only in validation is an error (name every class here to keep it).
    """

    label_column: str = "label"
    labels: list[Any] | None = None


def _missing_label(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def class_labels(train: list[dict[str, Any]], validation: list[dict[str, Any]], data: Any,
                 infer: Callable[[set[Any]], list[Any]] | None = None) -> list[Any]:
    """The classes of a run, checked: every record has a label, and every validation label is
    a training label (or all are in ``data.labels``, when given). ``infer`` orders the
    training labels (default :func:`infer_labels`)."""
    column = data.label_column
    for records, path in ((train, data.train), (validation, data.validation or data.train)):
        missing = [n for n, r in enumerate(records, 1) if _missing_label(r.get(column))]
        if missing:
            raise ConfigError(f"{path}: {len(missing)} record(s) have no label in {column!r} (data.label_column), e.g. "
                              f"record {', '.join(map(str, missing[:5]))}; label or remove them")
    if data.labels is not None:
        known = {str(v) for v in data.labels}
        unknown = sorted({str(r[column]) for r in train + validation} - known)
        if unknown:
            raise ConfigError(f"labels {unknown} of the data are not in data.labels {list(data.labels)}")
        return list(data.labels)
    labels = (infer or infer_labels)({r[column] for r in train})
    ids = LabelIds(labels)
    unseen = sorted({str(r[column]) for r in validation if not ids.knows(r[column])})
    if unseen:
        raise ConfigError(f"{data.validation or data.train}: validation labels {unseen} never occur in the training data "
                          f"(whose labels are {labels}); a model cannot learn them. Name every class in data.labels "
                          "to keep them, or drop those records")
    return labels


class LabelIds:
    """Record label value -> class id, with a clear error for an unseen value."""

    def __init__(self, labels: list[Any] | None) -> None:
        self.ids = {(str(v) if not isinstance(v, int) else v): i for i, v in enumerate(labels or [])}
        self.ints = bool(self.ids) and isinstance(next(iter(self.ids)), int)

    def _key(self, value: Any) -> Any:
        if isinstance(value, int):
            return value
        return int(value) if self.ints and isinstance(value, str) and value.lstrip("-").isdigit() else str(value)

    def knows(self, value: Any) -> bool:
        return self._key(value) in self.ids

    def __call__(self, value: Any) -> int:
        key = self._key(value)
        if key not in self.ids:
            raise ConfigError(f"label {value!r} was not seen in the training data; known labels: {list(self.ids)}")
        return self.ids[key]


def class_encoder(key: str, read: Callable[[dict[str, Any]], Any], label_column: str,
                  labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
    """An encoder for one input per example and a class label: ``{key: read(record)}``, plus
    the record's class id under ``"labels"`` where the record has one."""
    label_id = LabelIds(labels)

    def encode(record: dict[str, Any]) -> Item:
        item: Item = {key: read(record)}
        if label_column in record:
            item["labels"] = label_id(record[label_column])
        return item

    return encode


def add_class_labels(batch: Batch, items: Sequence[Item]) -> Batch:
    """``batch`` with the items' class ids under ``"labels"``, where the items have them."""
    if "labels" in items[0]:
        batch["labels"] = torch.tensor([i["labels"] for i in items], dtype=torch.long)
    return batch


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes that occur in ``pred`` or ``gold``."""
    accuracy = float((pred == gold).float().mean()) if len(gold) else 0.0
    f1s = []
    for c in torch.unique(torch.cat([pred, gold])):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    return {"accuracy": accuracy, "f1": sum(f1s) / max(1, len(f1s))}


def to_device(batch: Batch, device: Any) -> Batch:
    """The batch's tensors moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a transformers output object, a tuple, or a plain tensor (a plain PyTorch
    module's forward)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


class Task:
    """One kind of training run. Subclasses fill in the data, model and loss parts, and
    declare the fields their ``model`` and ``data`` sections take (subclasses of
    :class:`ModelSection` and :class:`DataSection`) and, optionally, options of their own
    (``task: {name: ..., option: value}``)."""

    name = ""
    model_options: ClassVar[type[ModelSection]] = ModelSection
    data_options: ClassVar[type[DataSection]] = DataSection
    #: a dataclass of the task's own options, or None
    options: ClassVar[type | None] = None
    #: the task of a run config that names none (one task only)
    default: ClassVar[bool] = False
    #: the adapter config's ``task_type`` (what Hugging Face PEFT calls it), or None
    task_type: str | None = None
    #: the validation metric that picks the best checkpoint unless ``train.metric`` is set
    default_metric = "eval_loss"
    #: what the throughput figure counts
    unit = "examples"
    #: keys of :meth:`train_metrics` that the progress line shows beside the loss
    progress_metrics: ClassVar[tuple[str, ...]] = ()

    # -- data ---------------------------------------------------------------------------
    def check_records(self, records: list[dict[str, Any]], path: str, data: DataSection) -> None:
        """Raises ConfigError when ``records`` lack what this task reads."""

    def labels(self, train: list[dict[str, Any]], validation: list[dict[str, Any]], data: DataSection) -> list[Any] | None:
        """Class labels in id order, for tasks that have them."""
        return None

    def read(self, path: str, data: DataSection) -> list[dict[str, Any]]:
        """All records of ``path`` (a task may know more layouts, e.g. an image folder)."""
        from peftkit.train.data import read_records

        return read_records(path, getattr(data, "encoding", "utf-8"))

    # -- model --------------------------------------------------------------------------
    def load(self, cfg: RunConfig, labels: list[Any] | None) -> tuple[Any, Any]:
        """The base model and its processor (tokenizer, image processor, ...)."""
        raise NotImplementedError

    def head_modules(self, model: Any, processor: Any) -> list[str]:
        """Modules of ``model`` built fresh for the run (a head for its labels): the run trains
        them in full and saves them with the adapter (added to the method's ``modules_to_save``)."""
        return []

    def encoder(self, cfg: RunConfig, processor: Any, labels: list[Any] | None) -> Callable[[dict[str, Any]], Item]:
        """A function from one record to one encoded item."""
        raise NotImplementedError

    def collator(self, cfg: RunConfig, processor: Any) -> Callable[[Sequence[Item]], Batch]:
        raise NotImplementedError

    def length(self, item: Item) -> int:
        """The size used to group similar items into batches (1: no grouping)."""
        return 1

    def units(self, batch: Batch) -> int:
        """What the throughput counts in ``batch`` (examples unless a task says otherwise). The
        training loop calls it after the batch's loss, with the batch as collated (before it
        moved to the device, so that counting does not wait for the device)."""
        first = next(iter(batch.values()))
        return int(first.shape[0])

    # -- training and evaluation ----------------------------------------------------------
    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    def train_metrics(self) -> dict[str, float]:
        """The task's own training metrics since the last call (e.g. means over the
        micro-batches its :meth:`loss` saw), added to the training rows of ``metrics.jsonl``;
        none by default."""
        return {}

    def eval_batch(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
        """``(summed loss, count, predictions, gold)`` of one batch; predictions may be None."""
        loss = self.loss(model, batch)
        n = self.units(batch)
        return loss.detach().double() * n, n, None, None

    @torch.no_grad()
    def evaluate(self, model: Any, items: list[Item], collate: Callable[[Sequence[Item]], Batch],
                 batch_size: int, accelerator: Any = None) -> dict[str, float]:
        """Metrics of ``model`` on encoded ``items`` (each process takes a shard; results gathered)."""
        was_training = model.training
        model.eval()
        world = accelerator.num_processes if accelerator else 1
        rank = accelerator.process_index if accelerator else 0
        device = accelerator.device if accelerator else _device_of(model)
        shard = items[rank::world]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        preds, golds = [], []
        for batch in self.batches(shard, collate, batch_size, device):
            total, n, pred, gold = self.eval_batch(model, batch)
            loss_sum += total
            count += n
            if pred is not None and gold is not None:
                preds.append(pred)
                golds.append(gold)
        if accelerator is not None and world > 1:
            loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
        result = {"eval_loss": float(loss_sum / count.clamp(min=1))}
        if preds or self.default_metric == "accuracy":
            pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
            gold = torch.cat(golds) if golds else torch.zeros(0, dtype=torch.long, device=device)
            if accelerator is not None and world > 1:
                pred, gold = accelerator.gather_for_metrics(pred), accelerator.gather_for_metrics(gold)
            result.update(classification_metrics(pred.cpu(), gold.cpu()))
        result.update(self.extra_metrics(result))
        model.train(was_training)
        return result

    def metric_for(self, labels: list[Any] | None) -> str:
        """The validation metric that picks the best checkpoint of a run with these labels
        (unless ``train.metric`` is set)."""
        return self.default_metric

    def extra_metrics(self, result: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the evaluation loss (e.g. perplexity)."""
        return {}

    @staticmethod
    def batches(items: list[Item], collate: Callable[[Sequence[Item]], Batch], size: int, device: Any) -> Iterator[Batch]:
        for start in range(0, len(items), size):
            yield to_device(collate(items[start : start + size]), device)

    # -- files ------------------------------------------------------------------------------
    def after_save(self, model: Any, directory: str, cfg: RunConfig) -> None:
        """Called (on the main process) each time the run's adapter is written to
        ``directory`` by ``model.save_pretrained``; a task may add files there, e.g. the
        adapter in another tool's format. Does nothing by default."""

    # -- prediction -------------------------------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]], cfg: RunConfig,
                labels: list[Any] | None, options: dict[str, Any]) -> Iterator[str]:
        """One output line per record (``peftkit predict``)."""
        raise ConfigError(f"peftkit predict does not support task {self.name!r}")

    def describe(self, record: dict[str, Any], cfg: RunConfig) -> str:
        """A short text naming a record in prediction output."""
        return ""

    def read_inputs(self, lines: list[str], cfg: RunConfig) -> list[dict[str, Any]]:
        """Records from lines of standard input (``peftkit predict`` without ``--input``)."""
        raise ConfigError(f"task {self.name!r} reads no records from standard input; give --input FILE")

    # -- class labels (for extensions such as self-training) ----------------------------------
    def class_probabilities(self, model: Any, batch: Batch) -> torch.Tensor:
        """``(batch, classes)`` probabilities of each class, for tasks with class labels."""
        raise ConfigError(f"task {self.name!r} does not predict class probabilities")

    def with_label(self, record: dict[str, Any], label: Any, data: DataSection) -> dict[str, Any]:
        """``record`` labelled ``label`` (a value of :meth:`labels`)."""
        column = getattr(data, "label_column", None)
        if column is None:
            raise ConfigError(f"task {self.name!r} has no label column")
        return {**record, column: label}


def _device_of(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
