"""Fine-tuning jobs end to end: the jobs router on a real uvicorn server on 127.0.0.1, the
official ``openai`` client, real worker processes and a real database (SQLite always;
PostgreSQL where ``PEFTKIT_TEST_POSTGRES_URL`` names a server, as ``.ci/run`` starts one).

The training is the tiny chat model of ``tests/models.py`` on a few dozen steps."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402

from peftkit.jobs.service import JobService  # noqa: E402
from peftkit.serve.errors import APIError, install_error_handlers  # noqa: E402
from peftkit.serve.jobs_routes import jobs_router  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
KEYS = {"key-a": "org-a", "key-b": "org-b"}
POSTGRES = os.environ.get("PEFTKIT_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not POSTGRES, reason="no PostgreSQL server: set PEFTKIT_TEST_POSTGRES_URL=postgresql://USER@HOST:PORT/DB "
                         "(.ci/run installs and starts one)"))]
WORKER_OPTIONS = ["--lease-seconds", "3", "--poll-seconds", "0.2"]
# 16 examples, batch 4, 20 epochs: 80 steps. One thread, so that a resumed run repeats the
# uninterrupted one's arithmetic.
HYPER = {"n_epochs": 20, "batch_size": 4, "learning_rate_multiplier": 60}
PEFTKIT = {"method": {"name": "lora", "r": 4, "lora_alpha": 8}, "max_length": 64, "train": {"threads": 1}}
SEED = 7


def owner_of(request: Request) -> str:
    """The test server's API keys: each key is its own owner."""
    header = request.headers.get("authorization", "")
    key = header.removeprefix("Bearer ").strip()
    if key not in KEYS:
        raise APIError(401, "invalid API key: pass one of the server's keys as Authorization: Bearer KEY",
                       code="invalid_api_key")
    return KEYS[key]


class Server:
    """The jobs router on a bare FastAPI app, served by uvicorn in a thread."""

    def __init__(self, service: JobService) -> None:
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(jobs_router(service, owner_of))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = "key-a") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def fresh_database(backend: str, tmp_path) -> str:
    """An empty database of ``backend``."""
    if backend == "sqlite":
        return "sqlite:///" + str(tmp_path / "jobs.sqlite")
    import psycopg

    name = f"peftkit_test_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return POSTGRES.rsplit("/", 1)[0] + "/" + name


def chat_lines(n: int = 16) -> str:
    answers = ["good thanks one two three", "the cat is happy", "red green blue", "yes i like the movie"]
    rows = [{"messages": [{"role": "system", "content": "you answer"}, {"role": "user", "content": f"tell me {w}"},
                          {"role": "assistant", "content": answers[i % 4]}]}
            for i, w in enumerate(["one", "two", "three", "four"] * (n // 4))]
    return "".join(json.dumps(r) + "\n" for r in rows)


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


def all_events(client, job_id: str) -> list:
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    from models import save_tiny_chat_model

    return save_tiny_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="module", params=BACKENDS)
def env(request, base_model, tmp_path_factory):
    """A server with two worker processes (started by the service), on a fresh database."""
    tmp = tmp_path_factory.mktemp(f"jobs-{request.param}")
    ready: list[tuple[str, str, str]] = []
    service = JobService({"tiny": base_model}, state_dir=str(tmp / "state"), db_url=fresh_database(request.param, tmp),
                         on_model_ready=lambda *args: ready.append(args), workers=2, worker_options=WORKER_OPTIONS)
    os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
    service.start()
    server = Server(service)
    env = type("Env", (), {})()
    env.backend, env.service, env.server, env.ready, env.results = request.param, service, server, ready, {}
    env.a, env.b = server.client("key-a"), server.client("key-b")
    env.train_file = env.a.files.create(file=("train.jsonl", chat_lines().encode()), purpose="fine-tune")
    yield env
    server.stop()
    service.close()


def create(env, **overrides):
    body = dict(model="tiny", training_file=env.train_file.id, seed=SEED, hyperparameters=HYPER,
                extra_body={"peftkit": overrides.pop("peftkit", PEFTKIT)})
    body.update(overrides)
    return env.a.fine_tuning.jobs.create(**body)


def status_of(env, job_id: str, wanted: tuple[str, ...]):
    job = env.a.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in wanted else None


def adapter_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))


