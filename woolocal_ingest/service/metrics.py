"""Prometheus metrics of one service app, in its own registry (never the global one: tests build many apps)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

MODEL_STATES = ["loading", "ready", "failed"]
RATE_WINDOW_S = 60.0


class _RateCollector:
    """`woolocal_embeddings_per_second{model}`: texts embedded per second over the last minute."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._events: dict[str, deque[tuple[float, int]]] = {}

    def add(self, model: str, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._events.setdefault(model, deque(maxlen=10_000))  # bounded: memory stays flat under load
            q.append((now, n))
            self._prune(q, now)

    def _prune(self, q: deque, now: float) -> None:
        while q and now - q[0][0] > self.window_s:
            q.popleft()

    def rate(self, model: str) -> float:
        now = time.monotonic()
        with self._lock:
            q = self._events.get(model)
            if not q:
                return 0.0
            self._prune(q, now)
            return sum(n for _, n in q) / self.window_s

    def describe(self):
        return [GaugeMetricFamily("woolocal_embeddings_per_second",
                                  "Texts embedded per second, averaged over the last 60 s", labels=["model"])]

    def collect(self):
        g = GaugeMetricFamily("woolocal_embeddings_per_second",
                              "Texts embedded per second, averaged over the last 60 s", labels=["model"])
        with self._lock:
            models = list(self._events)
        for m in models:
            g.add_metric([m], self.rate(m))
        yield g


class ServiceMetrics:
    """Requests, latency, queue depth, throughput, per-model memory and load state."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("woolocal_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("woolocal_request_duration_seconds", "HTTP request latency by route", ["route"],
                                 buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=r)
        self.queue_depth = Gauge("woolocal_queue_depth", "Texts waiting in the dynamic batcher's queue", registry=r)
        self.queue_capacity = Gauge("woolocal_queue_capacity", "Texts the queue holds before answering 429",
                                    registry=r)
        self.in_flight = Gauge("woolocal_texts_in_flight", "Texts taken from the queue and being embedded now",
                               registry=r)
        self.embedded = Counter("woolocal_embedded_texts", "Texts embedded, by model", ["model"], registry=r)
        self.embedded_tokens = Counter("woolocal_embedded_tokens", "Model tokens embedded (special tokens "
                                       "included, after truncation), by model", ["model"], registry=r)
        self.batch_texts = Histogram("woolocal_batch_texts", "Texts per forward batch of the dynamic batcher",
                                     ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_seconds = Histogram("woolocal_batch_seconds", "Seconds per forward batch", ["model"],
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=r)
        self.rejected = Counter("woolocal_rejected_requests", "Requests refused before embedding, by reason "
                                "(queue_full, loading, auth, too_large)", ["reason"], registry=r)
        self.truncated = Counter("woolocal_truncated_inputs", "Inputs cut to the model's max tokens", ["model"],
                                 registry=r)
        self.model_status = Enum("woolocal_model_status", "Load state of each served model", ["model"],
                                 states=MODEL_STATES, registry=r)
        self.model_memory = Gauge("woolocal_model_memory_bytes", "Memory of each loaded model's weights "
                                  "(parameters x 4 bytes, float32)", ["model"], registry=r)
        self.model_dim = Gauge("woolocal_model_dimensions", "Embedding dimension of each served model", ["model"],
                               registry=r)
        self.model_load_seconds = Gauge("woolocal_model_load_seconds", "Seconds the model took to load",
                                        ["model"], registry=r)
        self._rate = _RateCollector()
        r.register(self._rate)
        try:
            ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (Linux /proc)
        except Exception:  # pragma: no cover - platforms without /proc
            pass

    def bind_queue(self, depth: Callable[[], float], in_flight: Callable[[], float], capacity: int) -> None:
        self.queue_depth.set_function(depth)
        self.in_flight.set_function(in_flight)
        self.queue_capacity.set(capacity)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, model: str, texts: int, tokens: int, seconds: float) -> None:
        self.embedded.labels(model).inc(texts)
        self.embedded_tokens.labels(model).inc(tokens)
        self.batch_texts.labels(model).observe(texts)
        self.batch_seconds.labels(model).observe(seconds)
        self._rate.add(model, texts)

    def embeddings_per_second(self, model: str) -> float:
        return self._rate.rate(model)

    def set_model_state(self, model: str, state: str, *, memory_bytes: int | None = None, dim: int | None = None,
                        load_seconds: float | None = None) -> None:
        self.model_status.labels(model).state(state)
        if memory_bytes is not None:
            self.model_memory.labels(model).set(memory_bytes)
        if dim is not None:
            self.model_dim.labels(model).set(dim)
        if load_seconds is not None:
            self.model_load_seconds.labels(model).set(load_seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
