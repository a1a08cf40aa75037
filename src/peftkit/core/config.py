"""Configuration base class shared by every method.

A method's config is a dataclass deriving from :class:`PeftConfig`. Field names follow
Hugging Face PEFT so that ``adapter_config.json`` files move between the two libraries.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

__all__ = ["PeftConfig", "PeftType", "TargetedConfig", "TaskType"]

TargetSpec = Union[list[str], str, None]


class TaskType(str, enum.Enum):
    """Task types, spelled as in Hugging Face PEFT's ``task_type`` field."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Method identifiers as written in ``adapter_config.json`` (``peft_type``)."""

    LORA = "LORA"
    IA3 = "IA3"
    LN_TUNING = "LN_TUNING"
    BITFIT = "BITFIT"
    LAYERWISE = "LAYERWISE"
    FULL = "FULL"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"


CONFIG_NAME = "adapter_config.json"

# Keys other writers (Hugging Face PEFT) put in every config with a default value that
# carries no meaning for peftkit. They are dropped silently; any other unknown key warns.
_SILENT_FOREIGN_KEYS = frozenset(
    {
        "peft_version",
        "auto_mapping",
        "megatron_core",
        "qalora_group_size",
        "runtime_config",
        "loftq_config",
    }
)


def _is_trivial(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@functools.cache
def _init_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self"}


@functools.cache
def _takes_any_keyword(cls: type) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def _unknown_fields_message(cls: type, unknown: list[str]) -> str:
    fields = sorted(_init_parameters(cls))
    parts, guessed_all = [], True
    for key in unknown:
        close = difflib.get_close_matches(key, fields, n=1)
        parts.append(f"{key!r}; did you mean {close[0]!r}?" if close else repr(key))
        guessed_all = guessed_all and bool(close)
    message = f"{cls.__name__} got an unexpected keyword argument " + ", and ".join(parts)
    return message if guessed_all else f"{message} (the fields are {fields})"


@dataclass
class PeftConfig:
    """Fields common to every method.

    Args:
        task_type: what the wrapped model does (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...). For
            classification tasks the new head is trained in full and saved with the adapter.
        base_model_name_or_path: recorded in the file so users know what it adapts.
        inference_mode: when True the adapter's parameters are frozen.
        revision: the base model's hub revision, as recorded by PEFT.
    """

    peft_type: ClassVar[str] = ""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    revision: str | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> PeftConfig:
        # The dataclass __init__ of each subclass would only say "unexpected keyword
        # argument"; checked here, once for every method, the error names the closest field.
        unknown = [k for k in kwargs if k not in _init_parameters(cls)]
        if unknown and not _takes_any_keyword(cls):
            raise TypeError(_unknown_fields_message(cls, unknown))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise ValueError(
                f"task_type {self.task_type!r} is not known; use one of {sorted(TaskType.__members__)}"
            )

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``adapter_config.json``."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Builds the config of the method named by ``data["peft_type"]``.

        Keys this version does not know are ignored with a warning (a newer writer may add
        fields); keys that other writers always include with default values are ignored
        silently.
        """
        from peftkit.core.registry import get_method

        data = dict(data)
        peft_type = data.pop("peft_type", None) or cls.peft_type
        config_cls = get_method(peft_type).config_cls if cls is PeftConfig or not cls.peft_type else cls
        if cls.peft_type and peft_type != cls.peft_type:
            raise ValueError(f"config has peft_type {peft_type!r}, expected {cls.peft_type!r}")
        names = {f.name for f in dataclasses.fields(config_cls)}
        unknown = {k: v for k, v in data.items() if k not in names}
        loud = sorted(k for k, v in unknown.items() if k not in _SILENT_FOREIGN_KEYS and not _is_trivial(v))
        if loud:
            warnings.warn(
                f"{config_cls.__name__}: ignoring keys this version of peftkit does not know: {loud}",
                stacklevel=2,
            )
        return config_cls(**{k: v for k, v in data.items() if k in names})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``adapter_config.json`` into ``directory`` (atomically)."""
        from peftkit.core.io import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), text + "\n")

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that learn virtual tokens (PEFT's flag; the Trainer reads it)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike) -> dict[str, Any]:
        """The dict stored in a config JSON file (as PEFT's ``from_json_file``)."""
        return _read_json_object(os.fspath(path_json_file))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> PeftConfig:
        """Reads ``adapter_config.json`` from an adapter folder (or a hub id), as the
        config class of the method it names.

        Args:
            subfolder: the adapter's subfolder.
            kwargs: config fields that override the file's (as in PEFT); hub-download
                options (``revision``, ``token``, ``cache_dir``...) are accepted.
        """
        from peftkit.core.io import resolve_adapter_dir

        hub_options = {"revision", "token", "cache_dir", "force_download", "local_files_only", "repo_type", "use_auth_token"}
        overrides = {k: v for k, v in kwargs.items() if k not in hub_options}
        if subfolder is not None or not os.path.isdir(directory):
            directory = resolve_adapter_dir(directory, subfolder)
        config = cls._from_folder(directory)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(_unknown_fields_message(type(config), [key]))
            setattr(config, key, value)
        if overrides:
            config.__post_init__()
        return config

    @classmethod
    def _from_folder(cls, directory: str | os.PathLike) -> PeftConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {os.fspath(directory)!r}: is this an adapter folder written by "
                "save_pretrained()?"
            )
        data = _read_json_object(path)
        if not cls.peft_type and not data.get("peft_type"):
            raise ValueError(f"{path} has no peft_type; it names the method, e.g. \"peft_type\": \"LORA\"")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, NotImplementedError) as exc:
            if type(exc) in (TypeError, ValueError, NotImplementedError):  # a field's check: say which file
                raise type(exc)(f"{path}: {exc}") from exc
            raise


