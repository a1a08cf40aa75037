"""Fine-tuning job latency on the tiny chat model: from job creation to the first training
step, and from the last step to the model being ready to serve.

    python bench/jobs.py [--jobs 5]

One ``JobService`` with one worker process (SQLite in a temporary state folder); the worker
is warmed (imports done, the base's model class loaded) before the first timed job, as a
running server's worker is. Each job trains 16 chat examples for 20 steps. Times are taken
by polling the database every 20 ms from this process: "first step" is when the step-1
metrics event is recorded, "last step" when the last step's, "ready" when
``on_model_ready`` is called. Prints the median over ``--jobs`` jobs, run one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    from models import save_tiny_chat_model
    from peftkit.jobs.service import JobService

    tmp = tempfile.mkdtemp(prefix="peftkit-bench-jobs-")
    base = save_tiny_chat_model(os.path.join(tmp, "base"))
    ready: dict[str, float] = {}
    service = JobService({"tiny": base}, state_dir=os.path.join(tmp, "state"), workers=1,
                         worker_options=["--poll-seconds", "0.2"],
                         on_model_ready=lambda model, *_: ready.setdefault(model.rsplit(":", 1)[-1], time.monotonic()))
    service.start()
    rows = [{"messages": [{"role": "user", "content": f"tell me {w}"}, {"role": "assistant", "content": "the cat is happy"}]}
            for w in ("one", "two", "three", "four")] * 4
    upload = service.store.add_file("", "train.jsonl", "fine-tune", iter([("".join(json.dumps(r) + "\n" for r in rows)).encode()]))
    body = {"model": "tiny", "training_file": upload.id, "seed": 1, "hyperparameters": {"n_epochs": 5, "batch_size": 4},
            "peftkit": {"max_length": 64}}
    warm = service.create_job("", body)  # waits for the worker to start; not timed
    while service.store.get_job(None, warm.id).status not in ("succeeded", "failed"):
        time.sleep(0.2)
    to_first, to_ready, train = [], [], []
    for _ in range(args.jobs):
        created = time.monotonic()
        job = service.create_job("", body)
        first = last = None
        while job.id not in ready:
            steps = [e.step for e in service.store.events("", job.id, limit=1000) if e.type == "metrics"]
            if steps and first is None:
                first = time.monotonic()
            if steps and max(steps) >= 20 and last is None:
                last = time.monotonic()
            if service.store.get_job(None, job.id).status == "failed":
                raise SystemExit(f"job failed: {service.store.get_job(None, job.id).error}")
            time.sleep(0.02)
        to_first.append(first - created)
        train.append(last - first)
        to_ready.append(ready[job.id] - last)
    service.close()
    print(json.dumps({"jobs": args.jobs, "creation_to_first_step_s": round(statistics.median(to_first), 3),
                      "first_to_last_step_s": round(statistics.median(train), 3),
                      "last_step_to_ready_s": round(statistics.median(to_ready), 3),
                      "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
