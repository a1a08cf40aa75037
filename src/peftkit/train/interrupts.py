"""How a run stops: Ctrl-C and SIGTERM become a checkpoint, never a half-done step or file."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupts", "handle_interrupts"]


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers and ``docker stop`` send) stop the run
    with a checkpoint, as ``KeyboardInterrupt``; inside :meth:`deferred` (an optimiser step
    with its bookkeeping, a checkpoint, the best adapter's save) the stop waits until the
    block ends, so no half-done step or file is ever saved."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending:
            self.pending = False
            raise KeyboardInterrupt


@contextmanager
def handle_interrupts() -> Iterator[Interrupts]:
    """Installs :class:`Interrupts`' handler for SIGINT and SIGTERM while training (only the
    main thread can; elsewhere Ctrl-C stays Python's own)."""
    interrupts = Interrupts()
    try:
        previous = {sig: signal.signal(sig, interrupts.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield interrupts
        return
    try:
        yield interrupts
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
