"""The server's Prometheus metrics, in a registry of its own (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests by route and status, tokens in and out, decode steps (batch size and
    latency), the queue, and the sessions in memory and in the store."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mambastep_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.tokens_in = Counter("mambastep_tokens_in", "Tokens read from requests", registry=r)
        self.tokens_out = Counter("mambastep_tokens_out", "Tokens generated", registry=r)
        self.step_seconds = Histogram(
            "mambastep_step_seconds", "Seconds per decode step", buckets=STEP_BUCKETS, registry=r
        )
        self.batch = Histogram("mambastep_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("mambastep_queue_depth", "Requests waiting for or running on the model", registry=r)
        self.sessions_in_memory = Gauge("mambastep_sessions_in_memory", "Sessions held in memory", registry=r)
        self.sessions_stored = Gauge("mambastep_sessions_stored", "Sessions in the store", registry=r)

    def step(self, batch: int, seconds: float) -> None:
        """One decode step of ``batch`` sequences (called on the scheduler's thread)."""
        self.batch.observe(batch)
        self.step_seconds.observe(seconds)

    def text(self) -> bytes:
        """The exposition format that Prometheus scrapes."""
        return generate_latest(self.registry)
