"""The jobs database: tables (SQLAlchemy 2), the engine for a URL, and migrations.

SQLite (one file in the state folder) is the default; PostgreSQL by URL for several workers
on several machines. The schema is owned by the Alembic migrations packaged in
``peftkit/jobs/migrations``; :func:`open_database` runs ``upgrade head`` on every start, under
a lock, so a server and its workers may start together.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "Checkpoint", "Event", "File", "Job", "default_url", "open_database", "sqlalchemy_url"]


class Base(DeclarativeBase):
    pass


class File(Base):
    """An uploaded file: its bytes live at ``path`` (relative to the state folder)."""

    __tablename__ = "peftkit_files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(200), index=True, default="")
    filename: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1000))


class Job(Base):
    """A fine-tuning job. ``claim`` and ``lease_until`` belong to the worker running it: every
    write a worker makes is conditioned on its claim, so a worker that lost its lease can no
    longer change the job."""

    __tablename__ = "peftkit_jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(200), index=True, default="")
    model: Mapped[str] = mapped_column(String(500))
    model_path: Mapped[str] = mapped_column(String(1000))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    method: Mapped[dict] = mapped_column(JSON)
    peftkit: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[int] = mapped_column(Integer)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    adapter_dir: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    claim: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class Event(Base):
    """A job event: a status change, a message, or training/eval metrics (``data``)."""

    __tablename__ = "peftkit_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("peftkit_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Checkpoint(Base):
    """A checkpoint a job's run wrote, with the metrics at its step."""

    __tablename__ = "peftkit_checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("peftkit_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String(1000))


def default_url(state_dir: str) -> str:
    """The SQLite database of a state folder."""
    return "sqlite:///" + os.path.join(os.path.abspath(state_dir), "jobs.sqlite")


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` → ``postgresql+psycopg://`` (psycopg 3); other URLs unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers never block the writer (a server reading while a worker writes);
    # busy_timeout: a writer waits for another process's write instead of failing.
    dbapi_connection.isolation_level = None  # transactions begin in _sqlite_begin, not in the driver
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Every transaction takes the write lock at its start: a transaction that read first and
    # wrote later could fail at once (SQLITE_BUSY) when another process wrote in between.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def open_database(url: str) -> Engine:
    """An engine for ``url`` with the schema migrated to the newest revision.

    Raises:
        ValueError: for a URL that is neither SQLite nor PostgreSQL, or a database that
            cannot be reached (the message names the URL without its password).
    """
    url = sqlalchemy_url(url)
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    elif url.startswith("postgresql"):
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=20)
    else:
        raise ValueError(f"--db {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")
    try:
        with _migration_lock(engine, url):
            _upgrade(engine)
    except Exception as exc:
        engine.dispose()
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"the jobs database {engine.url.render_as_string(hide_password=True)} could not be opened: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return engine


@contextlib.contextmanager
def _migration_lock(engine: Engine, url: str) -> Iterator[None]:
    """One migrating process at a time: a PostgreSQL advisory lock, or a file lock next to the
    SQLite file (its processes share one machine)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7391001)"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7391001)"))
                conn.commit()
        return
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(os.path.abspath(path) + ".migrate-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", os.path.join(os.path.dirname(__file__), "migrations"))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def now() -> int:
    return int(time.time())
