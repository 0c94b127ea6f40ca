"""Prometheus metrics of one server process (its own registry: no global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


OTHER_KEYS = "(other)"


class Metrics:
    """The instruments impasto updates; `render()` is what GET /metrics serves.

    Per-key series are labelled with the key's name; past `max_key_labels` distinct names,
    further keys share the label `(other)`, so a server with thousands of keys cannot grow
    the scrape without bound."""

    def __init__(self, max_key_labels: int = 50) -> None:
        self.registry = CollectorRegistry()
        self._max_key_labels = max_key_labels
        self._key_labels: set[str] = set()
        self.key_tasks = Counter(
            "impasto_key_tasks_total",
            "Tasks by API key name and outcome (ok or the error code)",
            ["key", "outcome"],
            registry=self.registry,
        )
        self.key_images = Counter(
            "impasto_key_images_total",
            "Images finished, by API key name",
            ["key"],
            registry=self.registry,
        )
        self.key_cost = Counter(
            "impasto_key_cost_total",
            "Cost of the images finished, by API key name",
            ["key"],
            registry=self.registry,
        )
        self.tasks = Counter(
            "impasto_tasks_total",
            "Tasks handled, by type and outcome (ok or the error code)",
            ["task_type", "outcome"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "impasto_batch_size",
            "Jobs per backend call",
            ["model"],
            buckets=BATCH_SIZES,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "impasto_batch_seconds",
            "Seconds per backend call",
            ["model"],
            buckets=SECONDS,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "impasto_deliveries_total",
            "Webhook and upload deliveries settled, by kind and result",
            ["kind", "result"],
            registry=self.registry,
        )
        self._queued = Gauge(
            "impasto_queued_jobs", "Jobs waiting for a backend", registry=self.registry
        )
        self._sessions = Gauge(
            "impasto_ws_sessions",
            "WebSocket sessions (attached or buffering)",
            registry=self.registry,
        )

    def key_label(self, name: str) -> str:
        """`name`, or `(other)` once the label budget is spent on other names."""
        if name in self._key_labels:
            return name
        if len(self._key_labels) >= self._max_key_labels:
            return OTHER_KEYS
        self._key_labels.add(name)
        return name

    def observe_image(self, key_name: str, cost: float) -> None:
        label = self.key_label(key_name)
        self.key_images.labels(label).inc()
        self.key_cost.labels(label).inc(cost)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    def track(self, queued: Callable[[], int], sessions: Callable[[], int]) -> None:
        self._queued.set_function(queued)
        self._sessions.set_function(sessions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
