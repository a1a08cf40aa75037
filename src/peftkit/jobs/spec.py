"""A job request's hyperparameters, method and ``peftkit`` options, checked, and the
``peftkit train`` config they map to.

- ``method.type = "supervised"`` (the default): task ``causal_lm`` on the chat messages (the
  base's chat template renders them; the loss covers the last assistant message) or on
  prompt/completion pairs (the loss covers the completion).
- ``method.type = "dpo"``: task ``preference`` on OpenAI's preference format, with ``beta``.
- ``hyperparameters``: ``n_epochs`` → ``train.epochs``, ``batch_size`` → ``train.batch_size``,
  ``learning_rate_multiplier`` × :data:`BASE_LR` → ``train.lr``; each ``"auto"`` or a number
  (:func:`resolve_hyperparameters` says what ``"auto"`` becomes).
- ``peftkit`` (the extension field): ``method`` (a ``peftkit train`` method section; default
  LoRA, rank chosen from the base's width), ``max_length``, ``processes`` (N training processes
  through ``torchrun``) and ``train`` (a few more ``train.*`` settings, :data:`TRAIN_KEYS`).

The job's run keeps ``peftkit train``'s checkpoint (for resuming; every epoch, or
``train.checkpoint_every`` steps, and every ``checkpoint_minutes``) and saves an adapter per
epoch that the job lists as its checkpoints (``peftkit.jobs.checkpoints``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["BASE_LR", "TRAIN_KEYS", "SpecError", "check_request", "default_method", "resolve_hyperparameters", "run_config"]

BASE_LR = 5e-4  # peftkit train's default learning rate: learning_rate_multiplier 1
TRAIN_KEYS = ("max_steps", "grad_accum", "weight_decay", "schedule", "warmup_ratio", "max_grad_norm", "checkpoint_every",
              "checkpoint_minutes", "eval_every", "log_every", "threads", "group_by_length")
METHOD_TYPES = ("supervised", "dpo")


class SpecError(ValueError):
    """A job request that cannot run; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _auto_or_number(value: Any, name: str, kind: type, low: float, high: float) -> Any:
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise SpecError(f"hyperparameters.{name} must be \"auto\" or a{'n integer' if kind is int else ' number'}, got {value!r}",
                        f"hyperparameters.{name}")
    if not low <= value <= high:
        raise SpecError(f"hyperparameters.{name} must be between {low:g} and {high:g}, got {value!r}", f"hyperparameters.{name}")
    return kind(value)


