"""A worker: takes jobs from the queue, trains each in a child process, streams its events.

Why a child process per job, not training in the worker's own process: a cancel must stop a
job at once (SIGKILL to the child's process group, whatever it is doing), a pause must stop it
with a checkpoint (SIGTERM: ``peftkit train`` saves one and exits), a crashed or killed
training leaves the worker alive, and memory is returned after every job. The worker imports
the training modules once and forks the child, so a job starts without paying the imports; a
job of N processes goes through ``torch.distributed.run`` instead (and a job goes through
``python -m peftkit.jobs.child`` when this process holds a CUDA context, which a fork cannot
use; ``peftkit worker`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that checking for a GPU
creates none). Children die with their worker (Linux ``PR_SET_PDEATHSIG``): a worker killed
with ``kill -9`` leaves no training behind, and its job is taken over, from the last
checkpoint, by the next worker to find its lease expired.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from peftkit.jobs.child import CONFIG, OUTCOME, RUN
from peftkit.jobs.store import Claim, JobStore

__all__ = ["Worker"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """This process gets SIGKILL when the thread that started it ends (Linux; elsewhere a
    no-op, and a killed worker's training runs on until it finishes or is killed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _cuda_initialized() -> bool:
    """Whether this process has a CUDA context, which a forked child could not use (the job is
    then launched as a fresh process instead)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def warm_up() -> None:
    """Imports what every training child needs, once, before the first fork."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    import peftkit.train.loop  # noqa: F401
    from peftkit.train.plugins import TASKS

    for name in TASKS.names():
        TASKS.get(name)


def warm_model(model_path: str) -> None:
    """Imports the model class of ``model_path`` (transformers loads it lazily; seconds)."""
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_path)
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:
        pass


class _Child:
    """One job's training process (a fork, or a ``torch.distributed.run`` launch)."""

    def __init__(self, job_dir: str, processes: int) -> None:
        log = open(os.path.join(job_dir, "train.log"), "ab")
        if processes == 1 and hasattr(os, "fork") and not _cuda_initialized():
            self.proc = None
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:
                    os.setpgid(0, 0)
                    _die_with_parent()
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        signal.signal(sig, signal.SIG_DFL)
                    os.dup2(log.fileno(), 1)
                    os.dup2(log.fileno(), 2)
                    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
                    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
                    from peftkit.jobs.child import train_job

                    code = train_job(job_dir)
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            self.pid = pid
            with contextlib.suppress(OSError):  # also here: a signal sent before the child's own call reaches it
                os.setpgid(pid, pid)
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                       "-m", "peftkit.jobs.child", job_dir]
            if processes == 1:
                command = [sys.executable, "-m", "peftkit.jobs.child", job_dir]
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
            self.pid = self.proc.pid
        log.close()
        self.code: int | None = None
        from peftkit.core.io import atomic_write_text

        atomic_write_text(os.path.join(job_dir, "train.pid"), f"{self.pid}\n")  # for operators (and tests): the training process

    def poll(self) -> int | None:
        if self.code is None:
            if self.proc is not None:
                self.code = self.proc.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        end = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        return self.code

    def kill(self) -> int | None:
        self.signal(signal.SIGKILL)
        return self.wait(30)


