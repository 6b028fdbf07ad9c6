"""Prometheus metrics for the API, on a registry owned by the daemon."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..backends.base import BackendLoad

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _LoadCollector:
    """Reads queue depth from the backends at scrape time instead of tracking it twice."""

    def __init__(self, load: Callable[[], BackendLoad]) -> None:
        self._load = load

    def collect(self):  # type: ignore[no-untyped-def]
        load = self._load()
        queued = GaugeMetricFamily("meshd_backend_queued_requests", "Requests waiting for a local model")
        queued.add_metric([], load.queued)
        running = GaugeMetricFamily("meshd_backend_running_requests", "Requests executing on a local model")
        running.add_metric([], load.in_flight)
        return [queued, running]


class ApiMetrics:
    def __init__(self, load: Callable[[], BackendLoad]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "meshd_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "meshd_request_duration_seconds", "End-to-end request latency", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            "meshd_time_to_first_token_seconds", "Time from request arrival to the first token", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter(
            "meshd_tokens", "Tokens processed", ["model", "kind"], registry=self.registry
        )
        self.in_flight = Gauge(
            "meshd_requests_in_flight", "HTTP requests being handled", ["route"], registry=self.registry
        )
        self.registry.register(_LoadCollector(load))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ApiMetrics"]
