"""The HTTP application: OpenAI's and vLLM's route shapes over one engine.

Routes: ``GET /v1/models``; ``POST /v1/completions`` and ``/v1/chat/completions`` (with
``stream: true`` as server-sent events) for causal LMs; ``POST /v1/embeddings`` and
``/classify`` for encoders and classifiers; ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``; ``GET /health`` and ``GET /metrics`` (Prometheus text).
Every error is OpenAI's body (``{"error": {...}}``) with its status.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from peftkit.serve.encoder import EncoderEngine
from peftkit.serve.engine import GenerationEngine, GenerationRequest
from peftkit.serve.errors import APIError, install_error_handlers
from peftkit.serve.loading import Served
from peftkit.serve.protocol import (
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from peftkit.serve.sampling import SamplingParams

__all__ = ["Server", "create_app"]

log = logging.getLogger("peftkit.serve")


def key_owner(key: str) -> str:
    """The id that scopes what one API key's caller owns (a digest, never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Server:
    """One served base, its engine and the server's settings, shared by the routes."""

    def __init__(self, served: Served, engine: GenerationEngine | EncoderEngine,
                 api_keys: Sequence[str] = ()) -> None:
        self.served = served
        self.engine = engine
        self.metrics = engine.metrics
        self.owners = {key_owner(k) for k in api_keys}  # digests only: the keys are not kept
        self.created = int(time.time())
        # What else runs with the server (the jobs service): started after the engine, stopped before it.
        self.on_start: list[Callable[[], None]] = []
        self.on_stop: list[Callable[[], None]] = []

    # -- models ----------------------------------------------------------------------
    def resolve(self, model: str) -> str | None:
        """The adapter ``model`` names (None for the base); 404 when unknown."""
        if model == self.served.model_id:
            return None
        if model in self.engine.pool.known:
            return model
        known = [self.served.model_id, *sorted(self.engine.pool.known)]
        raise APIError(404, f"the model {model!r} does not exist; this server has {known}", param="model",
                       code="model_not_found")

    def add_adapter(self, name: str, path: str) -> None:
        """Registers an adapter at runtime (refused with 400 if it does not fit the base)."""
        if name == self.served.model_id:
            raise APIError(400, f"{name!r} is the base model's name; pick another adapter name", param="lora_name")
        self.engine.call(lambda: self.engine.pool.add(name, path)).result()

    def remove_adapter(self, name: str) -> None:
        self.engine.call(lambda: self.engine.pool.remove(name)).result()

    def owner(self, authorization: str | None) -> str:
        """The caller's owner id; 401 when keys are set and the request has none of them."""
        if not self.owners:
            return ""
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        owner = key_owner(authorization[len("Bearer "):].strip())
        if owner not in self.owners:
            raise APIError(401, "incorrect API key", code="invalid_api_key")
        return owner


_NEEDS = {"generate": "a causal language model", "classify": "a classifier", "embed": "an encoder"}
_ROUTES = {"generate": "/v1/completions and /v1/chat/completions", "classify": "/classify and /v1/embeddings",
           "embed": "/v1/embeddings"}


def _need(server: Server, kind: str, route: str) -> None:
    served = server.served
    if served.kind != kind:
        raise APIError(400, f"{route} needs {_NEEDS[kind]}; {served.model_id!r} answers {_ROUTES[served.kind]}")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


