"""Encoders and classifiers: ``/v1/embeddings`` and ``/classify``.

A request is one forward pass over its inputs with its adapter, so requests are not
interleaved token by token as generation is; one thread owns the model and runs them in
arrival order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from peftkit.serve.adapters import AdapterPool
from peftkit.serve.loading import context_length
from peftkit.serve.metrics import Metrics


class EncoderEngine:
    """Runs embedding and classification requests over a base and its adapters."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, adapters: dict[str, str] | None = None,
                 max_adapters: int = 8, max_model_len: int | None = None, labels: list[str] | None = None,
                 metrics: Metrics | None = None, max_batch_size: int = 32) -> None:
        self.tokenizer = tokenizer
        self.metrics = metrics or Metrics()
        self.pool = AdapterPool(model, dict(adapters or {}), max_adapters, self.metrics)
        self.max_model_len = context_length(model, max_model_len, default=512)
        self.labels = labels
        self.max_batch_size = max_batch_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftkit-encoder")

    def start(self) -> None:
        pass

    def stop(self, timeout: float | None = None) -> None:
        self._executor.shutdown(wait=True)

    def call(self, fn: Any) -> Future:
        return self._executor.submit(fn)

    def _run(self, texts: list[str], adapter: str | None) -> tuple[Any, int]:
        self.pool.acquire(adapter)
        try:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_model_len, return_tensors="pt")
            model = self.pool.model
            kwargs = {} if model is self.pool.base else {"adapter_names": [self.pool.row_name(adapter)] * len(texts)}
            with torch.inference_mode():
                out = model(**enc, output_hidden_states=True, **kwargs)
            tokens = int(enc["attention_mask"].sum())
            self.metrics.prompt_tokens.labels(model=adapter or "base").inc(tokens)
            return (out, enc["attention_mask"]), tokens
        finally:
            self.pool.release(adapter)

    def embed(self, texts: list[str], adapter: str | None) -> Future:
        """Mean of the last hidden states over the real tokens, L2-normalised (sentence embeddings)."""
        def work():
            vectors, total = [], 0
            for start in range(0, len(texts), self.max_batch_size):
                (out, mask), tokens = self._run(texts[start:start + self.max_batch_size], adapter)
                hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
                vectors.extend(torch.nn.functional.normalize(pooled.float(), dim=-1).tolist())
                total += tokens
            return vectors, total
        return self.call(work)

    def classify(self, texts: list[str], adapter: str | None) -> Future:
        """Label probabilities (softmax of the classifier's logits) per input."""
        def work():
            rows, total = [], 0
            for start in range(0, len(texts), self.max_batch_size):
                (out, _mask), tokens = self._run(texts[start:start + self.max_batch_size], adapter)
                rows.extend(torch.softmax(out.logits.float(), dim=-1).tolist())
                total += tokens
            return rows, total
        return self.call(work)
