"""Prometheus metrics of one server, in a registry of its own (so that tests can run several)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# seconds: from a few milliseconds (a small model, idle server) to a minute (a long queue)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """What the server counts: requests by status, queue, batch, characters and latencies."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chargpt_requests", "HTTP requests answered", ["path", "status"], registry=r
        )
        self.queue_depth = Gauge(
            "chargpt_queue_depth", "sequences waiting for a place in the batch", registry=r
        )
        self.running = Gauge("chargpt_running_sequences", "sequences in the batch", registry=r)
        self.batch_size = Histogram(
            "chargpt_batch_size",
            "sequences that sampled a character together, per decode step",
            buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch}),
            registry=r,
        )
        self.characters = Counter("chargpt_generated_characters", "characters sampled", registry=r)
        self.time_to_first_character = Histogram(
            "chargpt_time_to_first_character_seconds",
            "from a request's arrival to its first sampled character, per choice",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.character_latency = Histogram(
            "chargpt_character_latency_seconds",
            "between two consecutive characters of one choice",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
