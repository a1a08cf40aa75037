"""`peftkit serve` driven by the official `openai` client: a real server process on 127.0.0.1
with a tiny Llama and LoRA adapters; every greedy answer is compared with
`PeftModel.generate(do_sample=False)` on the same adapter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models import save_tiny_chat_model  # noqa: E402

KEY = "test-key-1"
ADAPTERS = ("a", "b", "c", "d")
PROMPTS = ["hello tell me a story", "the film was", "what is the red cat", "one two three", "i love the dog and"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], port: int, tmp) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {(tmp / f'server-{port}.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


def _save_lora(base: str, out, seed: int, r: int, targets=("q_proj", "v_proj", "down_proj")) -> str:
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():  # adapters that change the greedy tokens clearly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = str(save_tiny_chat_model(tmp / "base"))
    paths = {name: _save_lora(base, tmp / name, seed=i, r=4 if i % 2 else 8) for i, name in enumerate(ADAPTERS)}
    other = str(save_tiny_chat_model(tmp / "other", hidden=48))  # same module names, other shapes
    paths["foreign"] = _save_lora(other, tmp / "foreign", seed=9, r=4)
    port = _free_port()
    proc = _start([base, "--adapter", f"a={paths['a']}", "--adapter", f"b={paths['b']}", "--api-key", KEY,
                   "--api-key", "other-key", "--max-adapters", "2", "--max-batch-size", "16"], port, tmp)
    yield {"tmp": tmp, "base": base, "paths": paths, "url": f"http://127.0.0.1:{port}", "proc": proc}
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(setup):
    """The reference: the same base with every adapter, generating greedily one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit import PeftModel

    tok = AutoTokenizer.from_pretrained(setup["base"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["base"]), setup["paths"]["a"],
                                      adapter_name="a")
    for name in ADAPTERS[1:]:
        model.load_adapter(setup["paths"][name], adapter_name=name)
    model.eval()

    def generate(ids: list[int], adapter: str | None, max_tokens: int) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, adapter_names=[adapter or "__base__"])
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    def completion(prompt: str, adapter: str | None, max_tokens: int = 12) -> str:
        return generate(tok(prompt)["input_ids"], adapter, max_tokens)

    def chat(messages: list[dict], adapter: str | None, max_tokens: int = 12) -> str:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return generate(tok(text, add_special_tokens=False)["input_ids"], adapter, max_tokens)

    return {"completion": completion, "chat": chat}


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "a", "b"]


def test_greedy_completions_equal_offline_generate(client, offline):
    adapters_differ = set()
    for model, adapter in (("base", None), ("a", "a"), ("b", "b")):
        for prompt in PROMPTS[:3]:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            expected = offline["completion"](prompt, adapter)
            assert out.choices[0].text == expected, (model, prompt)
            assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens == len(prompt.split())
            adapters_differ.add(expected)
    assert len(adapters_differ) > 3  # the adapters change the answers: the comparison sees which one ran


def test_chat_and_streaming(client, offline):
    messages = [{"role": "system", "content": "you answer"}, {"role": "user", "content": "tell me about the dog"}]
    out = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == offline["chat"](messages, "b", 10)
    stream = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    completion = client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in completion) == offline["completion"](PROMPTS[1], "a", 8)


def test_sampling_seed_n_and_stop(client):
    kwargs = dict(model="a", prompt="the film was", max_tokens=10, temperature=1.0, top_p=0.9, n=3, seed=7)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1  # three draws, not one copied
    word = first.choices[0].text.split()[1]
    stopped = client.completions.create(**{**kwargs, "n": 1, "stop": [" " + word]})
    assert stopped.choices[0].text == first.choices[0].text[:first.choices[0].text.index(" " + word)]
    assert stopped.choices[0].finish_reason == "stop"


