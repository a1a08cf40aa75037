"""Prometheus metrics of one server (its own registry, so several servers in one process
do not mix their counts)."""

from __future__ import annotations

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests by route and status, tokens in and out, latency and time to first token,
    decode batch sizes, resident adapters and queue depth."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("peftkit_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("peftkit_generation_tokens", "tokens generated", ["model"], registry=r)
        self.latency = Histogram("peftkit_request_latency_seconds", "time from arrival to the last token",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("peftkit_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("peftkit_decode_batch_size", "sequences decoded together per step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.resident_adapters = Gauge("peftkit_resident_adapters", "adapters loaded in memory", registry=r)
        self.known_adapters = Gauge("peftkit_known_adapters", "adapters the server can serve", registry=r)
        self.queue_depth = Gauge("peftkit_queue_depth", "requests waiting to start", registry=r)
        self.running = Gauge("peftkit_running_sequences", "sequences being decoded", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_request(self, route: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        if seconds is not None and status < 400:
            self.latency.labels(route=route).observe(seconds)

