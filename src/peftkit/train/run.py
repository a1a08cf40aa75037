"""A run's parts built from its config (task, model, processor, encoder, collator), and a
finished run loaded back from its folder. Shared by the loop, ``compare`` and the CLI."""

from __future__ import annotations

import json
import os
from typing import Any

from peftkit.train.config import build_config
from peftkit.train.plugins import get_task
from peftkit.train.schema import ConfigError, RunConfig

__all__ = ["Prepared", "load_run", "prepare_run"]


class Prepared:
    """A run's task with its model, processor, encoder and collator, built from the config."""

    def __init__(self, cfg: RunConfig, labels: list[Any] | None) -> None:
        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.labels = labels
        self.model, self.processor = self.task.load(cfg, labels)
        self.encode = self.task.encoder(cfg, self.processor, labels)
        self.collate = self.task.collator(cfg, self.processor)

    def fresh_heads(self) -> list[str]:
        """The modules built fresh for the task (random weights): the task's own heads, and the
        heads its ``task_type`` trains in full (a sequence classifier's ``classifier``)."""
        from peftkit.core.targeting import name_matches
        from peftkit.integrations.transformers import task_head_names

        heads = list(self.task.head_modules(self.model, self.processor))
        names = [n for n, _ in self.model.named_modules()]
        for head in task_head_names(getattr(self.task, "task_type", None)):
            if head not in heads and any(name_matches(n, head) for n in names):
                heads.append(head)
        return heads

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
        """The encoded items of ``records``; in one call where the encoder has ``encode_many``."""
        if not records:
            return []
        many = getattr(self.encode, "encode_many", None)
        return many(records) if many is not None else [self.encode(r) for r in records]

    def evaluate(self, model: Any, items: list[dict[str, Any]], accelerator: Any = None) -> dict[str, float]:
        return self.task.evaluate(model, items, self.collate, self.cfg.train.eval_batch_size, accelerator)

    @property
    def metric(self) -> str:
        return self.cfg.train.metric or self.task.metric_for(self.labels)


def prepare_run(run_dir: str) -> Prepared:
    """A finished run's task parts (config, base model, processor, labels), without its adapter."""
    import yaml

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path) or not os.path.isdir(os.path.join(run_dir, "adapter")):
        raise ConfigError(f"{run_dir!r} is not a finished run folder (config.yaml and adapter/ expected)")
    with open(config_path, encoding="utf-8") as fh:
        cfg = build_config(yaml.safe_load(fh))
    labels = None
    labels_path = os.path.join(run_dir, "labels.json")
    if os.path.isfile(labels_path):
        with open(labels_path, encoding="utf-8") as fh:
            labels = json.load(fh)
    return Prepared(cfg, labels)


def load_run(run_dir: str) -> tuple[Prepared, Any]:
    """A finished run: its task parts (config, base model, processor, labels) and the base
    model with the trained adapter."""
    from peftkit import PeftModel

    run = prepare_run(run_dir)
    return run, PeftModel.from_pretrained(run.model, os.path.join(run_dir, "adapter"))
