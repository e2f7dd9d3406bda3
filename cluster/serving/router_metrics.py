"""Prometheus metrics of a router process: the serving metrics of every request it routes
(as one engine's, recorded by the router) plus, per replica, its load and cache counters
(label `replica`), and the router's own decisions, predicted hits, migrations and mirror
resyncs. One registry, no global state."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from quire.cluster.serving.metrics import ServerMetrics


class RouterMetrics(ServerMetrics):
    def __init__(self, model_name: str):
        super().__init__(model_name)
        r, base = self.registry, ["model_name"]
        self._base = {"model_name": model_name}

        def gauge(name, doc, extra=("replica",)):
            return Gauge(name, doc, [*base, *extra], registry=r)

        def counter(name, doc, extra=("replica",)):
            return Counter(name, doc, [*base, *extra], registry=r)

        self._replica_up = gauge("quire_replica_up", "1 while the replica serves, 0 while it is dead or replaced")
        self._replica_running = gauge("quire_replica_num_requests_running", "Requests being generated, per replica")
        self._replica_waiting = gauge("quire_replica_num_requests_waiting", "Requests queued, per replica")
        self._replica_kv = gauge("quire_replica_kv_cache_usage_ratio", "Share of KV blocks in use, per replica")
        self._replica_queries = counter("quire_replica_prefix_cache_queries",
                                        "Prompt tokens looked up in the replica's prefix cache")
        self._replica_hits = counter("quire_replica_prefix_cache_hits",
                                     "Prompt tokens found in the replica's prefix cache (either tier)")
        self._replica_host_hits = counter("quire_replica_prefix_cache_host_hits",
                                          "Prompt tokens found in the replica's host-memory tier (copied back)")
        self._replica_preemptions = counter("quire_replica_num_preemptions", "Requests preempted on the replica")
        self._decisions = counter("quire_router_decisions", "Requests routed, by policy and replica",
                                  ("policy", "replica"))
        self._predicted = counter("quire_router_predicted_cached_tokens",
                                  "Prompt tokens the mirror predicted cached on the chosen replica")
        self._migrations = counter("quire_router_migrations", "Samples moved off a dead replica", ())
        self._resyncs = counter("quire_router_mirror_resyncs",
                                "Times a replica's mirror was rebuilt from a snapshot (a gap or a restart)", ())
        self._scale_events = counter("quire_router_scale_events",
                                     "Replicas added (up) or drained (down), by hand or by the autoscaler",
                                     ("direction",))
        self._seen: dict[tuple[str, str], int] = {}  # the replicas' running totals already counted

    def on_routed(self, policy: str, replica: str, predicted_cached_tokens: int) -> None:
        self._decisions.labels(policy=policy, replica=replica, **self._base).inc()
        self._predicted.labels(replica=replica, **self._base).inc(predicted_cached_tokens)

    def on_migrated(self) -> None:
        self._migrations.labels(**self._base).inc()

    def on_scaled(self, direction: str) -> None:
        self._scale_events.labels(direction=direction, **self._base).inc()

    def on_mirror_resync(self) -> None:
        self._resyncs.labels(**self._base).inc()

    def publish_replica(self, replica: str, up: bool, num_running: int, num_waiting: int, kv_usage: float,
                        counters: dict[str, int]) -> None:
        """Set a replica's gauges; `counters` are its running totals (a restarted replica starts
        again from zero: only increases are counted)."""
        labels = {"replica": replica, **self._base}
        self._replica_up.labels(**labels).set(1 if up else 0)
        self._replica_running.labels(**labels).set(num_running)
        self._replica_waiting.labels(**labels).set(num_waiting)
        self._replica_kv.labels(**labels).set(kv_usage)
        for name, counter in (("num_query_tokens", self._replica_queries), ("num_hit_tokens", self._replica_hits),
                              ("num_host_hit_tokens", self._replica_host_hits),
                              ("num_preemptions", self._replica_preemptions)):
            total = counters.get(name, 0)
            seen = self._seen.get((replica, name), 0)
            if total < seen:  # a new replica under the same name
                seen = 0
            if total > seen:
                counter.labels(**labels).inc(total - seen)
            self._seen[(replica, name)] = total