class _Watcher:
    """Turns a run folder's ``metrics.jsonl`` rows into events and the adapters saved per epoch
    (``peftkit.jobs.checkpoints``) into checkpoint records."""

    def __init__(self, store: JobStore, job_id: str, run_dir: str, total_steps: int) -> None:
        self.store, self.job_id, self.run_dir, self.total = store, job_id, run_dir, total_steps
        self.offset = 0
        self.inode: int | None = None
        self.checkpoints_seen: set[str] = set()
        self.train_loss: dict[int, float] = {}
        self.last_eval: dict[str, Any] = {}

    def poll(self, final: bool = False) -> None:
        self._metrics()
        self._checkpoint(final)

    def _metrics(self) -> None:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        try:
            fh = open(path, encoding="utf-8")
        except OSError:
            return
        with fh:
            # A resumed run rewrites the file (a new file renamed over it): read that one from the
            # start; the steps already recorded are skipped. The open file is the one measured,
            # so a rename between looks cannot mix the two.
            stat = os.fstat(fh.fileno())
            if stat.st_ino != self.inode or stat.st_size < self.offset:
                self.inode, self.offset = stat.st_ino, 0
            fh.seek(self.offset)
            text = fh.read()
        end = text.rfind("\n") + 1  # whole lines only
        self.offset += len(text[:end].encode("utf-8"))
        rows = []
        for line in text[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = int(row.get("step", 0))
            if "loss" in row:
                data = {"step": step, "train_loss": row["loss"], "total_steps": self.total, "learning_rate": row.get("lr")}
                self.train_loss[step] = row["loss"]
                rows.append(("train", step, f"Step {step}/{self.total}: training loss={row['loss']:.4f}", data))
            else:
                values = {("valid_loss" if k == "eval_loss" else k): v for k, v in row.items() if k != "step"}
                self.last_eval = values
                shown = ", ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, (int, float)))
                rows.append(("eval", step, f"Step {step}/{self.total}: {shown}", {"step": step, "total_steps": self.total,
                                                                                   **values}))
        if rows:
            self.store.add_metrics(self.job_id, rows)

    def _checkpoint(self, final: bool) -> None:
        folder = os.path.join(os.path.dirname(self.run_dir), "checkpoints")
        try:
            names = os.listdir(folder)
        except OSError:
            return
        # In step order: the listing's order is the file system's, and checkpoints are listed newest first.
        steps = sorted((int(name[5:]), name) for name in names if name.startswith("step-") and name[5:].isdigit())
        for step, name in steps:
            if name in self.checkpoints_seen:
                continue
            if not final and (not self.train_loss or max(self.train_loss) < step):
                continue  # the step's metrics row comes just after its adapter: record both together
            logged = [s for s in self.train_loss if s <= step]
            metrics = {"step": step, **({"train_loss": self.train_loss[max(logged)]} if logged else {}), **self.last_eval}
            self.store.add_checkpoint(self.job_id, step, metrics, os.path.join(folder, name))
            self.checkpoints_seen.add(name)


class Worker:
    """Takes jobs from ``store`` one at a time until :meth:`stop`.

    Args:
        lease_seconds: how long a claim holds without a heartbeat; a job whose worker has been
            silent this long is taken over by another worker.
        poll_seconds: the wait between looks at the queue, and between looks at a running job
            (cancel and pause requests, new metrics).
        warm: model folders whose model classes to import before the first job (the bases of
            recent jobs are added).
    """

    def __init__(self, store: JobStore, *, name: str | None = None, lease_seconds: float = 30.0,
                 poll_seconds: float = 0.5, warm: list[str] | None = None, log: Any = None) -> None:
        self.store = store
        self.warm = list(warm or [])
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_seconds, self.poll_seconds = lease_seconds, poll_seconds
        self.stopping = False
        self.log = log or (lambda message: print(f"peftkit worker {self.name}: {message}", file=sys.stderr, flush=True))

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self, max_jobs: int | None = None) -> int:
        """Runs jobs until stopped (SIGTERM/SIGINT: the running job is checkpointed and handed
        back to the queue); returns the number of jobs run."""
        warm_up()
        for path in dict.fromkeys(self.warm + self.store.recent_model_paths()):
            warm_model(path)  # the first job of a base would otherwise wait for its model class to import
        done = 0
        self.log(f"waiting for jobs (lease {self.lease_seconds:g} s)")
        while not self.stopping and (max_jobs is None or done < max_jobs):
            claim = self.store.claim(self.name, self.lease_seconds)
            if claim is None:
                time.sleep(self.poll_seconds)
                continue
            done += 1
            try:
                self.run_job(claim)
            except Exception as exc:  # the job fails, the worker goes on
                self.log(f"job {claim.job_id} failed in the worker: {type(exc).__name__}: {exc}")
                self.store.finish(claim, "failed", f"The job failed: {exc}", level="error",
                                  error={"code": "worker_error", "message": f"{type(exc).__name__}: {exc}", "param": None})
        return done

    def run_job(self, claim: Claim) -> None:
        job = claim.job
        job_dir = self.store.job_dir(job.id)
        run_dir = os.path.join(job_dir, RUN)
        if not os.path.isfile(os.path.join(job_dir, CONFIG)):
            raise RuntimeError(f"{job_dir} has no {CONFIG}: the state folder must be shared by the server and its workers")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(job_dir, OUTCOME))
        self.log(f"running {job.id} (attempt {job.attempts})")
        warm_model(job.model_path)
        child = _Child(job_dir, int((job.peftkit or {}).get("processes") or 1))
        watcher = _Watcher(self.store, job.id, run_dir, int((job.peftkit or {}).get("total_steps") or 0))
        asked: str | None = None  # "cancel" / "pause" / "stop": what we told the child
        beat = 0.0
        while child.poll() is None:
            if time.monotonic() - beat >= min(self.poll_seconds, self.lease_seconds / 3):
                beat = time.monotonic()
                current = self.store.heartbeat(claim, self.lease_seconds)
                if current is None:
                    self.log(f"lost the lease of {job.id}: stopping its training")
                    child.kill()
                    return
                if current.cancel_requested:
                    child.kill()
                    self.store.finish(claim, "cancelled", "Job cancelled")
                    return
                if current.pause_requested and asked is None:
                    asked = "pause"
                    child.signal(signal.SIGTERM)
                if self.stopping and asked is None:
                    asked = "stop"
                    child.signal(signal.SIGTERM)
            watcher.poll()
            time.sleep(0.1)
        watcher.poll(final=True)
        self._settle(claim, child.code, job_dir, asked)

    def _settle(self, claim: Claim, code: int | None, job_dir: str, asked: str | None) -> None:
        job = claim.job
        try:
            with open(os.path.join(job_dir, OUTCOME), encoding="utf-8") as fh:
                outcome = json.load(fh)
        except (OSError, ValueError):
            outcome = {"status": "failed", "code": "training_error",
                       "message": f"the training process ended with status {code} and no outcome; see {job_dir}/train.log"}
        if outcome["status"] == "succeeded":
            summary = outcome.get("summary") or {}
            tokens = int((summary.get("throughput") or 0) * (summary.get("train_seconds") or 0))
            name = f"ft:{job.model}:{job.suffix or ''}:{job.id}"
            self.store.finish(claim, "succeeded", "The job has successfully completed", fine_tuned_model=name,
                              adapter_dir=outcome["adapter_dir"], trained_tokens=tokens)
            self.log(f"{job.id} succeeded: {name}")
        elif outcome["status"] == "interrupted" and asked == "pause":
            self.store.finish(claim, "paused", f"Job paused at step {outcome.get('step')}: resume continues from there")
        elif outcome["status"] == "interrupted":
            self.store.finish(claim, "queued", f"Worker {self.name} stopped at step {outcome.get('step')}; the job is "
                              "queued to continue from its checkpoint")
        else:
            message = outcome.get("message", "training failed")
            self.store.finish(claim, "failed", f"The job failed: {message}", level="error",
                              error={"code": outcome.get("code", "training_error"), "message": message, "param": None})
            self.log(f"{job.id} failed: {message}")


def install_stop_signals(worker: Worker) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, worker.stop)
