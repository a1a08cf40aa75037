"""The tasks ``peftkit train`` knows, by name. A new task is a :class:`Task` subclass
registered with :func:`register_task`."""

from __future__ import annotations

import difflib
from typing import Any

from peftkit.train.config import ConfigError, RunConfig
from peftkit.train.tasks.audio import AudioClassificationTask
from peftkit.train.tasks.base import Task
from peftkit.train.tasks.clip import ClipTask
from peftkit.train.tasks.diffusion import TextToImageTask
from peftkit.train.tasks.image import ImageClassificationTask
from peftkit.train.tasks.text import CausalLMTask, Seq2SeqTask, TextClassificationTask

__all__ = ["Prepared", "Task", "get_task", "list_tasks", "register_task"]

_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if not task.name:
        raise ValueError("a task needs a name")
    _TASKS[task.name] = task
    return task


def list_tasks() -> list[str]:
    return list(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        close = difflib.get_close_matches(str(name), list(_TASKS), n=2, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"task must be one of {list(_TASKS)}, got {name!r}{hint}")
    return _TASKS[name]


for _task in (TextClassificationTask(), CausalLMTask(), Seq2SeqTask(), ImageClassificationTask(), ClipTask(),
              AudioClassificationTask(), TextToImageTask()):
    register_task(_task)


class Prepared:
    """A run's task with its model, processor, encoder and collator, built from the config."""

    def __init__(self, cfg: RunConfig, labels: list[Any] | None) -> None:
        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.labels = labels
        self.model, self.processor = self.task.load(cfg, labels)
        self.encode = self.task.encoder(cfg, self.processor, labels)
        self.collate = self.task.collator(cfg, self.processor)

    def with_heads(self, peft_config: Any) -> Any:
        """``peft_config`` with the task's fresh head modules added to its ``modules_to_save``."""
        heads = self.task.head_modules(self.model, self.processor)
        targets = getattr(peft_config, "target_modules", None)
        named = [targets] if isinstance(targets, str) else list(targets or [])
        heads = [h for h in heads if h not in named]  # a method told to train the head in place does so
        if heads and hasattr(peft_config, "modules_to_save"):
            wanted = list(peft_config.modules_to_save or [])
            peft_config.modules_to_save = wanted + [h for h in heads if h not in wanted]
        return peft_config

    def encode_all(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.encode(r) for r in records]

    def evaluate(self, model: Any, items: list[dict[str, Any]], accelerator: Any = None) -> dict[str, float]:
        return self.task.evaluate(model, items, self.collate, self.cfg.train.eval_batch_size, accelerator)

    @property
    def metric(self) -> str:
        return self.cfg.train.metric or self.task.metric_for(self.labels)
