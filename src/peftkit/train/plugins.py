"""Finding the plug-ins of ``peftkit train``: tasks and training extensions.

A task or an extension is named in a run config in one of three ways:

- the name of a built-in (a module of ``peftkit.train.tasks`` / ``peftkit.train.extensions``
  that defines it),
- the name under which an installed package registers it in the entry-point group
  ``peftkit.tasks`` / ``peftkit.train_extensions``,
- a spec ``package.module:Class`` or ``path/to/file.py:Class`` (relative to the config file).

This module names no task and no extension: built-ins are found by looking into their
packages, the way methods register themselves with the core.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import threading
from typing import Any, Generic, TypeVar

from peftkit.train.extension import TrainExtension
from peftkit.train.schema import ConfigError
from peftkit.train.specs import is_spec, load_object
from peftkit.train.tasks.base import Task

__all__ = ["EXTENSIONS", "TASKS", "get_task", "is_spec", "list_tasks", "load_object", "register_task"]

T = TypeVar("T")


class _Registry(Generic[T]):
    """Named plug-ins of one kind (instances of ``base``): built-ins found in ``package``,
    installed ones in the entry-point ``group``, and specs loaded on demand."""

    def __init__(self, kind: str, base: type, package: str, group: str) -> None:
        self.kind, self.base, self.package, self.group = kind, base, package, group
        self.items: dict[str, T] = {}
        self._loaded = False
        # Loading happens once, on first use; a lock keeps a second thread (a server validating
        # two jobs at once) from seeing a half-filled registry.
        self._lock = threading.RLock()
        self._loading = False

    def register(self, item: Any, name: str | None = None) -> T:
        obj = item() if isinstance(item, type) else item
        if not isinstance(obj, self.base):
            raise ConfigError(f"{self.kind} {name or item!r} is a {type(obj).__name__}, not a {self.base.__name__} subclass")
        key = name or obj.name
        if not key:
            raise ConfigError(f"a {self.kind} needs a name")
        if not obj.name:
            obj.name = key
        self.items[key] = obj
        return obj

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # done, or this thread is loading (a module asked again)
                return
            self._loading = True
            try:
                self._load_all()
            finally:
                self._loading = False
            self._loaded = True

    def _load_all(self) -> None:
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_") or info.name == "base":
                continue
            module = importlib.import_module(f"{self.package}.{info.name}")
            for value in vars(module).values():
                if (isinstance(value, type) and issubclass(value, self.base) and value.__module__ == module.__name__
                        and value.name and value.name not in self.items):
                    self.register(value)
        from importlib.metadata import entry_points

        for entry in entry_points(group=self.group):
            if entry.name not in self.items:
                self.register(entry.load(), entry.name)

    def default(self) -> str:
        """The name of the one plug-in marked ``default = True`` (what a config without a
        name gets)."""
        self._load()
        marked = [name for name, item in self.items.items() if getattr(item, "default", False)]
        if len(marked) != 1:
            raise ConfigError(f"name the {self.kind} in the config; one of {self.names()}")
        return marked[0]

    def names(self) -> list[str]:
        self._load()
        return sorted(self.items)

    def get(self, name: str, base_dir: str = ".") -> T:
        self._load()
        if name in self.items:
            return self.items[name]
        if is_spec(name):
            return self.register(load_object(name, base_dir, self.kind), name)
        close = difflib.get_close_matches(str(name), list(self.items), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{self.kind} must be one of {self.names()} or a 'module:Class' / 'file.py:Class' spec, "
                          f"got {name!r}{hint}")


TASKS: _Registry[Task] = _Registry("task", Task, "peftkit.train.tasks", "peftkit.tasks")
EXTENSIONS: _Registry[TrainExtension] = _Registry("training extension", TrainExtension, "peftkit.train.extensions",
                                                  "peftkit.train_extensions")


def get_task(name: str, base_dir: str = ".") -> Task:
    """The task ``name`` names (a built-in, an installed plug-in, or a spec)."""
    return TASKS.get(name, base_dir)


def list_tasks() -> list[str]:
    return TASKS.names()


def register_task(task: Task | type[Task], name: str | None = None) -> Task:
    """Makes ``task`` known under ``name`` (default: its ``name`` attribute)."""
    return TASKS.register(task, name)
