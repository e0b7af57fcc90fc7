"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hstu_opt.serve.kv_cache import CacheStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _CacheCollector:
    """Reads the runner's cache statistics at scrape time (the store itself stays free of prometheus)."""

    def __init__(self, stats: Callable[[], CacheStats | None], budget_bytes: int):
        self.stats, self.budget_bytes = stats, budget_bytes

    def collect(self):
        s = self.stats() or CacheStats()
        for name, value, doc in (("hits", s.hits, "cache lookups that found the user's K/V"),
                                 ("misses", s.misses, "cache lookups that had to prefill"),
                                 ("evictions", s.evictions, "entries evicted to stay within the byte budget"),
                                 ("too_large", s.too_large, "entries larger than the whole budget (not stored)"),
                                 ("host_hits", s.host_hits, "hits found in the host tier (promoted first)"),
                                 ("promotions", s.promotions, "entries moved host tier -> device pool on a hit"),
                                 ("demotions", s.demotions, "entries moved device pool -> host tier on eviction"),
                                 ("prefetches", s.prefetches, "entries moved host tier -> device pool ahead of a "
                                                              "request (the policy's prefetch)"),
                                 ("no_room", s.no_room, "entries not stored: every page pinned by the running batch")):
            yield CounterMetricFamily(f"hstu_serve_cache_{name}", doc, value=value)
        yield GaugeMetricFamily("hstu_serve_cache_bytes", "bytes of K/V held in the device pool (whole pages)",
                                value=s.bytes)
        yield GaugeMetricFamily("hstu_serve_cache_entries", "users' K/V entries held in the device pool", value=s.entries)
        tiers = GaugeMetricFamily("hstu_serve_cache_tier_bytes", "bytes of K/V held, by tier", labels=["tier"])
        tiers.add_metric(["device"], s.bytes)
        tiers.add_metric(["host"], s.host_bytes)
        yield tiers
        yield GaugeMetricFamily("hstu_serve_cache_host_entries", "users' K/V entries held in the host tier",
                                value=s.host_entries)
        yield GaugeMetricFamily("hstu_serve_cache_budget_bytes", "the byte budget (0: cache off)", value=self.budget_bytes)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hstu_serve_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("hstu_serve_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("hstu_serve_requests_in_progress", "HTTP requests being handled", registry=r)
        self.batch_size = Histogram("hstu_serve_batch_size", "requests per engine batch, by kind", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("hstu_serve_queue_depth", "requests waiting for a batch", registry=r)
        self.active = 0  # in_progress as a plain count, for the runner (touched on the event loop only)

    def alone(self) -> bool:
        """Whether at most one request is being handled (the one asking)."""
        return self.active <= 1

    def observe_batch(self, kind: str, size: int) -> None:
        self.batch_size.labels(kind).observe(size)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def watch_cache(self, stats: Callable[[], CacheStats | None], budget_bytes: int) -> None:
        self.registry.register(_CacheCollector(stats, budget_bytes))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
