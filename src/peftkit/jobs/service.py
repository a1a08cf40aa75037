"""The jobs service behind the HTTP routes: files, job creation and validation, the model
announcements, and the server's own worker.

``on_model_ready(model_id, adapter_dir, base_id)`` is how the server learns of a fine-tuned
model: it is called once per succeeded job in this service's lifetime, from the service's
watcher thread (so it must be thread-safe, and may block briefly to load the adapter):
for every job that succeeded before the service started (so a restarted server serves them
again), then within about a second of each job that succeeds, whichever worker, on whichever
machine, ran it. ``model_id`` is ``ft:<base>:<suffix>:<job id>``, ``adapter_dir`` a peftkit /
PEFT adapter folder for the base ``base_id`` (a key of ``bases``). An exception it raises is
logged and the job stays succeeded; the next service start calls it again.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select

from peftkit.jobs.child import CONFIG, RUN
from peftkit.jobs.db import Job, default_url, open_database
from peftkit.jobs.formats import check_file
from peftkit.jobs.spec import SpecError, check_request, resolve_hyperparameters, run_config
from peftkit.jobs.store import JobStore, NotFound

__all__ = ["JobService", "RequestError"]

_SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# peftkit.train's plug-in registries load lazily and are not thread-safe while they do: the
# validation threads build configs one at a time
_CONFIG_LOCK = threading.Lock()


class RequestError(ValueError):
    """A bad request: ``status``, the message and the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class JobService:
    """Files and fine-tuning jobs over one database and one state folder.

    Args:
        bases: served model id → local model folder; a job's ``model`` must be one of the ids.
        state_dir: uploads, job folders (config, run, checkpoints, adapter), and the SQLite
            database unless ``db_url`` names another.
        db_url: ``sqlite:///PATH`` or ``postgresql://USER:PASSWORD@HOST/DB``.
        on_model_ready: see the module's docstring.
        workers: worker processes this service starts and stops with itself (``peftkit
            worker`` in a child process each); 0 when workers run elsewhere.
        worker_options: extra ``peftkit worker`` arguments (e.g. ``["--lease-seconds", "10"]``).
    """

    def __init__(self, bases: Mapping[str, str], state_dir: str = "peftkit-state", db_url: str | None = None,
                 on_model_ready: Callable[[str, str, str], None] | None = None, workers: int = 1,
                 worker_options: list[str] | None = None, max_file_bytes: int = 1 << 30) -> None:
        self.bases = dict(bases)
        self.state_dir = os.path.abspath(state_dir)
        self.db_url = db_url or default_url(self.state_dir)
        self.store = JobStore(open_database(self.db_url), self.state_dir)
        self.on_model_ready = on_model_ready
        self.worker_count, self.worker_options = workers, list(worker_options or [])
        self.max_file_bytes = max_file_bytes
        self.announced: set[str] = set()
        self.workers: list[subprocess.Popen] = []
        self._validation = ThreadPoolExecutor(max_workers=2, thread_name_prefix="peftkit-validate")
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> JobService:
        """Validates jobs a stopped server left unvalidated, starts the watcher thread and the
        workers. Call it from a thread that lives as long as the service: on Linux its workers
        are killed when the thread that started them ends."""
        for job in self.store.jobs_with_status("validating_files"):
            self._validation.submit(self.validate, job.id)
        self._watcher = threading.Thread(target=self._watch, name="peftkit-jobs-watcher", daemon=True)
        self._watcher.start()
        for _ in range(self.worker_count):
            self.workers.append(self.start_worker())
        return self

    def start_worker(self, *extra: str) -> subprocess.Popen:
        """``peftkit worker`` on this service's database and state folder, as a child process
        that dies with this one."""
        from peftkit.jobs.worker import _die_with_parent

        warm = [arg for path in self.bases.values() for arg in ("--warm", path)]
        command = [sys.executable, "-m", "peftkit.cli", "worker", "--db", self.db_url, "--state", self.state_dir, *warm,
                   *self.worker_options, *extra]
        return subprocess.Popen(command, preexec_fn=_die_with_parent)

    def close(self, timeout: float = 30.0) -> None:
        """Stops the watcher and the workers (a running job is checkpointed and queued again)."""
        self._stop.set()
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers = []
        if self._watcher is not None:
            self._watcher.join(timeout)
        self._validation.shutdown(wait=True)
        self.store.engine.dispose()

    def _watch(self) -> None:
        since = 0
        while not self._stop.is_set():
            checked = int(time.time()) - 2
            try:
                with self.store.session() as s:
                    jobs = list(s.scalars(select(Job).where(Job.status == "succeeded", Job.finished_at >= since)))
                for job in jobs:
                    if job.id not in self.announced:
                        self.announced.add(job.id)
                        self._announce(job)
                since = checked
            except Exception as exc:  # a database hiccup: try again at the next poll
                print(f"peftkit jobs: watcher: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop.wait(0.3)

    def _announce(self, job: Job) -> None:
        if self.on_model_ready is None or not job.fine_tuned_model or not job.adapter_dir:
            return
        try:
            self.on_model_ready(job.fine_tuned_model, job.adapter_dir, job.model)
        except Exception as exc:
            print(f"peftkit jobs: on_model_ready({job.fine_tuned_model!r}) failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    # -- files ----------------------------------------------------------------------------
    def upload(self, owner: str, filename: str, purpose: str, chunks: Iterator[bytes]) -> Any:
        if purpose != "fine-tune":
            raise RequestError(f"purpose {purpose!r} is not supported here; use purpose=fine-tune", "purpose")
        limit = self.max_file_bytes

        def counted() -> Iterator[bytes]:
            size = 0
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"the file is larger than the {limit} bytes this server accepts", "file", 413)
                yield chunk

        return self.store.add_file(owner, filename, purpose, counted())

    # -- jobs -----------------------------------------------------------------------------
    def create_job(self, owner: str, body: Mapping[str, Any]) -> Job:
        """Records a job (``validating_files``) and validates its files in the background."""
        known = {"model", "training_file", "validation_file", "suffix", "seed", "metadata", "hyperparameters", "method",
                 "integrations", "peftkit"}
        for key in body:
            if key not in known:
                raise RequestError(f"unknown parameter {key!r}", key)
        model = body.get("model")
        if not isinstance(model, str) or model not in self.bases:
            raise RequestError(f"model {model!r} is not a base this server fine-tunes; choose one of {sorted(self.bases)}",
                               "model", code="model_not_available")
        files = {}
        for key in ("training_file", "validation_file"):
            value = body.get(key)
            if value is None and key == "validation_file":
                continue
            if not isinstance(value, str):
                raise RequestError(f"{key} must be the id of an uploaded file", key)
            try:
                files[key] = self.store.get_file(owner, value)
            except NotFound:
                raise RequestError(f"{key}: no file {value!r}", key, code="invalid_file") from None
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX.match(suffix)):
            raise RequestError("suffix must be 1 to 64 letters, digits, '_', '-' or '.'", "suffix")
        seed = body.get("seed")
        if seed is None:
            seed = random.randrange(1 << 31)
        elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << 31:
            raise RequestError("seed must be an integer in [0, 2147483647]", "seed")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16
                                     or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise RequestError("metadata must map at most 16 string keys to string values", "metadata")
        try:
            hyperparameters, method, extension = check_request(body.get("hyperparameters"), body.get("method"),
                                                               body.get("peftkit"))
        except SpecError as exc:
            raise RequestError(str(exc), exc.param) from None
        job = self.store.create_job(owner, model=model, model_path=self.bases[model], training_file=files["training_file"].id,
                                    validation_file=files["validation_file"].id if "validation_file" in files else None,
                                    suffix=suffix, seed=seed, meta=metadata, hyperparameters=hyperparameters, method=method,
                                    peftkit=extension)
        self._validation.submit(self.validate, job.id)
        return job

    def validate(self, job_id: str) -> None:
        """Checks the job's files and config; ``queued`` or ``failed`` with every problem."""
        try:
            self._validate(job_id)
        except Exception as exc:
            self.store.set_validated(job_id, "failed", f"The job failed: {exc}", error={
                "code": "validation_error", "message": f"{type(exc).__name__}: {exc}", "param": None})

    def _fail(self, job_id: str, code: str, message: str, param: str | None) -> None:
        self.store.set_validated(job_id, "failed", f"The job failed validation: {message}",
                                 error={"code": code, "message": message, "param": param})

    def _validate(self, job_id: str) -> None:
        import yaml

        from peftkit.core.io import atomic_write_text

        job = self.store.get_job(None, job_id)
        if job.status != "validating_files":
            return
        job_dir = self.store.job_dir(job_id)
        os.makedirs(job_dir, exist_ok=True)
        expected = "preference" if job.method["type"] == "dpo" else None
        data_format, paths, examples = None, {}, 0
        for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
            if file_id is None:
                continue
            try:
                record = self.store.get_file(job.owner, file_id)
            except NotFound:
                return self._fail(job_id, "invalid_file", f"{param} {file_id} was deleted", param)
            check = check_file(self.store.file_path(record), expected or data_format)
            if not check.ok:
                return self._fail(job_id, f"invalid_{param}", check.message(f"{param} {file_id} ({record.filename})"), param)
            if expected is None and check.format == "preference":
                return self._fail(job_id, f"invalid_{param}", f"{param} is in the preference format, which needs "
                                  "method type 'dpo'", param)
            data_format = check.format
            if param == "training_file":
                examples = len(check.records)
            import json

            target = os.path.join(job_dir, param.replace("_file", "") + ".jsonl")
            atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in check.records))
            paths[param] = target
        hp = resolve_hyperparameters(job.hyperparameters, examples)
        processes = int(job.peftkit.get("processes") or 1)
        if hp["batch_size"] % processes:
            return self._fail(job_id, "invalid_hyperparameters", f"batch_size {hp['batch_size']} must be divisible by the "
                              f"{processes} processes", "hyperparameters.batch_size")
        raw, steps = run_config(model_path=job.model_path, data_format=data_format, train_path=paths["training_file"],
                                validation_path=paths.get("validation_file"), examples=examples, hyperparameters=hp,
                                method=job.method, extension=job.peftkit, seed=job.seed,
                                output_dir=os.path.join(job_dir, RUN))
        from peftkit.train.config import build_config
        from peftkit.train.plugins import TASKS
        from peftkit.train.schema import ConfigError

        task = raw["task"]["name"] if isinstance(raw["task"], dict) else raw["task"]
        with _CONFIG_LOCK:
            if task not in TASKS.names():
                return self._fail(job_id, "method_not_available", f"method type {job.method['type']!r} trains with "
                                  f"peftkit's {task!r} task, which this installation does not have", "method.type")
            try:
                build_config(yaml.safe_load(yaml.safe_dump(raw)), job_dir)
            except ConfigError as exc:
                return self._fail(job_id, "invalid_config", str(exc), "peftkit")
        atomic_write_text(os.path.join(job_dir, CONFIG), yaml.safe_dump(raw, sort_keys=False))
        resolved = {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        method = dict(job.method)
        method[method["type"]] = {"hyperparameters": {**resolved, **({"beta": hp["beta"]} if "beta" in hp else {})}}
        extension = {**job.peftkit, "method": raw["method"], "format": data_format, "total_steps": steps}
        self.store.set_validated(job_id, "queued", "Files validated, moving job to queued state", hyperparameters=resolved,
                                 method=method, peftkit=extension)
