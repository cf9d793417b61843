"""``GET /metrics``: vLLM's own engine metrics and the server's, prefixed ``prag_``, in Prometheus text.

vLLM registers its metrics (``vllm:...``) in prometheus_client's default registry when the engine is
built with stats logging on (``disable_log_stats=False``). Ours live in a registry per app, so two
apps in one process (tests) do not collide, and ``/metrics`` renders both.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds; the CPU fixture answers in tens of milliseconds, a GPU model in seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NO_MODE = "invalid"  # label of requests rejected before their mode was known


class _EngineCollector:
    """Reads the engine's counters at scrape time (the cache counts batch evaluation's hits too)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterable:
        stats = getattr(getattr(self.engine, "cache", None), "stats", None)
        hits = CounterMetricFamily("prag_adapter_cache_hits", "merged-adapter cache hits")
        misses = CounterMetricFamily("prag_adapter_cache_misses", "merged-adapter cache misses (merges)")
        hits.add_metric([], float(getattr(stats, "hits", 0)))
        misses.add_metric([], float(getattr(stats, "misses", 0)))
        yield hits
        yield misses
        aborts = CounterMetricFamily("prag_vllm_aborts", "vLLM requests aborted before their end (client gone)")
        aborts.add_metric([], float(getattr(getattr(self.engine, "driver", None), "aborted", 0)))
        yield aborts
        engine_in_flight = GaugeMetricFamily("prag_engine_requests_in_flight",
                                             "questions inside the engine (retrieval, merge or vLLM)")
        engine_in_flight.add_metric([], float(getattr(self.engine, "in_flight", 0)))
        yield engine_in_flight
        yield from getattr(self.engine, "metric_families", ())  # e.g. the replicas' vLLM metrics, labelled


class ServerMetrics:
    """The server's ``prag_`` metrics; the routes call :meth:`observe_answer` and friends."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("prag_requests", "HTTP generation requests by mode and status code",
                                ["mode", "status"], registry=r)
        self.aborted = Counter("prag_requests_aborted", "requests whose client went away before the answer "
                               "was complete (their vLLM requests were aborted)", ["mode"], registry=r)
        self.in_flight = Gauge("prag_requests_in_flight", "HTTP generation requests being answered", registry=r)
        self.e2e = Histogram("prag_request_latency_seconds", "end-to-end latency of answered requests",
                             ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("prag_time_to_first_token_seconds", "time from the request's arrival to its "
                              "first generated token", ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.retrieval = Histogram("prag_retrieval_seconds", "retrieval time per question", buckets=STAGE_BUCKETS,
                                   registry=r)
        self.merge = Histogram("prag_adapter_seconds", "time to get a question's merged adapter (a cache hit "
                               "or a store read + merge)", buckets=STAGE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("prag_prompt_tokens", "prompt tokens of answered questions", ["mode"],
                                     registry=r)
        self.completion_tokens = Counter("prag_completion_tokens", "generated tokens of answered questions",
                                         ["mode"], registry=r)
        r.register(_EngineCollector(engine))

    def observe_answer(self, mode: str, answer: Any) -> None:
        """Stage timings and token counts of one answered question."""
        timings = getattr(answer, "timings", None) or {}
        if timings.get("retrieve_s") is not None and answer.doc_ids and answer.scores:
            self.retrieval.observe(timings["retrieve_s"])
        if timings.get("adapter_s") is not None and getattr(answer, "adapter_cache_hit", None) is not None:
            self.merge.observe(timings["adapter_s"])
        self.prompt_tokens.labels(mode).inc(len(answer.prompt_token_ids))
        self.completion_tokens.labels(mode).inc(len(answer.output_token_ids))

    def render(self) -> bytes:
        """vLLM's metrics (default registry: also the process collectors) followed by ours."""
        return generate_latest(REGISTRY) + generate_latest(self.registry)