class _Generation:
    """The requests behind one HTTP call (one per prompt), their events in one asyncio queue."""

    def __init__(self, server: Server, prompts: list[list[int]], adapter: str | None, params: SamplingParams) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = params.n
        self.requests = []
        for k, ids in enumerate(prompts):
            def emit(event: tuple, k: int = k) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))
            self.requests.append(GenerationRequest(ids, adapter, params, emit))
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.arrival = time.monotonic()
        for request in self.requests:  # a full queue refuses the whole call
            try:
                server.engine.submit(request)
            except APIError:
                self.cancel()
                raise

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def collect(self, http_request: Any) -> tuple[dict[int, str], dict[int, str | None]]:
        """The whole text and the finish reason of every choice."""
        texts: dict[int, list[str]] = {}
        finishes: dict[int, str | None] = {}
        try:
            async for index, text, finish in self.events(http_request):
                texts.setdefault(index, []).append(text)
                finishes[index] = finish
        finally:
            self.cancel()
        return {i: "".join(parts) for i, parts in texts.items()}, finishes

    async def events(self, http_request: Any) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, text, finish_reason) until every request is done; an engine error raises."""
        done = 0
        while done < len(self.requests):
            try:
                k, event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http_request.is_disconnected():
                    self.cancel()
                    return
                continue
            if event[0] == "delta":
                yield k * self.n + event[1], event[2], event[3]
            elif event[0] == "done":
                done += 1
                self.usage["prompt_tokens"] += event[1]["prompt_tokens"]
                self.usage["completion_tokens"] += event[1]["completion_tokens"]
                self.usage["total_tokens"] = self.usage["prompt_tokens"] + self.usage["completion_tokens"]
            else:
                self.cancel()
                raise event[1]


def create_app(server: Server, extensions: Sequence[Callable[[FastAPI, Server], None]] = ()) -> FastAPI:
    """The FastAPI app for ``server``; each of ``extensions`` may add routes (``fn(app, server)``)."""
    @asynccontextmanager
    async def lifespan(_app):
        server.engine.start()
        for start in server.on_start:
            start()
        try:
            yield
        finally:
            loop = asyncio.get_running_loop()
            for stop in server.on_stop:
                await loop.run_in_executor(None, stop)
            await loop.run_in_executor(None, server.engine.stop)

    app = FastAPI(title="peftkit serve", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    engine = server.engine

    @app.middleware("http")
    async def log_requests(request: Request, call_next):
        start = time.monotonic()
        response = await call_next(request)
        seconds = time.monotonic() - start
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        server.metrics.observe_request(path, response.status_code, seconds if path != "/metrics" else None)
        log.info("%s %s %d %.3fs", request.method, request.url.path, response.status_code, seconds)
        return response

    def owner(authorization: str | None = Header(None)) -> str:
        return server.owner(authorization)

    app.state.owner_dependency = owner
    auth = [Depends(owner)]

    @app.get("/health")
    async def health() -> Response:
        return PlainTextResponse("ok")

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        base = server.served.model_id
        data = [{"id": base, "object": "model", "created": server.created, "owned_by": "peftkit", "root": base,
                 "parent": None}]
        resident = set(list(engine.pool.resident))  # copies: the engine thread may change them
        for name, path in sorted(dict(engine.pool.known).items()):
            data.append({"id": name, "object": "model", "created": server.created, "owned_by": "peftkit",
                         "root": path, "parent": base, "resident": name in resident})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load_adapter(body: LoadAdapterRequest) -> dict:
        await asyncio.get_running_loop().run_in_executor(None, server.add_adapter, body.lora_name, body.lora_path)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload_adapter(body: UnloadAdapterRequest) -> dict:
        await asyncio.get_running_loop().run_in_executor(None, server.remove_adapter, body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    def encode_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [engine.tokenizer(prompt)["input_ids"]]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if prompt and all(isinstance(p, str) for p in prompt):
            return [engine.tokenizer(p)["input_ids"] for p in prompt]
        if prompt and all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                            "and not empty", param="prompt")

    def check_tokens(prompts: list[list[int]]) -> None:
        vocab = len(engine.tokenizer)
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty (no tokens)", param="prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="prompt")

    def sampling(body: Any, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stops(), seed=body.seed, n=body.n, ignore_eos=body.ignore_eos)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _need(server, "generate", "/v1/completions")
        adapter = server.resolve(body.model)
        prompts = encode_prompts(body.prompt)
        check_tokens(prompts)
        max_tokens = body.max_tokens or 16
        for ids in prompts:
            engine.check_budget(len(ids), max_tokens)
        generation = _Generation(server, prompts, adapter, sampling(body, max_tokens))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [engine.tokenizer.decode(ids) if body.echo else "" for ids in prompts]

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def stream() -> AsyncIterator[str]:
                started: set[int] = set()
                try:
                    async for index, text, finish in generation.events(request):
                        if index not in started:
                            started.add(index)
                            text = echo[index // body.n] + text
                        yield _sse(chunk(index, text, finish))
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                                    "choices": [], "usage": generation.usage})
                    yield _sse("[DONE]")
                except APIError as exc:
                    yield _sse(exc.body())
                    yield _sse("[DONE]")
                finally:
                    generation.cancel()  # a client gone mid-stream frees its slots
            return StreamingResponse(stream(), media_type="text/event-stream")

        texts, finishes = await generation.collect(request)
        choices = [{"index": i, "text": echo[i // body.n] + texts.get(i, ""), "logprobs": None,
                    "finish_reason": finishes.get(i)} for i in range(len(prompts) * body.n)]
        return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": generation.usage}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, request: Request) -> Any:
        _need(server, "generate", "/v1/chat/completions")
        adapter = server.resolve(body.model)
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"{server.served.model_id!r} has no chat template in its tokenizer; use /v1/completions "
                                "with a prompt instead", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if limit is None:
            limit = engine.max_model_len - len(ids)
            if limit < 1:
                raise APIError(400, f"the messages take {len(ids)} tokens, the whole context of "
                                    f"{engine.max_model_len}; shorten them", param="messages")
        engine.check_budget(len(ids), limit, param)
        generation = _Generation(server, [ids], adapter, sampling(body, limit))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict, finish: str | None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def stream() -> AsyncIterator[str]:
                try:
                    for i in range(body.n):
                        yield _sse(chunk(i, {"role": "assistant", "content": ""}, None))
                    async for index, text, finish in generation.events(request):
                        if text:
                            yield _sse(chunk(index, {"content": text}, None))
                        if finish:
                            yield _sse(chunk(index, {}, finish))
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": body.model, "choices": [], "usage": generation.usage})
                    yield _sse("[DONE]")
                except APIError as exc:
                    yield _sse(exc.body())
                    yield _sse("[DONE]")
                finally:
                    generation.cancel()
            return StreamingResponse(stream(), media_type="text/event-stream")

        texts, finishes = await generation.collect(request)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts.get(i, "")},
                    "logprobs": None, "finish_reason": finishes.get(i)} for i in range(body.n)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": choices, "usage": generation.usage}

    def texts_of(value: Any, param: str) -> list[str]:
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(v, str) for v in value):
            return list(value)
        if value and all(isinstance(v, int) for v in value):
            return [engine.tokenizer.decode(value)]
        if value and all(isinstance(v, list) for v in value):
            return [engine.tokenizer.decode(v) for v in value]
        raise APIError(400, f"{param} must be a string or a non-empty list of strings", param=param)

    @app.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingRequest) -> Any:
        if server.served.kind == "generate":
            _need(server, "embed", "/v1/embeddings")
        adapter = server.resolve(body.model)
        vectors, tokens = await asyncio.wrap_future(engine.embed(texts_of(body.input, "input"), adapter))
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/classify", dependencies=auth)
    async def classify(body: ClassifyRequest) -> Any:
        _need(server, "classify", "/classify")
        adapter = server.resolve(body.model)
        rows, tokens = await asyncio.wrap_future(engine.classify(texts_of(body.input, "input"), adapter))
        labels = server.served.labels or [str(i) for i in range(len(rows[0]))]
        data = [{"index": i, "label": labels[max(range(len(p)), key=p.__getitem__)], "probs": p,
                 "num_classes": len(p)} for i, p in enumerate(rows)]
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": body.model, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

    for extend in extensions:
        extend(app, server)
    return app