def test_concurrent_requests_over_four_adapters(client, offline, setup):
    for name in ("c", "d"):
        client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": setup["paths"][name]}, cast_to=object)
    jobs = [(PROMPTS[i % len(PROMPTS)], ADAPTERS[i % 4]) for i in range(32)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        prompt, model = jobs[i]
        answers[i] = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(answers) == 32
    for i, (prompt, model) in enumerate(jobs):
        assert answers[i] == offline["completion"](prompt, model, 10), (i, model, prompt)
    metrics = httpx.get(setup["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    sizes = [line for line in metrics.splitlines() if line.startswith("peftkit_decode_batch_size_sum")]
    counts = [line for line in metrics.splitlines() if line.startswith("peftkit_decode_batch_size_count")]
    assert float(sizes[0].split()[-1]) / float(counts[0].split()[-1]) > 1.5  # requests were decoded together


def test_load_and_unload_at_runtime(client, offline, setup):
    client.post("/unload_lora_adapter", body={"lora_name": "d"}, cast_to=object)
    assert "d" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="d", prompt="hi", max_tokens=2)
    client.post("/load_lora_adapter", body={"lora_name": "d2", "lora_path": setup["paths"]["d"]}, cast_to=object)
    out = client.completions.create(model="d2", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == offline["completion"](PROMPTS[0], "d", 12)
    with pytest.raises(openai.BadRequestError, match="already loaded"):
        client.post("/load_lora_adapter", body={"lora_name": "d2", "lora_path": setup["paths"]["d"]}, cast_to=object)


def test_an_adapter_written_by_peft_is_served(client, setup):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(5)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(setup["base"]),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(setup["tmp"] / "from_peft")
    client.post("/load_lora_adapter", body={"lora_name": "from-peft", "lora_path": str(setup["tmp"] / "from_peft")},
                cast_to=object)
    tok = AutoTokenizer.from_pretrained(setup["base"])
    ids = tok(PROMPTS[2])["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=10, do_sample=False)
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    got = client.completions.create(model="from-peft", prompt=PROMPTS[2], max_tokens=10, temperature=0)
    assert got.choices[0].text == expected


def test_an_adapter_for_another_base_is_refused_and_serving_goes_on(client, setup):
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/load_lora_adapter", body={"lora_name": "foreign", "lora_path": setup["paths"]["foreign"]},
                    cast_to=object)
    message = str(err.value)
    assert "foreign" in message and ".lora_" in message and "(48, 4)" in message and "(32, 4)" in message, message
    assert "foreign" not in [m.id for m in client.models.list().data]
    assert client.completions.create(model="a", prompt="hi", max_tokens=2, temperature=0).choices


def test_errors_have_openai_bodies(client, setup):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="hi", temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="context is 128 tokens"):
        client.completions.create(model="a", prompt="hi", max_tokens=500)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=setup["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(setup["url"] + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    raw = httpx.post(setup["url"] + "/v1/chat/completions", json={"model": "a", "messages": []},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "messages"
    assert httpx.get(setup["url"] + "/v1/models").status_code == 401


def test_a_client_that_disconnects_frees_its_slot(setup):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "a", "prompt": "hello", "max_tokens": 120, "temperature": 1.0, "stream": True, "seed": 1}
    with httpx.stream("POST", setup["url"] + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 2:
                break
    deadline = time.monotonic() + 20
    running = None
    while time.monotonic() < deadline:
        metrics = httpx.get(setup["url"] + "/metrics", headers=headers).text
        running = next(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("peftkit_running_sequences "))
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0


def test_queue_full_is_429_and_sigterm_finishes_running_requests(setup, tmp_path):
    port = _free_port()
    long_base = str(save_tiny_chat_model(tmp_path / "long", positions=2048))
    proc = _start([long_base, "--adapter", f"a={setup['paths']['a']}", "--max-batch-size", "1",
                   "--max-queue", "1"], port, tmp_path)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "a", "prompt": "hello", "max_tokens": 800, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    results: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:  # the first request is long; the others would be short
        results[i] = httpx.post(url, json=body if i == 0 else {**body, "max_tokens": 5}, timeout=120)

    def running() -> float:
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return next(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("peftkit_running_sequences "))

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    deadline = time.monotonic() + 30
    while running() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    # The first request is decoding; the queue holds one more and refuses the rest.
    others = [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
    for t in others:
        t.start()
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 1, "the long request ended before the test could stop the server under it"
    proc.send_signal(signal.SIGTERM)
    for t in [first, *others]:
        t.join(120)
    assert proc.wait(60) == 0
    statuses = sorted(r.status_code for r in results.values())
    assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] >= 1
    assert 429 in statuses, statuses
    refused = next(r for r in results.values() if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full"
    assert json.loads(results[0].text)["choices"][0]["finish_reason"] == "length"
    assert results[0].json()["usage"]["completion_tokens"] == 800
