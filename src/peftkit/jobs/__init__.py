"""Fine-tuning jobs: records, queue and workers on SQLAlchemy (SQLite or PostgreSQL).

A user of ``peftkit.train`` (jobs train through it), used by ``peftkit.serve`` (which
exposes the jobs API) and ``peftkit worker``; nothing in the library imports it. Needs the
``jobs`` extra. See docs/jobs.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["JobService", "JobStore", "Worker"]


def __getattr__(name: str) -> Any:
    # lazy: ``python -m peftkit.jobs.child`` (a job's training process) imports this package
    # first, and needs none of the database or server modules
    if name == "JobService":
        from peftkit.jobs.service import JobService

        return JobService
    if name == "JobStore":
        from peftkit.jobs.store import JobStore

        return JobStore
    if name == "Worker":
        from peftkit.jobs.worker import Worker

        return Worker
    raise AttributeError(f"module 'peftkit.jobs' has no attribute {name!r}")