def check_request(hyperparameters: Any, method: Any, peftkit: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(hyperparameters, method, peftkit)`` of a job request, checked and normalised; raises
    :class:`SpecError` naming the field. ``method.<type>.hyperparameters`` (OpenAI's newer
    shape) override the top-level ones."""
    method = dict(method or {"type": "supervised"})
    kind = method.get("type", "supervised")
    if kind not in METHOD_TYPES:
        raise SpecError(f"method.type must be one of {list(METHOD_TYPES)}, got {kind!r}", "method.type")
    inner = method.get(kind) or {}
    if not isinstance(inner, dict):
        raise SpecError(f"method.{kind} must be an object", f"method.{kind}")
    hp = dict(hyperparameters or {})
    if not isinstance(hyperparameters or {}, dict) or not isinstance(inner.get("hyperparameters") or {}, dict):
        raise SpecError("hyperparameters must be an object", "hyperparameters")
    hp.update(inner.get("hyperparameters") or {})
    known = {"n_epochs", "batch_size", "learning_rate_multiplier"} | ({"beta"} if kind == "dpo" else set())
    for key in hp:
        if key not in known:
            raise SpecError(f"unknown hyperparameter {key!r} for method {kind}; known: {sorted(known)}", f"hyperparameters.{key}")
    out = {"n_epochs": _auto_or_number(hp.get("n_epochs"), "n_epochs", int, 1, 50),
           "batch_size": _auto_or_number(hp.get("batch_size"), "batch_size", int, 1, 256),
           "learning_rate_multiplier": _auto_or_number(hp.get("learning_rate_multiplier"), "learning_rate_multiplier", float,
                                                       1e-6, 1000)}
    if kind == "dpo":
        out["beta"] = _auto_or_number(hp.get("beta"), "beta", float, 1e-6, 100)
    extension = dict(peftkit or {})
    allowed = ("method", "max_length", "processes", "train")
    for key in extension:
        if key not in allowed:
            raise SpecError(f"unknown peftkit option {key!r}; known: {list(allowed)}", f"peftkit.{key}")
    if "method" in extension and not (isinstance(extension["method"], dict) and isinstance(extension["method"].get("name"), str)):
        raise SpecError("peftkit.method must be a peftkit train method section, e.g. {\"name\": \"lora\", \"r\": 8}",
                        "peftkit.method")
    for key, low in (("max_length", 1), ("processes", 1)):
        value = extension.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise SpecError(f"peftkit.{key} must be a positive integer, got {value!r}", f"peftkit.{key}")
    train = extension.get("train") or {}
    if not isinstance(train, dict):
        raise SpecError("peftkit.train must be an object", "peftkit.train")
    for key in train:
        if key not in TRAIN_KEYS:
            raise SpecError(f"peftkit.train.{key} is not a setting a job may change; allowed: {list(TRAIN_KEYS)}",
                            f"peftkit.train.{key}")
    return out, {"type": kind}, extension


def resolve_hyperparameters(hp: dict[str, Any], examples: int) -> dict[str, Any]:
    """``"auto"`` made concrete for a file of ``examples`` examples: ``batch_size`` = examples / 8
    within [1, 16]; ``n_epochs`` = enough for 100 examples seen, within [3, 10];
    ``learning_rate_multiplier`` = 1; DPO's ``beta`` = 0.1."""
    out = dict(hp)
    if out["batch_size"] == "auto":
        out["batch_size"] = max(1, min(16, examples // 8))
    if out["n_epochs"] == "auto":
        out["n_epochs"] = max(3, min(10, math.ceil(100 / max(1, examples))))
    if out["learning_rate_multiplier"] == "auto":
        out["learning_rate_multiplier"] = 1.0
    if out.get("beta") == "auto":
        out["beta"] = 0.1
    return out


def _base_config(model_path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def default_method(model_path: str) -> dict[str, Any]:
    """LoRA on the method's default targets for the base, rank 8 (16 on bases 2048 wide or
    more), alpha twice the rank."""
    width = _base_config(model_path).get("hidden_size") or _base_config(model_path).get("n_embd") or 0
    r = 16 if width >= 2048 else 8
    return {"name": "lora", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0}


def run_config(*, model_path: str, data_format: str, train_path: str, validation_path: str | None, examples: int,
               hyperparameters: dict[str, Any], method: dict[str, Any], extension: dict[str, Any], seed: int,
               output_dir: str) -> tuple[dict[str, Any], int]:
    """The raw ``peftkit train`` config of a job (resolved hyperparameters) and its step count."""
    hp = hyperparameters
    positions = _base_config(model_path).get("max_position_embeddings") or _base_config(model_path).get("n_positions")
    max_length = extension.get("max_length") or min(1024, positions or 1024)
    data: dict[str, Any] = {"train": train_path}
    if validation_path:
        data["validation"] = validation_path
    if method["type"] == "dpo":
        task: Any = {"name": "preference", "beta": hp["beta"]}
    else:
        task = "causal_lm"
        if data_format == "prompt_completion":
            data.update(prompt_column="prompt", response_column="completion")
    batch = hp["batch_size"]
    extra = dict(extension.get("train") or {})
    steps_per_epoch = max(1, math.ceil(examples / batch) // int(extra.get("grad_accum", 1)))
    steps = int(extra.get("max_steps") or max(1, round(steps_per_epoch * hp["n_epochs"])))
    from peftkit.jobs.checkpoints import SPEC

    listed = {"every": steps_per_epoch, "folder": os.path.join(os.path.dirname(output_dir), "checkpoints")}
    train = {"epochs": hp["n_epochs"], "batch_size": batch, "lr": BASE_LR * hp["learning_rate_multiplier"], "seed": seed,
             "log_every": max(1, steps // 200), "checkpoint_every": steps_per_epoch, **extra, SPEC: listed}
    raw = {"task": task, "model": {"name": model_path, "max_length": max_length}, "data": data,
           "method": dict(extension.get("method") or default_method(model_path)), "train": train, "output_dir": output_dir}
    return raw, steps
