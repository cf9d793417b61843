"""A replicated OpenAI endpoint: the single-process app in front, N vLLM engines on Ray Serve behind.

``prag serve --ray-address ADDR --replicas N`` runs the same FastAPI app as the single-process server
(engine/http: auth, validation, errors, streaming, metrics) over a :class:`ReplicatedEngine` instead
of an :class:`~engine.engine.Engine`. The ingress retrieves (cheap, CPU-only, batched across
concurrent questions), computes the merged-adapter key of the retrieved document set, and streams the
question from a generator deployment of N engine replicas.

Affinity. An adapter that a replica already holds costs nothing to reuse; one it does not costs a
store read, a merge and a vLLM load. So the call carries ``multiplexed_model_id`` = the adapter key, and
Serve's model multiplexing sends it to a replica that holds that key, spreading new keys over the
least-loaded replicas. ``routing="default"`` leaves the key out (Serve's default power-of-two-choices
routing), which is what the affinity benchmark compares against.

Why the ingress is the ``prag serve`` process and not a Serve deployment: the app, its errors and its
metrics stay one code path for both servers, and the ingress does no model work (one per endpoint is
plenty; run several behind a load balancer if needed). The replicas are where Serve earns its keep:
placement on GPU nodes, restarts of dead replicas, affinity routing, streaming through handles.

Replica death. A request whose replica dies before its first token is retried once on another
replica; after that the client gets a 503 with Retry-After, which OpenAI clients retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from engine.engine import Delta, EngineConfig, Finished, Retrieved, RetrievalBatcher
from engine.request import FailureKind, Limits, PragRequest, Sampling, check_request
from prag.errors import PragError

log = logging.getLogger(__name__)

APP_NAME = "prag"
ROUTINGS = ("affinity", "default")


@dataclass
class ReplicaConfig:
    """How the generator deployment is placed and routed."""

    replicas: int = 2
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs now, else 0
    routing: str = "affinity"  # affinity: multiplexed_model_id = adapter key; default: Serve's own routing
    adapters_per_replica: int = 256  # Serve's per-replica multiplex LRU (our byte-bounded cache is the real one)
    max_ongoing_requests: int = 512  # per replica; vLLM batches them
    env: dict[str, str] = field(default_factory=dict)  # extra env for the replica processes

    def check(self) -> "ReplicaConfig":
        if self.replicas < 1:
            raise PragError(f"--replicas must be >= 1, got {self.replicas}")
        if self.routing not in ROUTINGS:
            raise PragError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.cpus_per_replica <= 0 or (self.gpus_per_replica is not None and self.gpus_per_replica < 0):
            raise PragError("--cpus-per-replica must be > 0 and --gpus-per-replica >= 0")
        return self


class ReplicaFailed(PragError):
    """The replica serving a request died or failed it; retryable (the server answers 503)."""

    http_status = 503


def _generator_class(adapters_per_replica: int):
    """The generator deployment's class, with the multiplex LRU size baked in (Serve reads it at definition)."""
    from ray import serve

    class Generator:
        """One Engine (vLLM, merged-adapter cache, read access to the shared index and store) per replica."""

        def __init__(self, model: str, index: str | None, store: str | None, config: EngineConfig):
            from engine.engine import Engine

            self.engine = Engine(model, index=index, store=store, config=config)
            self.replica = serve.get_replica_context().replica_id.unique_id

        def describe(self) -> dict:
            e = self.engine
            return {"replica": self.replica, "pid": os.getpid(), "max_lora_rank": e.max_lora_rank,
                    "max_model_len": e.max_model_len, "rank": e.rank, "max_question_chars": e.max_question_chars,
                    "store_version": e.store.version if e.store is not None else None}

        def stats(self) -> dict:
            s = self.engine.cache.stats
            return {"replica": self.replica, "pid": os.getpid(), "hits": s.hits, "misses": s.misses,
                    "entries": s.entries, "in_flight": self.engine.in_flight}

        def metrics_text(self) -> tuple[str, str]:
            """(replica, this replica's vLLM metrics in Prometheus text)."""
            from prometheus_client import REGISTRY, generate_latest

            return self.replica, generate_latest(REGISTRY).decode()

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def _hold(self, key: str) -> str:
            # Serve records that this replica holds `key`; the merged adapter itself is built (and kept,
            # bounded by bytes) by the engine's cache on first use
            return key

        async def generate(self, req: PragRequest, request_id: str, stream_tokens: bool) -> AsyncIterator[Any]:
            key = serve.get_multiplexed_model_id()
            if key:
                await self._hold(key)
            gen = self.engine.stream(req, request_id, stream_tokens=stream_tokens)
            try:
                async for event in gen:
                    if isinstance(event, Finished):
                        event.answer.replica = self.replica
                    yield event
            finally:
                await gen.aclose()

    return Generator