def _read_json_object(path: str) -> dict[str, Any]:
    """The JSON object stored in ``path``; a ValueError naming the file says what else it holds."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors) is harmless
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc}); write it as UTF-8 JSON") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the file may be truncated") from exc
    if not isinstance(data, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise ValueError(f"{path} holds a JSON {kind}; an adapter config is a JSON object ({{...}})")
    return data


def check_unimplemented_fields(config: Any, fields: dict[str, tuple[Any, str]]) -> None:
    """Fields another library (Hugging Face PEFT) has and peftkit accepts only at their
    default: ``fields`` maps a name to ``(default, what it asks for)``; a config that sets
    one gets a NotImplementedError naming it. ``None`` and ``{}`` count as the same default."""
    for name, (default, what) in fields.items():
        value = getattr(config, name)
        if value != default and not (default in (None, {}) and value in (None, {})):
            raise NotImplementedError(
                f"{type(config).__name__}.{name}={value!r} asks for {what}, a PEFT feature peftkit does not implement; "
                f"leave {name} at its default ({default!r})"
            )


def list_field(default: list[str] | None = None) -> Any:
    """A dataclass field defaulting to a fresh list (or None)."""
    return field(default_factory=lambda: None if default is None else list(default))


def dict_field() -> Any:
    return field(default_factory=dict)


@dataclass
class TargetedConfig(PeftConfig):
    """Fields of methods that adapt chosen modules.

    Args:
        target_modules: names (exact or dot-suffix), a regex (full match), or ``"all-linear"``.
        exclude_modules: modules never adapted (same forms).
        layers_to_transform: restrict to these block indices.
        layers_pattern: the attribute holding the blocks (``"layers"``, ``"h"``); guessed when None.
        modules_to_save: modules trained in full and saved with the adapter.
    """

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: Union[list[int], int, None] = None
    layers_pattern: Union[list[str], str, None] = None
    modules_to_save: Union[list[str], None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        normalise_target_fields(self)
        if self.layers_to_transform is not None and self.layers_pattern is not None and not self.layers_pattern:
            raise ValueError("layers_pattern is empty; name the attribute holding the blocks, e.g. 'layers'")


def normalise_target_fields(config: Any) -> None:
    """Checks ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` of a config and
    turns sets and tuples into sorted lists (and a lone ``modules_to_save`` name into a list)."""
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        value = getattr(config, name)
        if isinstance(value, (set, tuple, list)):
            wrong = [v for v in value if not isinstance(v, str)]
            if wrong:
                raise TypeError(f"{name} must hold module names (strings); {wrong[0]!r} is a {type(wrong[0]).__name__}")
        if isinstance(value, (set, tuple)):
            setattr(config, name, sorted(value))
        elif value is not None and not isinstance(value, (str, list)):
            raise TypeError(f"{name} must be a list of names or a regex string, got {type(value).__name__}")
    if isinstance(config.modules_to_save, str):
        config.modules_to_save = [config.modules_to_save]
