"""Continuous batching for a causal language model with many adapters.

One thread owns the model. Between decoding steps it runs commands (load or unload an
adapter), drops cancelled requests and admits waiting ones: each new request is prefilled
alone, then its key/value cache joins the running batch. Every step then decodes one token
for every running sequence in one forward pass, whatever adapter each uses
(``adapter_names``: one mixed-adapter batch per step), each with its own sampling
parameters. A finished or cancelled sequence leaves the batch at once.

The batch cache is one rectangle per layer, ``[sequences, heads, length, head_dim]``: a
shorter sequence is padded on the left (masked, with explicit position ids), so its logits
are those of the sequence alone within float rounding. The rectangle is rebuilt only when
the batch changes.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from peftkit.serve.adapters import AdapterPool
from peftkit.serve.errors import APIError
from peftkit.serve.loading import context_length
from peftkit.serve.metrics import Metrics
from peftkit.serve.sampling import SamplingParams, make_generator, next_token

__all__ = ["GenerationEngine", "GenerationRequest"]

log = logging.getLogger("peftkit.serve")
_ids = itertools.count(1)

# What the engine sends back for a request, through its ``emit`` callable:
#   ("delta", choice index, text, finish_reason or None)
#   ("done", {"prompt_tokens": .., "completion_tokens": ..})
#   ("error", APIError)


class GenerationRequest:
    """One request: a tokenized prompt, the adapter (None for the base), sampling
    parameters and ``emit``, called from the engine thread with each event."""

    def __init__(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
                 emit: Callable[[tuple], None]) -> None:
        self.id = next(_ids)
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.params = params
        self.emit = emit
        self.cancelled = False
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.open_choices = params.n
        self.completion_tokens = 0

    def cancel(self) -> None:
        """Frees the request's slots before the next step (a client that went away)."""
        self.cancelled = True


class _Choice:
    """One generated sequence of a request (``n`` of them per request)."""

    __slots__ = ("cached", "generator", "index", "request", "sent", "tokens")

    def __init__(self, request: GenerationRequest, index: int) -> None:
        self.request = request
        self.index = index
        self.generator = make_generator(request.params.seed, index)
        self.tokens: list[int] = []
        self.sent = ""  # text already emitted
        self.cached = 0  # tokens held in this sequence's key/value cache


PREFILL_TOKENS = 8192  # padded prompt tokens run together at most (bounds the prefill's activations)


def _chunks(requests: list[GenerationRequest], budget: int) -> list[list[GenerationRequest]]:
    """Consecutive groups whose padded size (rows × longest prompt) stays within ``budget``
    (a longer prompt alone goes in a group of its own)."""
    groups: list[list[GenerationRequest]] = []
    for request in requests:
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * max(len(request.prompt_ids),
                                                        *(len(r.prompt_ids) for r in group)) <= budget:
            group.append(request)
        else:
            groups.append([request])
    return groups


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


