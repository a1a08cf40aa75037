"""Fine-tuning jobs: records, queue and workers on SQLAlchemy (SQLite or PostgreSQL).

A user of ``peftkit.train`` (jobs train through it), used by ``peftkit.serve`` (which
exposes the jobs API) and ``peftkit worker``; nothing in the library imports it. Needs the
``jobs`` extra. See docs/jobs.md.
"""

from peftkit.jobs.service import JobService
from peftkit.jobs.store import JobStore
from peftkit.jobs.worker import Worker

__all__ = ["JobService", "JobStore", "Worker"]