def test_upload_train_and_serve(env):
    a = env.a
    assert a.files.retrieve(env.train_file.id).bytes == len(chat_lines().encode())
    assert a.files.content(env.train_file.id).read() == chat_lines().encode()
    assert env.train_file.id in [f.id for f in a.files.list(purpose="fine-tune")]
    job = create(env, suffix="e2e", metadata={"case": "e2e"})
    assert job.status == "validating_files" and job.seed == SEED and job.model == "tiny"
    job = wait_for(lambda: status_of(env, job.id, ("succeeded", "failed")), 90, "the job to finish")
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:e2e:{job.id}"
    assert job.hyperparameters.n_epochs == 20 and job.hyperparameters.batch_size == 4
    assert job.trained_tokens and job.trained_tokens > 0
    # the server hears of the model at once, with a folder it can load
    _, adapter_dir, base = wait_for(lambda: next((r for r in env.ready if r[0] == job.fine_tuned_model), None), 5,
                                    "on_model_ready")
    assert base == "tiny" and os.path.isfile(os.path.join(adapter_dir, "adapter_config.json"))
    env.results["reference"] = adapter_tensors(adapter_dir)
    events = all_events(a, job.id)
    messages = [e.message for e in events]
    assert messages[0].startswith("Validating training file") and messages[-1] == "The job has successfully completed"
    assert "Files validated, moving job to queued state" in messages and "Fine-tuning job started" in messages
    losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == list(range(1, 81)) and losses[-1] < losses[0] - 0.2, (steps, losses[:3], losses[-3:])
    page = a.fine_tuning.jobs.list_events(job.id, limit=5)
    second = a.fine_tuning.jobs.list_events(job.id, limit=5, after=page.data[-1].id)
    assert page.has_more and [e.id for e in page.data + second.data] == [e.id for e in reversed(events)][:10]
    checkpoints = list(a.fine_tuning.jobs.checkpoints.list(job.id, limit=100))
    assert sorted(c.step_number for c in checkpoints) == list(range(4, 81, 4))  # one per epoch
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-80"
    assert checkpoints[0].metrics.train_loss is not None and checkpoints[0].metrics.step == 80
    assert [j.id for j in a.fine_tuning.jobs.list(metadata={"case": "e2e"})] == [job.id]


