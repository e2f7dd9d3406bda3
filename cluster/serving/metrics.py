"""Prometheus metrics of a serving process, in a registry of their own (no global state).

Recorded by the engine loop thread of `AsyncEngine` (requests, tokens, latencies) and
read by `/metrics`; prometheus-client's metrics are thread-safe. Names follow
Prometheus conventions (`_total` on counters, base units), prefixed `quire_`.
"""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                  0.4, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    """Counters, gauges and latency histograms of one server; `render()` is the /metrics body."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, ["model_name", *extra], registry=r)

        self._requests = counter("quire_requests", "Finished requests, by finish reason", ["finish_reason"])
        self._prompt_tokens = counter("quire_prompt_tokens", "Prompt tokens of admitted requests").labels(**labels)
        self._generation_tokens = counter("quire_generation_tokens", "Generated tokens").labels(**labels)
        self._preemptions = counter("quire_num_preemptions", "Requests preempted (their KV cache freed)").labels(
            **labels)
        self._prefix_queries = counter("quire_prefix_cache_queries",
                                       "Prompt tokens looked up in the prefix cache").labels(**labels)
        self._prefix_hits = counter("quire_prefix_cache_hits",
                                    "Prompt tokens found in the prefix cache (either tier)").labels(**labels)
        self._prefix_host_hits = counter("quire_prefix_cache_host_hits",
                                         "Prompt tokens found in the host-memory tier (copied back to the device)"
                                         ).labels(**labels)
        self._host_offloads = counter("quire_kv_host_offloaded_blocks",
                                      "Cached blocks copied from the device to the host-memory tier on eviction"
                                      ).labels(**labels)
        self._worker_restarts = counter("quire_worker_restarts",
                                        "Times the workers were replaced after one died").labels(**labels)
        self._rejected = counter("quire_requests_rejected", "Requests refused before admission", ["reason"])
        self._ttft = Histogram("quire_time_to_first_token_seconds", "Arrival to first token", ["model_name"],
                               buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self._tpot = Histogram("quire_time_per_output_token_seconds",
                               "Mean time between output tokens, per finished request",
                               ["model_name"], buckets=_TOKEN_BUCKETS, registry=r).labels(**labels)
        self._e2e = Histogram("quire_e2e_request_latency_seconds", "Arrival to last token", ["model_name"],
                              buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self._running = Gauge("quire_num_requests_running", "Requests being generated", ["model_name"],
                              registry=r).labels(**labels)
        self._waiting = Gauge("quire_num_requests_waiting", "Requests queued", ["model_name"],
                              registry=r).labels(**labels)
        self._kv_usage = Gauge("quire_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0-1)", ["model_name"],
                               registry=r).labels(**labels)
        self._labels = labels
        self._seen = {"preemptions": 0, "queries": 0, "hits": 0, "host_hits": 0, "offloads": 0, "restarts": 0}

    def on_admitted(self, num_prompt_tokens: int) -> None:
        self._prompt_tokens.inc(num_prompt_tokens)

    def on_rejected(self, reason: str) -> None:
        """A request refused before it reached the engine's queue ("queue_full", "invalid")."""
        self._rejected.labels(reason=reason, **self._labels).inc()

    def on_first_token(self, seconds_since_arrival: float) -> None:
        self._ttft.observe(seconds_since_arrival)

    def on_tokens(self, count: int) -> None:
        self._generation_tokens.inc(count)

    def on_finished(self, finish_reason: str, num_output_tokens: int, seconds_since_arrival: float,
                    seconds_to_first_token: float | None) -> None:
        self._requests.labels(finish_reason=finish_reason, **self._labels).inc()
        if seconds_to_first_token is None:  # aborted before its first token
            return
        self._e2e.observe(seconds_since_arrival)
        if num_output_tokens > 1:
            self._tpot.observe((seconds_since_arrival - seconds_to_first_token) / (num_output_tokens - 1))

    def publish_load(self, num_running: int, num_waiting: int, kv_usage: float, num_preemptions: int,
                     prefix_query_tokens: int = 0, prefix_hit_tokens: int = 0, worker_restarts: int = 0,
                     prefix_host_hit_tokens: int = 0, host_offloaded_blocks: int = 0) -> None:
        """Set the gauges; the counts are the engine's running totals."""
        self._running.set(num_running)
        self._waiting.set(num_waiting)
        self._kv_usage.set(kv_usage)
        for name, counter, total in (("preemptions", self._preemptions, num_preemptions),
                                     ("queries", self._prefix_queries, prefix_query_tokens),
                                     ("hits", self._prefix_hits, prefix_hit_tokens),
                                     ("host_hits", self._prefix_host_hits, prefix_host_hit_tokens),
                                     ("offloads", self._host_offloads, host_offloaded_blocks),
                                     ("restarts", self._worker_restarts, worker_restarts)):
            if total > self._seen[name]:
                counter.inc(total - self._seen[name])
                self._seen[name] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
