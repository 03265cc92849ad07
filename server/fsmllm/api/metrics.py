"""Prometheus metrics of one server (a registry per app, so several apps can live in one process), with the
standard process and Python collectors that common dashboards read (``process_*``, ``python_*``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from starlette.routing import compile_path

#: the ``route`` label of a request no route matched (a scanner's paths make no new series)
UNMATCHED = "unmatched"


class RouteLabels:
    """The ``route`` label of a request: the template its path matches (``/v1/models/{model_id}``, whatever the
    method), or :data:`UNMATCHED`; so the label takes one value per route of the app. ``templates`` is called
    once, at the first request, when every route is in place."""

    def __init__(self, templates: Callable[[], Iterable[str]]) -> None:
        self._templates = templates
        self._compiled: list[tuple[re.Pattern[str], str]] | None = None

    def __call__(self, path: str) -> str:
        if self._compiled is None:
            self._compiled = [(compile_path(template)[0], template) for template in self._templates()]
        return next((template for pattern, template in self._compiled if pattern.match(path)), UNMATCHED)


class Metrics:
    """Requests, latency, queue depth, noise samples, batch fill and generations (GET /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # the process's, shared by the apps
            self.registry.register(collector)
        self.requests = Counter(
            "fsmllm_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "fsmllm_request_seconds",
            "request latency by route",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.queue_depth = Gauge("fsmllm_queue_depth", "certification jobs queued or running", registry=self.registry)
        self.noise_samples = Counter("fsmllm_noise_samples", "noisy images encoded", registry=self.registry)
        self.batches = Counter(
            "fsmllm_encoder_batches", "encoder batches run by the device worker", registry=self.registry
        )
        self.batch_fill = Histogram(
            "fsmllm_batch_fill",
            "fraction of each encoder batch filled with samples",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=self.registry,
        )
        self.samples_per_second = Gauge(
            "fsmllm_noise_samples_per_second", "encoder throughput of the last batch", registry=self.registry
        )
        self.generations = Counter(
            "fsmllm_generations",
            "language-model generations by outcome: completed, cancelled (the client went away), failed",
            ["outcome"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "fsmllm_generated_tokens", "tokens generated, cancelled generations included", registry=self.registry
        )
        self.generations_running = Gauge(
            "fsmllm_generations_running", "language-model generations in progress", registry=self.registry
        )
        self.torch_threads = Gauge(
            "fsmllm_torch_threads", "torch CPU threads of this process (FSMLLM_THREADS)", registry=self.registry
        )
        self.torch_threads.set_function(torch.get_num_threads)

    def record_generation(self, event: str, tokens: int) -> None:
        """Called by the runtime when a generation starts ("started") and when it ends (its outcome)."""
        if event == "started":
            self.generations_running.inc()
            return
        self.generations_running.dec()
        self.generations.labels(event).inc()
        self.generated_tokens.inc(tokens)

    def record_batch(self, samples: int, batch_size: int, seconds: float) -> None:
        """Called by the device worker after each encoder batch."""
        self.noise_samples.inc(samples)
        self.batches.inc()
        self.batch_fill.observe(samples / batch_size)
        if seconds > 0:
            self.samples_per_second.set(samples / seconds)