@dataclass
class _Counts:
    """Merged-adapter cache hits/misses and aborts of the replicas, as counted from the answers passing through
    the ingress (what ``/metrics`` reports as ``prag_adapter_cache_*`` and ``prag_vllm_aborts``)."""

    hits: int = 0
    misses: int = 0
    aborted: int = 0

    @property
    def stats(self) -> "_Counts":  # the shape the app reads: engine.cache.stats.hits / engine.driver.aborted
        return self


class ReplicatedEngine:
    """What the HTTP app needs from an engine (``request``/``stream``/``limits``...), served by N replicas."""

    def __init__(self, model: str, index: str | None, store: str | None, config: EngineConfig | None = None,
                 replicas: ReplicaConfig | None = None):
        from ray import serve

        from prag.model_files import check_model_dir

        self.model = str(model)
        self.config = config or EngineConfig()
        self.replica_config = (replicas or ReplicaConfig()).check()
        self.max_new_tokens = self.config.resolved_max_new_tokens()
        check_model_dir(model)
        self.retriever = None
        if index is not None:
            from retrieval.retriever import Retriever

            self.retriever = Retriever.load(index)
        self.store_version = None
        if store is not None:
            from prag.store import AdapterStore

            self.store_version = AdapterStore.open(store).version
        import ray

        rc = self.replica_config
        gpus = rc.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        Generator = _generator_class(rc.adapters_per_replica)
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), **rc.env}
        deployment = serve.deployment(
            Generator, name="generator", num_replicas=rc.replicas, max_ongoing_requests=rc.max_ongoing_requests,
            ray_actor_options={"num_cpus": rc.cpus_per_replica, "num_gpus": gpus,
                               "runtime_env": {"env_vars": env}},
            health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
        serve.start(proxy_location="Disabled")
        self.handle = serve.run(deployment.bind(os.path.abspath(model),
                                                None if index is None else os.path.abspath(index),
                                                None if store is None else os.path.abspath(store), self.config),
                                name=APP_NAME, route_prefix=None)
        info = self.handle.describe.remote().result()
        self.rank = info["rank"]
        self.max_lora_rank, self.max_model_len = info["max_lora_rank"], info["max_model_len"]
        self.max_question_chars = info["max_question_chars"]
        if self.store_version is not None and info["store_version"] != self.store_version:
            raise PragError(f"the replicas opened store version {info['store_version']}, the ingress "
                            f"{self.store_version}: is {store} the same path on every node?")
        self.limits = Limits(max_model_len=self.max_model_len, max_tokens=self.max_model_len - 1,
                             adapter_rank=self.rank, max_lora_rank=self.max_lora_rank)
        self._retrieval = RetrievalBatcher(self.retriever, self.config.retrieval_method) \
            if self.retriever is not None else None
        self._in_flight = 0
        self._closed = False
        self.cache = self.driver = _Counts()
        self.metric_families: list = []  # the replicas' vLLM metrics, refreshed by refresh_metrics()

    # -- the engine surface the HTTP app uses -----------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    def request(self, question: Any, mode: Any = None, top_k: Any = None, max_tokens: Any = None,
                doc_ids=None, sampling: Sampling | None = None) -> PragRequest:
        from engine.request import RequestInvalid

        req = check_request(self.limits, question, "prag" if mode is None else mode,
                            self.config.top_k if top_k is None else top_k,
                            self.max_new_tokens if max_tokens is None else max_tokens, doc_ids, sampling)
        if req.mode.needs_adapter and (self.store_version is None or self.max_lora_rank is None):
            raise RequestInvalid("mode", f"mode {req.mode} needs an adapter store (--store)")
        if req.mode.needs_documents and req.doc_ids is None and self.retriever is None:
            raise RequestInvalid("mode", f"mode {req.mode} needs an index (--index) or explicit doc_ids")
        return req

    def adapter_key(self, doc_ids) -> str:
        """The replica-affinity key of a document set: the merged adapter's content-derived name."""
        from engine.adapter_cache import adapter_name, make_key

        return adapter_name(make_key(doc_ids, self.store_version))

    async def stream(self, req: PragRequest, request_id: str | None = None,
                     stream_tokens: bool = True) -> AsyncIterator[Retrieved | Delta | Finished]:
        rid = request_id or f"prag-{uuid.uuid4().hex}"
        self._in_flight += 1
        try:
            scores: list[float] = []
            if req.mode.needs_documents and req.doc_ids is None and req.question.strip():
                t0 = time.perf_counter()
                hits = await self._retrieval.search(req.question, req.top_k)
                retrieve_s = time.perf_counter() - t0
                scores = [float(s) for _, s in hits]
                if hits:  # none found: the replica answers with the typed failure
                    req = dataclasses.replace(req, doc_ids=tuple(d for d, _ in hits))
            else:
                retrieve_s = None
            options: dict[str, Any] = {"stream": True}
            if req.mode.needs_adapter and req.doc_ids and self.replica_config.routing == "affinity":
                options["multiplexed_model_id"] = self.adapter_key(req.doc_ids)
            for attempt in (1, 2):
                started = False
                gen = self.handle.options(**options).generate.remote(req, f"{rid}-{attempt}", stream_tokens)
                try:
                    async for event in gen:
                        if isinstance(event, Retrieved):
                            event = Retrieved(event.doc_ids, scores or event.scores)
                        elif isinstance(event, Delta):
                            started = True
                        elif isinstance(event, Finished):
                            hit = event.answer.adapter_cache_hit
                            if hit is not None:
                                self.cache.hits += hit
                                self.cache.misses += not hit
                            if scores:
                                event.answer.scores = scores
                            if retrieve_s is not None:
                                event.answer.timings["retrieve_s"] = retrieve_s
                        yield event
                    return
                except (GeneratorExit, asyncio.CancelledError):
                    gen.cancel()  # the client went away: the replica aborts its vLLM request
                    self.driver.aborted += 1
                    raise
                except Exception as exc:  # noqa: BLE001 - a dead or failing replica
                    if attempt == 1 and not started and _replica_died(exc):
                        log.warning("replica failed before the first token (%s); retrying once", type(exc).__name__)
                        continue
                    raise ReplicaFailed(f"the engine replica serving this request failed: "
                                        f"{type(exc).__name__}; retry the request") from None
        finally:
            self._in_flight -= 1

    async def answer(self, req: PragRequest, request_id: str | None = None):
        answer = None
        async for event in self.stream(req, request_id, stream_tokens=False):
            if isinstance(event, Finished):
                answer = event.answer
        return answer

    async def refresh_metrics(self) -> None:
        """Gather every replica's ``vllm:`` metrics, each sample labelled with its ``replica`` (GET /metrics).
        Calls go through Serve's router, so ask until each replica answered (a bounded number of times)."""
        from prometheus_client import Metric
        from prometheus_client.parser import text_string_to_metric_families

        texts: dict[str, str] = {}
        for _ in range(4 * self.replica_config.replicas):
            replica, text = await self.handle.metrics_text.remote()
            texts[replica] = text
            if len(texts) >= self.replica_config.replicas:
                break
        merged: dict[str, Metric] = {}
        for replica, text in sorted(texts.items()):
            for fam in text_string_to_metric_families(text):
                if not fam.name.startswith("vllm:"):
                    continue
                out = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                for sample in fam.samples:
                    out.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
        self.metric_families = list(merged.values())

    def replica_stats(self, calls: int = 64) -> dict[str, dict]:
        """Per-replica cache counters, by asking until every replica answered (routing is random)."""
        seen: dict[str, dict] = {}
        for _ in range(calls):
            s = self.handle.stats.remote().result()
            seen[s["replica"]] = s
            if len(seen) >= self.replica_config.replicas:
                break
        return seen

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retrieval is not None:
            self._retrieval.close()
        try:
            from ray import serve

            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - Ray may already be gone at exit
            pass


def _replica_died(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    try:
        from ray.serve.exceptions import RayServeException
    except ImportError:  # pragma: no cover
        RayServeException = ()  # type: ignore[assignment]
    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError, RayServeException))
