"""The run configuration of ``peftkit train``: a YAML file validated into dataclasses.

Everything is checked before anything heavy starts: unknown keys name the closest valid
key, files must exist, each section is checked by its owner: ``model`` and ``data`` by the
task's section classes, ``method`` by the method's own config class (and its training
options), each extension's ``train.<key>`` section by the extension.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from peftkit.train.plugins import EXTENSIONS, TASKS, get_task, is_spec
from peftkit.train.schema import (
    ConfigError,
    DataSection,
    ModelSection,
    RunConfig,
    TrainSection,
    closest,
    coerce,
    parse_section,
)
from peftkit.train.specs import load_object

__all__ = ["ConfigError", "DataSection", "ModelSection", "RunConfig", "TrainSection", "apply_overrides", "build_config",
           "load_config", "method_config", "method_training_options", "split_method"]


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with each ``a.b=value`` override set (YAML-parsed value)."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            if part == "task" and isinstance(node.get(part), str):
                node[part] = {"name": node[part]}  # task.<option>=... on a task given by name
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def _resolve_paths(section: Any, base_dir: str) -> None:
    """Relative paths of ``path`` fields that exist next to the config file (and not in the
    working directory) made absolute."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("path") and isinstance(value, str) and value:
            file, sep, attr = value.rpartition(":")
            if sep and file.endswith(".py") and is_spec(value):  # a ``file.py:function`` spec: its file
                setattr(section, f.name, f"{_near(file, base_dir)}:{attr}")
            else:
                setattr(section, f.name, _near(value, base_dir))


def _near(path: str, base_dir: str) -> str:
    if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(base_dir, path)):
        return os.path.join(base_dir, path)
    return path


def _task_spec(raw: Any) -> tuple[str, dict[str, Any]]:
    if raw is None:
        return TASKS.default(), {}
    if isinstance(raw, str):
        return raw, {}
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return raw["name"], {k: v for k, v in raw.items() if k != "name"}
    raise ConfigError(f"task must be a name (e.g. classification) or a mapping with a name, got {raw!r}")


def build_config(raw: dict[str, Any], base_dir: str = ".") -> RunConfig:
    """A validated :class:`RunConfig` from a raw mapping (paths relative to ``base_dir``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
    valid = ["task", "model", "data", "method", "train", "output_dir", "compare"]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r}{closest(str(key), valid)}")
    task_name, task_raw = _task_spec(raw.get("task"))
    if is_spec(task_name):
        file, _, cls = task_name.rpartition(":")
        task_name = f"{_near(file, base_dir)}:{cls}" if file.endswith(".py") else task_name
    task = get_task(task_name, base_dir)
    if task.options is not None:
        task_options = parse_section(task.options, task_raw, "task")
    elif task_raw:
        raise ConfigError(f"task {task_name!r} takes no options; got {sorted(task_raw)}")
    else:
        task_options = None
    method = raw.get("method")
    if method is None:
        from peftkit.core.registry import default_method

        method = {"name": default_method().peft_type.lower()}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError("method must be a mapping with a name and its options, e.g. {name: <method>, r: 8}; `peftkit methods` lists the methods")
    if is_spec(str(method["name"])):
        file, _, attr = str(method["name"]).rpartition(":")
        if file.endswith(".py"):  # relative to the config file, recorded absolute
            method = {**method, "name": f"{_near(file, base_dir)}:{attr}"}
    train_raw = raw.get("train") or {}
    if not isinstance(train_raw, dict):
        raise ConfigError(f"train must be a mapping, got {type(train_raw).__name__}")
    own = {f.name for f in dataclasses.fields(TrainSection)}
    extensions = {}
    for key, value in train_raw.items():
        if key in own:
            continue
        if key not in EXTENSIONS.names() and not is_spec(key):
            raise ConfigError(f"unknown key train.{key}{closest(str(key), sorted(own) + EXTENSIONS.names())}")
        extension = EXTENSIONS.get(key, base_dir)
        options = parse_section(extension.options_cls, value, f"train.{key}") if extension.options_cls else value
        if extension.options_cls:
            _resolve_paths(options, base_dir)
        extensions[key] = options
    config = RunConfig(
        task=task_name,
        task_options=task_options,
        model=parse_section(task.model_options, raw.get("model"), "model"),
        data=parse_section(task.data_options, raw.get("data"), "data"),
        method=dict(method),
        train=parse_section(TrainSection, {k: v for k, v in train_raw.items() if k in own}, "train"),
        output_dir=str(raw.get("output_dir", "runs/peftkit")),
        compare=dict(raw.get("compare") or {}),
        extensions=extensions,
    )
    for section in (config.model, config.data, *([config.task_options] if dataclasses.is_dataclass(config.task_options) else [])):
        _resolve_paths(section, base_dir)
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ConfigError(f"output_dir {config.output_dir!r} is a file; name a folder (it is created if missing)")
    if os.path.isdir(os.path.join(base_dir, config.model.name)):
        config.model.name = _near(config.model.name, base_dir)  # a model folder next to the config
    file, sep, function = config.model.name.rpartition(":")
    if sep and file.endswith(".py"):
        config.model.name = f"{_near(file, base_dir)}:{function}"
    if not config.data.train:
        raise ConfigError("data.train is required: a JSONL, CSV or Parquet file, or a saved datasets folder")
    for attr in ("train", "validation"):
        path = getattr(config.data, attr)
        if path and not os.path.exists(path):
            raise ConfigError(f"data.{attr}: {path!r} does not exist")
    if not 0 <= config.data.validation_fraction < 1:
        raise ConfigError("data.validation_fraction must be in [0, 1)")
    method_config(config)  # validates the method options now
    for key, options in config.extensions.items():
        EXTENSIONS.get(key, base_dir).check(options, config, task)
    return config


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Reads ``path`` (YAML), applies ``key=value`` overrides, validates everything."""
    return build_config(*read_raw_config(path, overrides))