def test_malformed_file_fails_at_validation_with_line_numbers(env):
    lines = chat_lines(4).splitlines()
    lines[1] = '{"messages": [{"role": "user", "content": "hi"}'  # line 2: cut short
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "hi"}]})  # line 4: no assistant answer
    bad = env.a.files.create(file=("bad.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
    job = create(env, training_file=bad.id)
    job = wait_for(lambda: status_of(env, job.id, ("failed", "queued", "running", "succeeded")), 20, "validation")
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 2: not valid JSON" in job.error.message and "line 4: messages must end with an assistant message" in job.error.message
    assert "line 1" not in job.error.message and "line 3" not in job.error.message
    messages = [e.message for e in all_events(env.a, job.id)]
    assert messages[0].startswith("Validating training file") and messages[-1].startswith("The job failed validation")
    assert "Fine-tuning job started" not in messages
    assert env.a.files.delete(bad.id).deleted
    with pytest.raises(openai.NotFoundError):
        env.a.files.retrieve(bad.id)
    assert bad.id not in [f.id for f in env.a.files.list()]


def test_api_keys_and_scoping(env):
    job = create(env, hyperparameters={"n_epochs": 1, "batch_size": 4}, suffix="scoped")
    with pytest.raises(openai.AuthenticationError):
        env.server.client("wrong-key").fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        env.b.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        env.b.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        env.b.files.retrieve(env.train_file.id)
    assert job.id not in [j.id for j in env.b.fine_tuning.jobs.list()]
    with pytest.raises(openai.BadRequestError, match="training_file"):  # a's file is not b's to train on
        env.b.fine_tuning.jobs.create(model="tiny", training_file=env.train_file.id)
    with pytest.raises(openai.BadRequestError, match="model"):
        env.a.fine_tuning.jobs.create(model="no-such-base", training_file=env.train_file.id)
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        env.a.fine_tuning.jobs.create(model="tiny", training_file=env.train_file.id, hyperparameters={"n_epochs": "many"})
    wait_for(lambda: status_of(env, job.id, ("succeeded",)), 60, "the scoped job to succeed")


def test_cancel_stops_a_running_job_within_10_s(env):
    job = create(env, peftkit={**PEFTKIT, "train": {"threads": 1, "max_steps": 100000, "log_every": 1}})
    wait_for(lambda: any(e.type == "metrics" for e in env.a.fine_tuning.jobs.list_events(job.id, limit=5)), 60,
             "training to start")
    pid = int(open(os.path.join(env.service.store.job_dir(job.id), "train.pid")).read())
    started = time.monotonic()
    env.a.fine_tuning.jobs.cancel(job.id)
    wait_for(lambda: status_of(env, job.id, ("cancelled",)), 10, "cancelled")
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):  # the training process is gone (and reaped)
        os.kill(pid, 0)
    assert "Job cancelled" in [e.message for e in all_events(env.a, job.id)]
    with pytest.raises(openai.ConflictError):
        env.a.fine_tuning.jobs.cancel(job.id)


def test_pause_and_resume_continue_from_the_checkpoint(env):
    job = create(env, peftkit={**PEFTKIT, "train": {"threads": 1, "checkpoint_every": 2}})
    wait_for(lambda: any(e.type == "metrics" for e in env.a.fine_tuning.jobs.list_events(job.id, limit=5)), 60,
             "training to start")
    env.a.fine_tuning.jobs.pause(job.id)
    paused = wait_for(lambda: status_of(env, job.id, ("paused", "succeeded")), 20, "paused")
    assert paused.status == "paused"
    note = next(e.message for e in all_events(env.a, job.id) if e.message.startswith("Job paused at step"))
    assert 0 < int(note.split()[4].rstrip(":")) < 80, note  # stopped mid-run, with a checkpoint of that step
    env.a.fine_tuning.jobs.resume(job.id)
    done = wait_for(lambda: status_of(env, job.id, ("succeeded", "failed")), 60, "the resumed job")
    assert done.status == "succeeded", done.error
    events = all_events(env.a, job.id)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == list(range(1, 81))  # every step once: the replayed ones are not recorded twice
    messages = [e.message for e in events]
    assert any(m.startswith("Job paused at step") for m in messages) and any(m.startswith("Job resumed") for m in messages)
    # the same run as the uninterrupted one (same seed and data)
    got = adapter_tensors(done_adapter(env, done))
    assert max((got[k] - v).abs().max().item() for k, v in env.results["reference"].items()) <= 1e-6


def done_adapter(env, job) -> str:
    return env.service.store.get_job(None, job.id).adapter_dir


def test_kill_9_worker_and_another_takes_over(env):
    """kill -9 the worker running a job mid-way: the other worker finds the lease expired,
    resumes from the last checkpoint, and ends with the uninterrupted run's adapter. (The
    module's last test with ``env``: it leaves one worker.)"""
    assert "reference" in env.results, "needs test_upload_train_and_serve's adapter"
    job = create(env, peftkit={**PEFTKIT, "train": {"threads": 1, "checkpoint_every": 5}})
    wait_for(lambda: any(c.step_number >= 10 for c in env.a.fine_tuning.jobs.checkpoints.list(job.id, limit=100)), 60,
             "a checkpoint at step 10 or later", every=0.02)
    holder = env.service.store.get_job(None, job.id).worker
    victim = next(p for p in env.service.workers if holder.endswith(f":{p.pid}"))
    pid = int(open(os.path.join(env.service.store.job_dir(job.id), "train.pid")).read())
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    assert env.a.fine_tuning.jobs.retrieve(job.id).status == "running"  # nobody has noticed yet
    wait_for(lambda: _gone(pid), 5, "the training process to die with its worker")
    done = wait_for(lambda: status_of(env, job.id, ("succeeded", "failed")), 90, "the job through the other worker")
    assert done.status == "succeeded", done.error
    job_row = env.service.store.get_job(None, job.id)
    assert job_row.attempts == 2 and job_row.worker != holder
    messages = [e.message for e in all_events(env.a, job.id)]
    assert any(m.startswith("Taken over by worker") for m in messages), messages
    steps = [e.data["step"] for e in all_events(env.a, job.id) if e.type == "metrics"]
    assert steps == list(range(1, 81))
    got = adapter_tensors(done_adapter(env, done))
    diff = max((got[k] - v).abs().max().item() for k, v in env.results["reference"].items())
    assert diff <= 1e-6, diff


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie no one reaps yet (its parent was killed) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_workers_race_for_20_jobs(backend, tmp_path):
    """Two claimers, each with its own engine (its own database connections), take jobs
    from one queue as fast as they can: every job is taken exactly once."""
    from peftkit.jobs.db import open_database
    from peftkit.jobs.store import JobStore

    url = fresh_database(backend, tmp_path)
    state = str(tmp_path / "state")
    store = JobStore(open_database(url), state)
    ids = []
    for _ in range(20):
        job = store.create_job("", model="tiny", model_path="-", training_file="file-x", validation_file=None, suffix=None,
                               seed=0, meta=None, hyperparameters={}, method={"type": "supervised"}, peftkit={})
        assert store.set_validated(job.id, "queued", "queued")
        ids.append(job.id)
    racers = [JobStore(open_database(url), state) for _ in range(2)]
    start = threading.Barrier(2)

    def race(me: int) -> list[str]:
        taken = []
        start.wait()
        while (claim := racers[me].claim(f"racer-{me}", 30)) is not None:
            taken.append(claim.job_id)
            time.sleep(0.005)  # "runs" it: the other racer claims meanwhile
            assert racers[me].finish(claim, "succeeded", "done")
        return taken

    with ThreadPoolExecutor(2) as pool:
        taken = list(pool.map(race, range(2)))
    assert sorted(taken[0] + taken[1]) == sorted(ids)  # every job once, none twice
    assert taken[0] and taken[1], taken  # both took part
    for job_id in ids:
        job = store.get_job(None, job_id)
        assert job.status == "succeeded" and job.attempts == 1
    for s in [store, *racers]:
        s.engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_50_concurrent_creations_and_a_restart_keep_everything(backend, base_model, tmp_path):
    url = fresh_database(backend, tmp_path)
    state = str(tmp_path / "state")
    service = JobService({"tiny": base_model}, state_dir=state, db_url=url, workers=0).start()
    server = Server(service)
    try:
        client = server.client()
        upload = client.files.create(file=("train.jsonl", chat_lines().encode()), purpose="fine-tune")
        with ThreadPoolExecutor(16) as pool:
            made = list(pool.map(lambda i: client.fine_tuning.jobs.create(
                model="tiny", training_file=upload.id, suffix=f"n{i}", hyperparameters={"n_epochs": 1}), range(50)))
        assert len({j.id for j in made}) == 50
        def validated():
            listed = list(client.fine_tuning.jobs.list(limit=100))
            assert not [j.error for j in listed if j.status == "failed"]
            return all(j.status == "queued" for j in listed)

        wait_for(validated, 60, "all validated")
        jobs = {j.id: j.user_provided_suffix for j in client.fine_tuning.jobs.list(limit=100)}
        assert jobs == {j.id: j.user_provided_suffix for j in made}
        events = {j: [e.message for e in client.fine_tuning.jobs.list_events(j, limit=100)] for j in jobs}
    finally:
        server.stop()
        service.close()
    service = JobService({"tiny": base_model}, state_dir=state, db_url=url, workers=0).start()
    server = Server(service)
    try:
        client = server.client()
        assert client.files.content(upload.id).read() == chat_lines().encode()
        assert {j.id: j.user_provided_suffix for j in client.fine_tuning.jobs.list(limit=100)} == jobs
        assert {j: [e.message for e in client.fine_tuning.jobs.list_events(j, limit=100)] for j in jobs} == events
        assert all(len(v) == 2 for v in events.values())  # validating, then queued
    finally:
        server.stop()
        service.close()


PREFERENCE_LINE = {"input": {"messages": [{"role": "user", "content": "tell me about the movie"}]},
                   "preferred_output": [{"role": "assistant", "content": "it is great fun"}],
                   "non_preferred_output": [{"role": "assistant", "content": "it is boring"}]}


def test_file_formats_and_their_run_configs(tmp_path, base_model):
    """Each OpenAI format is recognised and maps to its task and columns; every bad line is
    named with its number."""
    from peftkit.jobs.formats import check_file
    from peftkit.jobs.spec import check_request, resolve_hyperparameters, run_config

    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "say hi", "completion": "hi"}) + "\n" + json.dumps({"prompt": "x"}) + "\n"
                    + json.dumps({"messages": []}) + "\n[1]\n")
    check = check_file(str(path))
    assert check.format == "prompt_completion" and len(check.records) == 1
    assert check.problems == [(2, "completion must be a string"),
                              (3, "a chat example in a prompt_completion file: use one format per file"),
                              (4, "a JSON object expected, got list")]
    path.write_text(json.dumps(PREFERENCE_LINE) + "\n")
    assert not check_file(str(path)).ok  # preference data without method dpo
    assert check_file(str(path), "preference").records == [PREFERENCE_LINE]
    hp, method, extension = check_request({"n_epochs": 2}, {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}, None)
    hp = resolve_hyperparameters(hp, 16)
    assert hp == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0, "beta": 0.2}
    raw, steps = run_config(model_path=base_model, data_format="preference", train_path="t.jsonl", validation_path=None,
                            examples=16, hyperparameters=hp, method=method, extension=extension, seed=3,
                            output_dir=str(tmp_path / "run"))
    assert raw["task"] == {"name": "preference", "beta": 0.2} and steps == 16
    assert raw["method"] == {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0}  # the default for a narrow base
    assert raw["model"]["max_length"] == 128  # the base's positions
    raw, _ = run_config(model_path=base_model, data_format="prompt_completion", train_path="t.jsonl", validation_path=None,
                        examples=16, hyperparameters=hp, method={"type": "supervised"}, extension={}, seed=3,
                        output_dir=str(tmp_path / "run"))
    assert raw["task"] == "causal_lm" and raw["data"]["response_column"] == "completion"
    for bad, field in (({"n_epochs": 0}, "n_epochs"), ({"batch_size": 1.5}, "batch_size"), ({"lr": 1}, "lr")):
        with pytest.raises(ValueError, match=field):
            check_request(bad, None, None)


def test_dpo_job_trains_with_the_preference_task(env):
    from peftkit.train.plugins import TASKS

    upload = env.a.files.create(file=("pref.jsonl", (json.dumps(PREFERENCE_LINE) + "\n").encode() * 8), purpose="fine-tune")
    job = env.a.fine_tuning.jobs.create(model="tiny", training_file=upload.id, seed=1,
                                        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1,
                                                                                            "batch_size": 4}}},
                                        extra_body={"peftkit": PEFTKIT})
    done = wait_for(lambda: status_of(env, job.id, ("succeeded", "failed")), 60, "the DPO job")
    if "preference" not in TASKS.names():
        assert done.status == "failed" and done.error.code == "method_not_available", done.error
        pytest.skip("peftkit train has no 'preference' task in this installation (it comes with the preference-tuning "
                    "work); the DPO job fails at validation with method_not_available, as checked")
    assert done.status == "succeeded", done.error
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.2
