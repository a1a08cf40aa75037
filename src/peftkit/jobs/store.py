"""Files, jobs, events and checkpoints in the jobs database, and the queue workers take jobs
from.

A worker takes a job with :meth:`JobStore.claim`, atomically: on PostgreSQL ``SELECT ... FOR
UPDATE SKIP LOCKED`` (concurrent claimers skip each other's rows instead of waiting), on SQLite
one conditional ``UPDATE ... WHERE status = 'queued'`` (SQLite runs writes one at a time, so
the row can only be won once). A claim is a random token plus a lease; the worker renews the
lease (:meth:`JobStore.heartbeat`) and every write it makes names its token, so once its lease
has expired and another worker has taken the job over, the first worker's writes change
nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from peftkit.jobs.db import Checkpoint, Event, File, Job, now

__all__ = ["ACTIVE", "FINAL", "Claim", "Conflict", "JobStore", "NotFound", "new_id"]

FINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "paused")


class NotFound(LookupError):
    """No such file or job for this owner."""


class Conflict(ValueError):
    """The request does not fit the job's status (e.g. pausing a finished job)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Claim:
    """A worker's hold on a job: the job's id and fields as claimed, and the token."""

    def __init__(self, job: Job, token: str) -> None:
        self.job, self.token = job, token

    @property
    def job_id(self) -> str:
        return self.job.id


