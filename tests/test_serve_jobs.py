"""`peftkit serve BASE --jobs`: a fine-tuning job created with the official `openai` client on
the server, and its fine-tuned model answering chat completions on the same server at once."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")
openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

from models import save_tiny_chat_model  # noqa: E402
from test_jobs import chat_lines  # noqa: E402
from test_serve import _free_port, _start  # noqa: E402


def test_a_job_trains_and_its_model_answers_on_the_same_server(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import PeftModel

    base = str(save_tiny_chat_model(tmp_path / "tiny"))
    port = _free_port()
    proc = _start([base, "--jobs", "--state", str(tmp_path / "state"), "--api-key", "k1"], port, tmp_path)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0, timeout=60)
        upload = client.files.create(file=("train.jsonl", chat_lines().encode()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=upload.id, suffix="demo", seed=3,
            hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 60},
            extra_body={"peftkit": {"method": {"name": "lora", "r": 4, "lora_alpha": 8}, "max_length": 64}})
        deadline = time.monotonic() + 240
        while job.status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"the job is still {job.status}"
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:tiny:demo:{job.id}"
        deadline = time.monotonic() + 30
        while job.fine_tuned_model not in [m.id for m in client.models.list().data]:
            assert time.monotonic() < deadline, "the fine-tuned model was not served"
            time.sleep(0.3)
        entry = next(m for m in client.models.list().data if m.id == job.fine_tuned_model)
        messages = [{"role": "user", "content": "tell me one"}]
        answer = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=8,
                                                temperature=0).choices[0].message.content
        tok = AutoTokenizer.from_pretrained(base)
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), entry.root).eval()
        ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = tuned.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=8, do_sample=False)
        assert answer == tok.decode(out[0, len(ids):], skip_special_tokens=True)
        before = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert before.choices[0].message.content != answer  # the fine-tuned adapter answered, not the base
    finally:
        proc.terminate()
        proc.wait(60)
