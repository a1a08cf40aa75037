"""The adapters a server knows, and the few it holds in memory.

Every known adapter can be served; at most ``max_resident`` are attached to the model at
once. A request for one that is not resident loads it from its folder, replacing the least
recently used adapter that no running request uses. All methods here run on the engine
thread, which owns the model.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

from peftkit.serve.errors import APIError
from peftkit.serve.metrics import Metrics

log = logging.getLogger("peftkit.serve")

BASE_ROW = "__base__"  # the name per-example adapter batches use for "no adapter"


class AdapterPool:
    """Known adapters (name → folder) and the resident ones, least recently used first."""

    def __init__(self, base: Any, known: dict[str, str], max_resident: int, metrics: Metrics) -> None:
        if max_resident < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_resident}")
        self.base = base
        self.model = base  # becomes a PeftModel when the first adapter is attached
        self.known = dict(known)
        self.max_resident = max_resident
        self.resident: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.users: collections.Counter[str] = collections.Counter()
        self.metrics = metrics
        self._update_gauges()

    def row_name(self, name: str | None) -> str:
        return BASE_ROW if name is None else name

    def _update_gauges(self) -> None:
        self.metrics.resident_adapters.set(len(self.resident))
        self.metrics.known_adapters.set(len(self.known))

    # -- requests ---------------------------------------------------------------------
    def acquire(self, name: str | None) -> bool:
        """Marks ``name`` in use, loading it first if needed; False when every resident
        adapter is in use and there is no room (the request waits)."""
        if name is None:
            return True
        if name not in self.known:
            raise APIError(404, f"the adapter {name!r} was unloaded", param="model", code="model_not_found")
        if name not in self.resident:
            if len(self.resident) >= self.max_resident and not self._evict_one():
                return False
            self._attach(name, self.known[name])
        self.resident.move_to_end(name)
        self.users[name] += 1
        return True

    def release(self, name: str | None) -> None:
        if name is None:
            return
        self.users[name] -= 1
        if self.users[name] <= 0:
            del self.users[name]
            if name not in self.known and name in self.resident:  # unloaded while in use
                self._detach(name)

    # -- commands ---------------------------------------------------------------------
    def add(self, name: str, path: str) -> None:
        """Registers a new adapter and, when there is room, loads it now (so a file that does
        not fit the base is refused here, naming the key and both shapes)."""
        if name in self.known:
            raise APIError(400, f"an adapter named {name!r} is already loaded; unload it first or pick another name",
                           param="lora_name")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise APIError(400, f"{path!r} holds no adapter_config.json; lora_path must be an adapter folder "
                                "(save_pretrained's output or a peftkit run's adapter/)", param="lora_path")
        if len(self.resident) < self.max_resident or self._evict_one():
            self._attach(name, path)
        self.known[name] = path
        self._update_gauges()

    def remove(self, name: str) -> None:
        if name not in self.known:
            raise APIError(404, f"no adapter named {name!r}; loaded: {sorted(self.known)}",
                           param="lora_name", code="model_not_found")
        del self.known[name]
        if name in self.resident and not self.users[name]:
            self._detach(name)
        self._update_gauges()

    # -- the model --------------------------------------------------------------------
    def _evict_one(self) -> bool:
        for name in self.resident:  # least recently used first
            if not self.users[name]:
                self._detach(name)
                return True
        return False

    def _attach(self, name: str, path: str) -> None:
        from peftkit import PeftModel

        try:
            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
        except (ValueError, KeyError, OSError, NotImplementedError, TypeError) as exc:
            raise APIError(400, f"cannot load adapter {name!r} from {path}: {exc}", param="lora_path") from exc
        if name in getattr(self.model, "model_adapters", {}):
            kind = type(self.model.peft_config[name]).peft_type
            self.model.delete_adapter(name)
            raise APIError(400, f"adapter {name!r} is a {kind} adapter, which acts on the whole model and cannot be "
                                "chosen per request in a mixed batch; serve it on its own server (or merge it into "
                                "the base with `peftkit merge`)", param="lora_path")
        self.model.eval()
        self.resident[name] = None
        self._update_gauges()
        log.info("adapter %s loaded from %s (%d resident)", name, path, len(self.resident))

    def _detach(self, name: str) -> None:
        self.model.delete_adapter(name)
        self.resident.pop(name, None)
        self._update_gauges()
        log.info("adapter %s unloaded from memory (%d resident)", name, len(self.resident))