class JobStore:
    """The database side of the jobs service; the state folder holds the bytes."""

    def __init__(self, engine: Engine, state_dir: str) -> None:
        self.engine = engine
        self.state_dir = os.path.abspath(state_dir)
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        os.makedirs(os.path.join(self.state_dir, "files"), exist_ok=True)
        os.makedirs(os.path.join(self.state_dir, "jobs"), exist_ok=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s, s.begin():
            yield s

    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.state_dir, "jobs", job_id)

    # -- files -----------------------------------------------------------------------------
    def add_file(self, owner: str, filename: str, purpose: str, chunks: Iterator[bytes]) -> File:
        """Stores an upload (written to a temporary name, then renamed) and records it."""
        file_id = new_id("file")
        rel = os.path.join("files", file_id + ".jsonl")
        path = os.path.join(self.state_dir, rel)
        tmp = path + ".part"
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    size += len(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        record = File(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=size, created_at=now(), path=rel)
        try:
            with self.session() as s:
                s.add(record)
        except BaseException:
            os.unlink(path)
            raise
        return record

    def get_file(self, owner: str, file_id: str) -> File:
        with self.session() as s:
            found = s.scalar(select(File).where(File.id == file_id, File.owner == owner))
        if found is None:
            raise NotFound(f"no file {file_id!r}")
        return found

    def file_path(self, record: File) -> str:
        return os.path.join(self.state_dir, record.path)

    def list_files(self, owner: str, purpose: str | None = None, after: str | None = None, limit: int = 10000) -> list[File]:
        with self.session() as s:
            query = select(File).where(File.owner == owner)
            if purpose:
                query = query.where(File.purpose == purpose)
            if after:
                cursor = s.scalar(select(File.seq).where(File.id == after, File.owner == owner))
                if cursor is None:
                    raise NotFound(f"no file {after!r} (after)")
                query = query.where(File.seq < cursor)
            return list(s.scalars(query.order_by(File.seq.desc()).limit(limit)))

    def delete_file(self, owner: str, file_id: str) -> None:
        with self.session() as s:
            found = s.scalar(select(File).where(File.id == file_id, File.owner == owner))
            if found is None:
                raise NotFound(f"no file {file_id!r}")
            path = self.file_path(found)
            s.delete(found)
        if os.path.exists(path):
            os.unlink(path)

    # -- jobs ------------------------------------------------------------------------------
    def create_job(self, owner: str, **fields: Any) -> Job:
        job = Job(id=new_id("ftjob"), owner=owner, status="validating_files", created_at=now(), cancel_requested=False,
                  pause_requested=False, attempts=0, **fields)
        with self.session() as s:
            s.add(job)
            s.flush()
            self._event(s, job.id, f"Validating training file: {job.training_file}"
                        + (f" and validation file: {job.validation_file}" if job.validation_file else ""), kind="status")
        return job

    def get_job(self, owner: str | None, job_id: str) -> Job:
        with self.session() as s:
            query = select(Job).where(Job.id == job_id)
            if owner is not None:
                query = query.where(Job.owner == owner)
            found = s.scalar(query)
        if found is None:
            raise NotFound(f"no fine-tuning job {job_id!r}")
        return found

    def list_jobs(self, owner: str, after: str | None = None, limit: int = 20, metadata: dict[str, str] | None = None) -> list[Job]:
        with self.session() as s:
            query = select(Job).where(Job.owner == owner)
            if after:
                cursor = s.scalar(select(Job.seq).where(Job.id == after, Job.owner == owner))
                if cursor is None:
                    raise NotFound(f"no fine-tuning job {after!r} (after)")
                query = query.where(Job.seq < cursor)
            jobs = list(s.scalars(query.order_by(Job.seq.desc()).limit(limit if not metadata else None)))
        if metadata:
            jobs = [j for j in jobs if all((j.meta or {}).get(k) == v for k, v in metadata.items())][:limit]
        return jobs

    def jobs_with_status(self, status: str) -> list[Job]:
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.status == status).order_by(Job.seq)))

    def recent_model_paths(self, count: int = 5) -> list[str]:
        with self.session() as s:
            paths = s.scalars(select(Job.model_path).order_by(Job.seq.desc()).limit(50))
            return list(dict.fromkeys(paths))[:count]

    def set_validated(self, job_id: str, status: str, message: str, **fields: Any) -> bool:
        """``validating_files`` → ``queued`` or ``failed`` (a job cancelled meanwhile stays so)."""
        with self.session() as s:
            values = dict(fields, status=status)
            if status in FINAL:
                values["finished_at"] = now()
            done = s.execute(update(Job).where(Job.id == job_id, Job.status == "validating_files").values(**values)).rowcount
            if done:
                self._event(s, job_id, message, level="error" if status == "failed" else "info", kind="status")
        return bool(done)

    def cancel(self, owner: str, job_id: str) -> Job:
        """A job not yet running is cancelled at once; a running one is asked to stop (its
        worker kills the training within a second or two and records ``cancelled``)."""
        job = self.get_job(owner, job_id)
        with self.session() as s:
            if job.status in FINAL:
                raise Conflict(f"job {job_id} has already {job.status}; only a job that has not finished can be cancelled")
            stopped = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(("validating_files", "queued", "paused")))
                                .values(status="cancelled", finished_at=now(), claim=None, lease_until=None)).rowcount
            if stopped:
                self._event(s, job_id, "Job cancelled", kind="status")
            else:
                s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
                self._event(s, job_id, "Cancelling the running job", kind="request")
        return self.get_job(owner, job_id)

    def pause(self, owner: str, job_id: str) -> Job:
        """A queued job is paused at once; a running one after its worker has saved a checkpoint."""
        job = self.get_job(owner, job_id)
        with self.session() as s:
            if job.status not in ("queued", "running"):
                raise Conflict(f"job {job_id} is {job.status}; only a queued or running job can be paused")
            stopped = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(status="paused")).rowcount
            if stopped:
                self._event(s, job_id, "Job paused", kind="status")
            else:
                s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(pause_requested=True))
                self._event(s, job_id, "Pausing the job: it stops after saving a checkpoint", kind="request")
        return self.get_job(owner, job_id)

    def resume(self, owner: str, job_id: str) -> Job:
        job = self.get_job(owner, job_id)
        with self.session() as s:
            if job.status != "paused":
                if job.status == "running" and job.pause_requested:
                    s.execute(update(Job).where(Job.id == job_id).values(pause_requested=False))
                    return self.get_job(owner, job_id)
                raise Conflict(f"job {job_id} is {job.status}; only a paused job can be resumed")
            if s.execute(update(Job).where(Job.id == job_id, Job.status == "paused")
                         .values(status="queued", pause_requested=False)).rowcount:
                self._event(s, job_id, "Job resumed: queued to continue from its last checkpoint", kind="status")
        return self.get_job(owner, job_id)

    # -- events and checkpoints ----------------------------------------------------------
    def _event(self, s: Session, job_id: str, message: str, *, level: str = "info", kind: str = "message",
               step: int | None = None, data: dict[str, Any] | None = None) -> None:
        s.add(Event(id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level, message=message,
                    type="metrics" if data is not None else "message", kind=kind, step=step, data=data))

    def add_event(self, job_id: str, message: str, **kwargs: Any) -> None:
        with self.session() as s:
            self._event(s, job_id, message, **kwargs)

    def add_metrics(self, job_id: str, rows: list[tuple[str, int, str, dict[str, Any]]]) -> None:
        """Metric events ``(kind, step, message, data)``, skipping steps already recorded for
        their kind (a resumed run replays the rows after its checkpoint)."""
        with self.session() as s:
            for kind, step, message, data in rows:
                seen = s.scalar(select(func.max(Event.step)).where(Event.job_id == job_id, Event.kind == kind))
                if seen is None or step > seen:
                    self._event(s, job_id, message, kind=kind, step=step, data=data)

    def events(self, owner: str, job_id: str, after: str | None = None, limit: int = 20) -> list[Event]:
        self.get_job(owner, job_id)
        with self.session() as s:
            query = select(Event).where(Event.job_id == job_id)
            if after:
                cursor = s.scalar(select(Event.seq).where(Event.id == after, Event.job_id == job_id))
                if cursor is None:
                    raise NotFound(f"no event {after!r} (after) in job {job_id}")
                query = query.where(Event.seq < cursor)
            return list(s.scalars(query.order_by(Event.seq.desc()).limit(limit)))

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any], path: str) -> bool:
        with self.session() as s:
            if s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id, Checkpoint.step == step)):
                return False
            s.add(Checkpoint(id=new_id("ftckpt"), job_id=job_id, step=step, created_at=now(), metrics=metrics, path=path))
        return True

    def checkpoints(self, owner: str, job_id: str, after: str | None = None, limit: int = 10) -> list[Checkpoint]:
        self.get_job(owner, job_id)
        with self.session() as s:
            query = select(Checkpoint).where(Checkpoint.job_id == job_id)
            if after:
                cursor = s.scalar(select(Checkpoint.seq).where(Checkpoint.id == after, Checkpoint.job_id == job_id))
                if cursor is None:
                    raise NotFound(f"no checkpoint {after!r} (after) in job {job_id}")
                query = query.where(Checkpoint.seq < cursor)
            return list(s.scalars(query.order_by(Checkpoint.seq.desc()).limit(limit)))

    # -- the queue ---------------------------------------------------------------------------
    def _settle_abandoned(self, s: Session, at: float) -> None:
        """Jobs whose worker died while asked to cancel or pause get that status now."""
        expired = and_(Job.status == "running", Job.lease_until < at)
        for flag, status, message in ((Job.cancel_requested, "cancelled", "Job cancelled"),
                                      (Job.pause_requested, "paused", "Job paused")):
            ids = list(s.scalars(select(Job.id).where(expired, flag.is_(True))))
            for job_id in ids:
                values: dict[str, Any] = {"status": status, "claim": None, "lease_until": None, "pause_requested": False}
                if status == "cancelled":
                    values["finished_at"] = now()
                if s.execute(update(Job).where(Job.id == job_id, expired).values(**values)).rowcount:
                    self._event(s, job_id, message, kind="status")

    def claim(self, worker: str, lease_seconds: float) -> Claim | None:
        """The oldest queued job, or a running one whose lease expired (its worker died), now
        held by ``worker``; None when there is none."""
        at = time.time()
        token = secrets.token_hex(16)
        takeable = or_(Job.status == "queued",
                       and_(Job.status == "running", Job.lease_until < at, Job.cancel_requested.is_(False),
                            Job.pause_requested.is_(False)))
        values = {"status": "running", "claim": token, "worker": worker, "lease_until": at + lease_seconds,
                  "attempts": Job.attempts + 1}
        with self.session() as s:
            self._settle_abandoned(s, at)
            if self.engine.dialect.name == "postgresql":
                seq = s.scalar(select(Job.seq).where(takeable).order_by(Job.seq).limit(1).with_for_update(skip_locked=True))
                if seq is None:
                    return None
                previous = s.scalar(select(Job.worker).where(Job.seq == seq))
                s.execute(update(Job).where(Job.seq == seq).values(**values))
            else:
                oldest = select(Job.seq).where(takeable).order_by(Job.seq).limit(1).scalar_subquery()
                previous = None
                if not s.execute(update(Job).where(Job.seq == oldest, takeable).values(**values)).rowcount:
                    return None
            job = s.scalar(select(Job).where(Job.claim == token))
            if job.attempts > 1:
                self._event(s, job.id, f"Taken over by worker {worker} (attempt {job.attempts}): continuing from the last "
                            "checkpoint" + (f"; worker {previous} lost its lease" if previous else ""), kind="status")
            else:
                self._event(s, job.id, "Fine-tuning job started", kind="status")
        return Claim(job, token)

    def heartbeat(self, claim: Claim, lease_seconds: float) -> Job | None:
        """Renews the lease; the job's current fields (cancel/pause requests), or None when the
        lease is no longer this worker's."""
        with self.session() as s:
            if not s.execute(update(Job).where(Job.id == claim.job_id, Job.claim == claim.token, Job.status == "running")
                             .values(lease_until=time.time() + lease_seconds)).rowcount:
                return None
            return s.scalar(select(Job).where(Job.id == claim.job_id))

    def finish(self, claim: Claim, status: str, message: str, *, level: str = "info", **fields: Any) -> bool:
        """Ends a claimed run: ``succeeded``, ``failed`` or ``cancelled``, ``paused`` or back to
        ``queued``; False when the claim was lost (then nothing changes)."""
        values = dict(fields, status=status, claim=None, lease_until=None, cancel_requested=False, pause_requested=False)
        if status in FINAL:
            values["finished_at"] = now()
        with self.session() as s:
            if not s.execute(update(Job).where(Job.id == claim.job_id, Job.claim == claim.token).values(**values)).rowcount:
                return False
            self._event(s, claim.job_id, message, level=level, kind="status")
        return True

    def remove_job_files(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
