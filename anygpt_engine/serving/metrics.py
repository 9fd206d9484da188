"""Prometheus metrics of one server (its own registry, so several servers fit in one process).

Engine state (requests running and waiting, KV blocks, prefix cache, preemptions) is read from
the engine thread at scrape time; per-request latencies and token counts are observed as each
request ends. Names follow vLLM's with an `anygpt_` prefix.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Gauges and counters of the engine's last stats snapshot."""

    def __init__(self):
        self.snapshot: dict = {}

    def collect(self):
        s = self.snapshot
        if not s:
            return
        gauges = (("anygpt_requests_running", "Requests in the running batch", s["running"]),
                  ("anygpt_requests_waiting", "Requests waiting for a batch slot or KV blocks", s["waiting"]),
                  ("anygpt_kv_blocks_used", "KV blocks held by live requests", s["used_blocks"]),
                  ("anygpt_kv_blocks_free", "KV blocks free (not holding any cached prefix)", s["free_blocks"]),
                  ("anygpt_kv_blocks_cached", "KV blocks free but holding a cached prefix (evictable)",
                   s["cached_blocks"]),
                  ("anygpt_kv_blocks_total", "KV blocks in the pool", s["total_blocks"]),
                  ("anygpt_kv_cache_usage_ratio", "Fraction of KV blocks held by live requests",
                   s["used_blocks"] / max(1, s["total_blocks"])),
                  ("anygpt_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens admitted",
                   s["prefix_cache_hit_rate"]))
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        counters = (("anygpt_prefix_cache_hits", "Prompt tokens served from the prefix cache", s["prefix_hits"]),
                    ("anygpt_prefix_cache_queries", "Prompt tokens admitted", s["prefix_queries"]),
                    ("anygpt_preemptions", "Requests preempted (recomputed later)", s["preemptions"]),
                    ("anygpt_requests_rejected", "Requests refused because the waiting queue was full",
                     s["rejected"]))
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.engine = _EngineCollector()
        self.registry.register(self.engine)
        r = self.registry
        self.ttft = Histogram("anygpt_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("anygpt_time_per_output_token_seconds",
                              "Time per output token after the first (per request mean)", buckets=_TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("anygpt_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("anygpt_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("anygpt_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("anygpt_requests_finished", "Requests finished, by reason", ["finish_reason"],
                                registry=r)

    def observe(self, stream, finish_reason: str | None) -> None:
        """Records one ended request (a RequestStream) and how it ended as reported to the
        client (None: the client left first)."""
        n = len(stream.token_ids)
        self.prompt_tokens.inc(len(stream.prompt_token_ids))
        self.generation_tokens.inc(n)
        self.finished.labels(finish_reason or "abort").inc()
        if stream.first_token_time is not None:
            self.ttft.observe(stream.first_token_time - stream.arrival_time)
            self.e2e.observe(stream.last_token_time - stream.arrival_time)
            if n > 1:
                self.tpot.observe((stream.last_token_time - stream.first_token_time) / (n - 1))
        else:
            self.e2e.observe(time.perf_counter() - stream.arrival_time)

    def render(self, engine_stats: dict) -> bytes:
        self.engine.snapshot = engine_stats
        return generate_latest(self.registry)
