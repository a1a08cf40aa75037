"""Objects named in a run config by a spec: ``package.module:name`` or ``path/to/file.py:name``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from peftkit.train.schema import ConfigError

__all__ = ["is_spec", "load_object"]


def is_spec(name: str) -> bool:
    """``module:Class`` or ``file.py:Class`` (not a Windows drive path like ``C:x``)."""
    head, sep, tail = str(name).rpartition(":")
    return bool(sep) and len(head) > 1 and tail.isidentifier()


def load_object(spec: str, base_dir: str = ".", setting: str = "task", what: str = "class") -> Any:
    """The object ``spec`` names: ``path/to/file.py:name`` or ``package.module:name``."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = target if os.path.isabs(target) or os.path.exists(target) else os.path.join(base_dir, target)
        if not os.path.isfile(path):
            raise ConfigError(f"{setting} {spec!r}: file {target!r} does not exist")
        path = os.path.abspath(path)
        module_name = "peftkit_user_" + os.path.splitext(os.path.basename(path))[0]
        module = sys.modules.get(module_name)
        if module is None or getattr(module, "__file__", None) != path:  # each file is run once per process
            spec_obj = importlib.util.spec_from_file_location(module_name, path)
            if spec_obj is None or spec_obj.loader is None:
                raise ConfigError(f"{setting} {spec!r}: {path!r} cannot be imported")
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[module_name] = module
            try:
                spec_obj.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"{setting} {spec!r}: cannot import {target!r} ({exc})") from exc
    if not hasattr(module, attr):
        raise ConfigError(f"{setting} {spec!r}: {target!r} has no {what} {attr!r}")
    return getattr(module, attr)