class GenerationEngine:
    """Serves a causal LM (a transformers model) and its adapters with continuous batching.

    Args:
        model: the base model (eval mode); adapters are attached to it as they load.
        tokenizer: its tokenizer (used to decode and to find the end-of-sequence tokens).
        adapters: adapter name → folder, all servable; at most ``max_adapters`` resident.
        max_batch_size: sequences decoded together.
        max_model_len: prompt plus generated tokens, at most.
        max_queue: requests waiting to start; a full queue refuses new ones (429).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, adapters: dict[str, str] | None = None,
                 max_adapters: int = 8, max_batch_size: int = 32, max_model_len: int | None = None,
                 max_queue: int = 256, metrics: Metrics | None = None) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics or Metrics()
        self.pool = AdapterPool(model, dict(adapters or {}), max_adapters, self.metrics)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_model_len = context_length(model, max_model_len, default=2048)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        forward = inspect.signature(type(model).forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._keep_arg = "logits_to_keep" in forward
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[_Choice] = []
        self._cache: Any = None  # the batch's DynamicCache
        self._mask: torch.Tensor | None = None  # [sequences, length], 0 on the left padding
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The decoding batch's adapter per row, held across steps while the batch is unchanged,
        # so that LoRA layers stack the rows' factors once, not at every step.
        self._rows: contextlib.AbstractContextManager | None = None
        self._row_names: list[str | None] | None = None

    # -- interface (any thread) -----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the running and waiting requests, then ends the engine thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        """Queues ``request``; raises APIError(429) when the queue is full."""
        if request.params.n > self.max_batch_size:
            raise APIError(400, f"n={request.params.n} is more than this server decodes together "
                                f"(--max-batch-size {self.max_batch_size})", param="n")
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise APIError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                               code="queue_full")
            self._waiting.append(request)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs ``fn`` on the engine thread between steps (it owns the model)."""
        future: Future = Future()
        with self._cv:
            self._commands.append((fn, future))
            self._cv.notify_all()
        return future

    def check_budget(self, prompt_tokens: int, max_tokens: int, param: str = "max_tokens") -> None:
        if prompt_tokens + max_tokens > self.max_model_len:
            raise APIError(400, f"this model's context is {self.max_model_len} tokens; the prompt has "
                                f"{prompt_tokens} and {param}={max_tokens} asks for {max_tokens} more "
                                f"({prompt_tokens + max_tokens}); shorten the prompt or lower {param}", param=param)

    # -- engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not (self._commands or self._running or self._admissible()):
                    if self._stopping and not self._waiting:
                        self._end_rows()
                        return
                    self._cv.wait(0.05 if self._waiting else 0.5)
                    continue
                commands = list(self._commands)
                self._commands.clear()
            if commands:
                self._end_rows()  # adapters may come and go
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._decode()
            except Exception as exc:  # a failed step fails its requests, not the server
                log.exception("decoding step failed")
                self._end_rows()
                self._fail_all(exc)

    def _admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) < self.max_batch_size

    def _fail_all(self, exc: Exception) -> None:
        error = exc if isinstance(exc, APIError) else APIError(500, f"generation failed: {type(exc).__name__}: {exc}")
        for request in {c.request for c in self._running}:
            request.emit(("error", error))
            self.pool.release(request.adapter)
        self._running, self._cache, self._mask = [], None, None
        self.metrics.running.set(0)

    def _drop_cancelled(self) -> None:
        gone = [c for c in self._running if c.request.cancelled]
        if gone:
            for request in {c.request for c in gone}:
                self.pool.release(request.adapter)
            self._keep([i for i, c in enumerate(self._running) if not c.request.cancelled])

    def _admit(self) -> None:
        """Starts waiting requests while there are free slots and their adapter can be resident;
        their prompts run together, in chunks of at most ``PREFILL_TOKENS`` padded tokens."""
        admitted: list[GenerationRequest] = []
        free = self.max_batch_size - len(self._running)
        with self._cv:
            candidates = list(self._waiting)
        for request in candidates:
            if request.cancelled:
                self._dequeue(request)
                continue
            if request.params.n > free:
                continue
            self._end_rows()  # prefills and perhaps an adapter load come next
            try:
                if not self.pool.acquire(request.adapter):
                    continue  # every resident adapter is in use; wait for one to free
            except APIError as exc:
                self._dequeue(request)
                request.emit(("error", exc))
                continue
            self._dequeue(request)
            admitted.append(request)
            free -= request.params.n
        started: list[tuple[_Choice, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        for chunk in _chunks(admitted, PREFILL_TOKENS):
            try:
                started.extend(self._prefill(chunk))
            except Exception as exc:
                error = exc if isinstance(exc, APIError) else APIError(
                    500, f"prefill failed: {type(exc).__name__}: {exc}")
                for request in chunk:
                    self.pool.release(request.adapter)
                    request.emit(("error", error))
        if started:
            self._join(started)

    def _dequeue(self, request: GenerationRequest) -> None:
        with self._cv:
            try:
                self._waiting.remove(request)
            except ValueError:
                pass
            self.metrics.queue_depth.set(len(self._waiting))

    def _adapter_kwargs(self, names: list[str | None]) -> dict[str, Any]:
        model = self.pool.model
        if model is self.pool.base:  # no adapter was ever loaded
            return {}
        return {"adapter_names": [self.pool.row_name(n) for n in names]}

    def _set_rows(self, names: list[str | None]) -> None:
        """Each decoding row's adapter, kept set on the layers until the batch changes."""
        if names == self._row_names:
            return
        self._end_rows()
        if self.pool.model is self.pool.base:
            return
        from peftkit.core.layer import per_example_adapters

        rows = per_example_adapters(self.pool.model.get_base_model(), [self.pool.row_name(n) for n in names])
        rows.__enter__()
        self._rows, self._row_names = rows, list(names)

    def _end_rows(self) -> None:
        if self._rows is not None:
            self._rows.__exit__(None, None, None)
        self._rows, self._row_names = None, None

    def _forward(self, names: list[str | None] | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The model's last-position logits and cache; ``names`` None: the rows set by ``_set_rows``."""
        if self._keep_arg:
            kwargs["logits_to_keep"] = 1
        adapters = self._adapter_kwargs(names) if names is not None else {}
        with torch.inference_mode():
            out = self.pool.model(use_cache=True, **kwargs, **adapters)
        cache = out.get("cache") if "cache" in out else out.past_key_values
        return out.logits[:, -1, :], cache

    def _prefill(self, requests: list[GenerationRequest]) -> list[tuple[_Choice, list]]:
        """Runs the prompts in one forward pass (left-padded, each row with its adapter), samples
        each choice's first token, and returns the choices still going with their caches."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(len(requests), width, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits, cache = self._forward([r.adapter for r in requests], input_ids=ids, attention_mask=mask,
                                      position_ids=positions)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        joined = []
        for row, request in enumerate(requests):
            length = len(request.prompt_ids)
            self.metrics.prompt_tokens.labels(model=request.adapter or "base").inc(length)
            own = [(k[row:row + 1, :, width - length:], v[row:row + 1, :, width - length:]) for k, v in layers]
            going = 0
            for index in range(request.params.n):
                choice = _Choice(request, index)
                choice.cached = length
                if not self._append(choice, next_token(logits[row], request.params, choice.generator)):
                    joined.append((choice, own))
                    going += 1
            if not going:
                self.pool.release(request.adapter)
        return joined

    def _join(self, new: list[tuple[_Choice, list[tuple[torch.Tensor, torch.Tensor]]]]) -> None:
        """Adds prefilled sequences to the batch cache, padding the shorter ones on the left."""
        from transformers import DynamicCache

        width = max([c.cached for c, _ in new] + ([self._mask.shape[1]] if self._mask is not None else []))
        old = [(layer.keys, layer.values) for layer in self._cache.layers] if self._cache is not None else None
        data = []
        for i in range(len(new[0][1])):
            keys = [_pad_left(old[i][0], width - self._mask.shape[1])] if old else []
            values = [_pad_left(old[i][1], width - self._mask.shape[1])] if old else []
            for choice, layers in new:
                keys.append(_pad_left(layers[i][0], width - choice.cached))
                values.append(_pad_left(layers[i][1], width - choice.cached))
            data.append((torch.cat(keys), torch.cat(values)))
        masks = [torch.cat([torch.zeros(self._mask.shape[0], width - self._mask.shape[1], dtype=torch.long),
                            self._mask], dim=1)] if self._mask is not None else []
        for choice, _ in new:
            row = torch.zeros(1, width, dtype=torch.long)
            row[0, width - choice.cached:] = 1
            masks.append(row)
        self._cache = DynamicCache(ddp_cache_data=data)
        self._mask = torch.cat(masks)
        self._running.extend(c for c, _ in new)
        self.metrics.running.set(len(self._running))

    def _keep(self, rows: list[int]) -> None:
        """Keeps only ``rows`` of the batch, and drops the left padding no row needs any more."""
        from transformers import DynamicCache

        self._running = [self._running[i] for i in rows]
        self.metrics.running.set(len(self._running))
        if not rows:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(rows)
        mask = self._mask.index_select(0, index)
        start = int(torch.nonzero(mask.sum(0))[0])
        self._mask = mask[:, start:]
        self._cache = DynamicCache(ddp_cache_data=[
            (layer.keys.index_select(0, index)[..., start:, :], layer.values.index_select(0, index)[..., start:, :])
            for layer in self._cache.layers])

    def _decode(self) -> None:
        """One token for every running sequence, in one forward pass."""
        running = self._running
        ids = torch.tensor([[c.tokens[-1]] for c in running])
        self._mask = torch.cat([self._mask, torch.ones(len(running), 1, dtype=torch.long)], dim=1)
        positions = torch.tensor([[c.cached] for c in running])
        self._set_rows([c.request.adapter for c in running])
        logits, self._cache = self._forward(None, input_ids=ids,
                                            attention_mask=self._mask, position_ids=positions,
                                            **{self._cache_arg: self._cache})
        self.metrics.batch_size.observe(len(running))
        greedy = torch.argmax(logits, dim=-1).tolist()
        keep = []
        for row, choice in enumerate(running):
            choice.cached += 1
            params = choice.request.params
            token = greedy[row] if params.greedy else next_token(logits[row], params, choice.generator)
            if not self._append(choice, token):
                keep.append(row)
            elif choice.request.open_choices == 0:
                self.pool.release(choice.request.adapter)
        if len(keep) < len(running):
            self._keep(keep)

    def _append(self, choice: _Choice, token: int) -> bool:
        """Adds ``token`` to ``choice`` and emits the new text; True when the choice is finished."""
        request, params = choice.request, choice.request.params
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
            self.metrics.ttft.observe(request.first_token_at - request.arrival)
        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            choice.tokens.append(token)
            request.completion_tokens += 1
            self.metrics.generated_tokens.labels(model=request.adapter or "base").inc()
            if len(choice.tokens) >= params.max_tokens or choice.cached + 1 >= self.max_model_len:
                finish = "length"
        text = self.tokenizer.decode(choice.tokens, skip_special_tokens=True)
        if params.stop:
            hits = [i for i in (text.find(s, max(0, len(choice.sent) - len(s))) for s in params.stop) if i >= 0]
            if hits:
                text, finish = text[:min(hits)], "stop"
        visible = len(text)
        if finish is None:  # hold back what may turn into a stop string or an unfinished character
            visible -= max((len(s) - 1 for s in params.stop), default=0)
            while visible > 0 and text[visible - 1] == "\ufffd":
                visible -= 1
        delta = text[len(choice.sent):visible] if visible > len(choice.sent) else ""
        if delta or finish:
            choice.sent += delta
            request.emit(("delta", choice.index, delta, finish))
        if finish:
            request.open_choices -= 1
            if request.open_choices == 0:
                request.emit(("done", {"prompt_tokens": len(request.prompt_ids),
                                       "completion_tokens": request.completion_tokens}))
        return finish is not None