def read_raw_config(path: str, overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """The raw mapping of the YAML file ``path`` with ``overrides`` applied, and the folder
    its relative paths are relative to."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return apply_overrides(raw, overrides or []), os.path.dirname(os.path.abspath(path))


def resolve_method_name(name: str, base_dir: str = ".") -> str:
    """The ``peft_type`` of ``method.name``: a registered method (any spelling), or a spec
    ``my_methods.py:METHOD`` / ``package.module:METHOD`` naming a registered ``Method`` (or its
    config class); importing the file or module registers it."""
    import difflib

    from peftkit import list_methods
    from peftkit.core.registry import Method

    if is_spec(str(name)):
        found = load_object(str(name), base_dir, "method.name", "method")
        peft_type = found.peft_type if isinstance(found, Method) or isinstance(getattr(found, "peft_type", None), str) else None
        if not peft_type or peft_type not in list_methods():
            raise ConfigError(f"method.name {name!r} is neither a registered Method nor the config class of one")
        return peft_type
    known = list(list_methods())
    wanted = str(name).upper().replace("-", "_")
    if wanted in known:
        return wanted
    close = difflib.get_close_matches(wanted, known, n=3, cutoff=0.4)
    raise ConfigError(f"method.name {name!r} is not a registered method" + (f"; did you mean {close}?" if close else "") + f" Known: {known}")


def split_method(config: RunConfig) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(method entry, config-class options, training options)`` of ``config.method``."""
    from peftkit import get_method

    options = dict(config.method)
    method = get_method(resolve_method_name(options.pop("name")))
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    training = {f.name for f in dataclasses.fields(method.training_options)} if method.training_options else set()
    own, extra = {}, {}
    for key, value in options.items():
        if key in fields:
            own[key] = value
        elif key in training:
            extra[key] = value
        else:
            raise ConfigError(f"unknown option method.{key} for {method.peft_type}{closest(str(key), sorted(fields | training))}")
    return method, own, extra


def _simple(hint: Any) -> bool:
    return hint in (int, float, bool, str) or (
        get_origin(hint) in (Union, types.UnionType) and all(a in (int, float, bool, str, type(None)) for a in get_args(hint)))


def method_config(config: RunConfig) -> Any:
    """The method's config object, built and validated by the method's own class."""
    method, options, _ = split_method(config)
    cls = method.config_cls
    hints = get_type_hints(cls)
    kwargs = {k: coerce(v, hints[k], f"method.{k}") if _simple(hints.get(k)) else v for k, v in options.items()}
    task_type = get_task(config.task).task_type
    if "task_type" in {f.name for f in dataclasses.fields(cls)} and "task_type" not in kwargs and task_type is not None:
        kwargs["task_type"] = task_type
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"method ({method.peft_type}): {exc}") from exc


def method_training_options(config: RunConfig) -> Any:
    """The method's training options (its ``training_options`` dataclass), or None."""
    method, _, extra = split_method(config)
    if method.training_options is None:
        return None
    return parse_section(method.training_options, extra, "method")
