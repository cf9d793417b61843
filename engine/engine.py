"""The PRAG engine: question -> top-k doc ids -> merged adapter (cached) -> vLLM -> answer.

Modes (:class:`engine.request.Mode`, the paper's names): ``none`` (the question alone), ``rag``
(the top-k passages in the prompt), ``prag`` (the cat-merged adapter of the top-k documents, no
passages) and ``combine`` (both).

One path for every caller. :meth:`Engine.stream` answers one question: retrieval (concurrent
questions share one batched search, :class:`RetrievalBatcher`), then the merged adapter (cached;
store read and merge run on a thread beside the model) while the prompt is tokenised, then the
request goes to vLLM the moment its adapter is ready. The driver (``engine/vllm_backend/driver.py``)
steps vLLM continuously, so a request joins the running batch at the next step, whatever else is
decoding: the HTTP server streams each question through it, and batch evaluation
(:meth:`Engine.generate`) submits all its questions at once with a bound on those in flight.

The merge order inside an adapter is the sorted doc-id order (the cache key), so the same set
retrieved in another order reuses the adapter; the delta is a sum, so order does not change it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

from engine.adapter_cache import DEFAULT_MAX_BYTES, CachedAdapter, CacheKey, MergedAdapterCache, make_key
from engine.merge import MergedAdapter, RowMerge
from engine.prompts import build_prompt, prompt_config
from engine.request import (MODES, FailureKind, Limits, Mode, PragRequest, RequestInvalid, Sampling,
                            check_request)
from engine.eval.scoring import extract_answer
from engine.vllm_backend.llm import (SUPPORTED_LORA_RANKS, LLMConfig, has_cuda, make_llm, shutdown_llm,
                                     smallest_lora_rank)
from prag.errors import PragError
from prag.prompt import PromptConfig

log = logging.getLogger(__name__)

PASSAGE_MODES = tuple(m.value for m in Mode if m.needs_passages)
ADAPTER_MODES = tuple(m.value for m in Mode if m.needs_adapter)
# What a retrieved document without an adapter does to a prag/combine question: "error" fails the
# question (the eval harness fails the whole run before generating, listing the gap), "skip-doc" merges
# only the documents that have adapters, "fallback-rag" also puts the others in the prompt as passages.
MISSING_ADAPTER_POLICIES = ("error", "skip-doc", "fallback-rag")
MAX_LORA_RANK = SUPPORTED_LORA_RANKS[-1]


def check_missing_policy(policy: str) -> str:
    if policy not in MISSING_ADAPTER_POLICIES:
        raise PragError(f"--on-missing-adapter must be one of {', '.join(MISSING_ADAPTER_POLICIES)}, got {policy!r}")
    return policy


def check_mode(mode: str) -> str:
    return Mode.parse(mode).value


def parse_modes(modes: str | Sequence[str]) -> list[str]:
    """``"none,rag"`` or a list -> validated, de-duplicated list in the given order."""
    items = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    items = [m for m in items if m]
    if not items:
        raise PragError(f"no modes given; valid modes: {', '.join(MODES)}")
    return list(dict.fromkeys(check_mode(m) for m in items))


def check_top_k(top_k: Any, rank: int | None = None) -> int:
    """``top_k`` must be positive and ``top_k * rank`` must fit vLLM's largest ``max_lora_rank``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise RequestInvalid("top_k", f"top_k must be a positive integer, got top_k={top_k!r}")
    rank = rank or 1  # unknown until the store is open; no adapter has rank < 1
    if top_k * rank > MAX_LORA_RANK:
        raise RequestInvalid("top_k", f"top_k={top_k} with adapter rank {rank} gives a merged rank of "
                                      f"{top_k * rank}, above vLLM's largest max_lora_rank {MAX_LORA_RANK}; "
                                      f"use top_k <= {MAX_LORA_RANK // rank}")
    return top_k


@dataclass
class EngineConfig:
    """Engine settings; defaults are the paper's (top-3, greedy, 20 new tokens or 128 with CoT)."""

    top_k: int = 3
    max_new_tokens: int | None = None  # None: 20, or 128 with chain_of_thought
    chain_of_thought: bool = False
    fewshot: str | None = None  # CoT examples as prompt text; None: built-in generic examples
    prompt: PromptConfig = field(default_factory=PromptConfig)  # templates (user, assistant prefix, passages)
    retrieval_method: str = "dense"  # dense | bm25 | hybrid (bm25/hybrid need an index built with BM25)
    # vLLM engine
    dtype: str = "auto"
    max_model_len: int = 2048
    max_lora_rank: int | None = None  # None: smallest allowed value >= top_k * store rank
    max_loras: int | None = None  # adapters in one batch step; None: 16 on CPU, 32 on GPU
    max_cpu_loras: int | None = None  # vLLM's CPU-side adapter LRU; None: 4 x max_loras
    kv_cache_gib: int | None = None  # CPU KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE); GPU uses gpu_memory_utilization
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    in_process: bool | None = None  # vLLM engine core in this process; None: on a CPU yes (LLMConfig)
    engine_args: dict[str, Any] = field(default_factory=dict)  # any other vllm.LLM argument, verbatim
    # merged adapters
    adapter_dir: str | None = None  # None: a fresh folder on /dev/shm (tmpfs) or the temp dir
    adapter_cache_bytes: int = DEFAULT_MAX_BYTES
    adapter_dtype: str = "float32"  # dtype of merged adapter files (vLLM casts to the model dtype)
    # How merged adapters reach vLLM: "memory" (no file; needs vLLM's worker in this process, see
    # engine/vllm_backend/memory_lora.py), "dir" (a PEFT directory on tmpfs), "auto": memory where
    # possible, else dir with one warning.
    adapter_handover: str = "auto"
    # Threads that merge and write adapters beside the model. None: 1 on a CPU, where they take cores from
    # the model's own threads (measured on 2 cores: 1 thread 31 q/s, 4 threads 26-30 q/s for cold prag;
    # one thread builds ~250 adapters/s, far more than a CPU model answers); 4 with a GPU.
    prepare_threads: int | None = None
    check_store_model: bool = True  # refuse a store built for another base model
    # check every adapter row read from the store (checksum + finite values) before it reaches vLLM: a bad
    # row fails only the questions that need it (CorruptAdapterError), instead of NaN leaking into the batch
    verify_rows: bool = True
    # a retrieved document without an adapter (prag/combine): error | skip-doc | fallback-rag (see
    # MISSING_ADAPTER_POLICIES); "error" fails that question here, and a whole eval run before it starts
    on_missing_adapter: str = "error"
    # Who drives vLLM (engine/vllm_backend/driver.py): "llm" steps a vllm.LLM from one thread, "async" runs
    # vLLM's AsyncLLM (engine core in its own process), "auto": "llm" where the engine core runs in this
    # process (the CPU default, measured faster there and needed by the memory hand-over), else "async".
    driver: str = "auto"

    def resolved_prepare_threads(self) -> int:
        if self.prepare_threads is not None:
            if self.prepare_threads < 1:
                raise PragError(f"prepare_threads must be >= 1, got {self.prepare_threads}")
            return self.prepare_threads
        return 4 if has_cuda() else 1

    def resolved_driver(self, llm_cfg: LLMConfig) -> str:
        if self.driver not in ("auto", "llm", "async"):
            raise PragError(f"driver must be auto, llm or async, got {self.driver!r}")
        if self.driver != "auto":
            return self.driver
        return "llm" if llm_cfg.resolved_in_process() else "async"

    def resolved_max_new_tokens(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 128 if self.chain_of_thought else 20

    def resolved_prompt(self) -> PromptConfig:
        return prompt_config(self.chain_of_thought, self.fewshot, self.prompt)

    def llm_config(self, model: str, max_lora_rank: int, enable_lora: bool = True,
                   lora_target_modules: tuple[str, ...] | None = None) -> LLMConfig:
        return LLMConfig(model=model, dtype=self.dtype, max_model_len=self.max_model_len,
                         enable_lora=enable_lora, max_lora_rank=max_lora_rank, max_loras=self.max_loras,
                         max_cpu_loras=self.max_cpu_loras, gpu_memory_utilization=self.gpu_memory_utilization,
                         seed=self.seed, structured_output=False, lora_target_modules=lora_target_modules,
                         in_process=self.in_process, engine_args=dict(self.engine_args))


@dataclass
class Answer:
    """One question's result; everything needed to check it again outside the engine."""

    question: str
    mode: str
    text: str = ""  # the generated continuation (after the assistant prefix)
    prediction: str = ""  # the extracted short answer
    doc_ids: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    prompt: str = ""  # chat template applied, assistant prefix included
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    error_kind: FailureKind | None = None
    truncated: bool = False
    truncation: dict | None = None
    lora_name: str | None = None
    finish_reason: str | None = None
    # retrieved documents that had no adapter, and the policy that handled them (None: none missing)
    missing_doc_ids: list[str] = field(default_factory=list)
    on_missing_adapter: str | None = None
    adapter_cache_hit: bool | None = None  # None: no adapter was needed
    replica: str | None = None  # the engine replica that answered (the replicated server only)
    # seconds: retrieve_s, adapter_s (merged adapter ready, after retrieval), ttft_s, total_s
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, kind: FailureKind, message: str) -> "Answer":
        self.error_kind, self.error = kind, message
        return self

    def to_dict(self) -> dict:
        out = asdict(self)
        out["error_kind"] = None if self.error_kind is None else self.error_kind.value
        return out


@dataclass
class Retrieved:
    """Stream event: the documents chosen for the question (sent before generation starts)."""

    doc_ids: list[str]
    scores: list[float]


@dataclass
class Delta:
    """Stream event: the text and token ids of one generated step."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    """Stream event, always the last: the whole answer (or its typed failure)."""

    answer: Answer


@dataclass
class GenerateStats:
    """Timing of the last ``generate`` call (seconds) and adapter-cache activity."""

    questions: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    retrieve_s: float = 0.0
    prompt_s: float = 0.0
    adapter_wait_s: float = 0.0  # summed over questions: time a ready prompt waited for its merged adapter
    generate_s: float = 0.0
    total_s: float = 0.0
    adapters_built: int = 0
    adapters_reused: int = 0
    # where a cold batch's adapter time goes: on the adapter thread(s), store reads, merges and (dir
    # hand-over) directory writes; inside vLLM's step, building LoRAModels (reading the dir back on the
    # dir path) and filling slots (these two only when vLLM's worker runs in this process)
    store_read_s: float = 0.0
    merge_s: float = 0.0
    write_s: float = 0.0
    vllm_load_s: float = 0.0
    slot_fill_s: float = 0.0


def _adapter_failure(exc: PragError) -> FailureKind:
    from prag.store import MissingAdapterError

    return FailureKind.MISSING_ADAPTER if isinstance(exc, MissingAdapterError) else FailureKind.CORRUPT_ADAPTER


class RetrievalBatcher:
    """Questions that arrive while a search runs share the next one: one embedding batch and one FAISS
    call for many requests, with no waiting window (a lone question is searched at once)."""

    def __init__(self, retriever: Any, method: str):
        self.retriever, self.method = retriever, method
        self._cond = threading.Condition()
        self._queue: list[tuple[str, int, Future]] = []
        self._closed = False
        self.calls = 0
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="prag-retrieval", daemon=True)
        self._thread.start()

    async def search(self, question: str, k: int) -> list[tuple[str, float]]:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise PragError("the engine is closed")
            self._queue.append((question, k, fut))
            self._cond.notify()
        return await asyncio.wrap_future(fut)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch, self._queue = self._queue, []
            by_k: dict[int, list[tuple[str, Future]]] = {}
            for q, k, fut in batch:
                by_k.setdefault(k, []).append((q, fut))
            for k, items in by_k.items():
                t0 = time.perf_counter()
                try:
                    hits = self.retriever.search([q for q, _ in items], k, method=self.method)
                except BaseException as exc:  # noqa: BLE001 - every waiting question sees the failure
                    for _, fut in items:
                        fut.set_exception(exc)
                    continue
                self.calls += 1
                self.seconds += time.perf_counter() - t0
                for (_, fut), h in zip(items, hits):
                    fut.set_result(h)


class Engine:
    """Serve the four modes over one vLLM engine. See the module doc for the request path."""

    def __init__(self, model: str | os.PathLike, index: Any = None, store: Any = None,
                 config: EngineConfig | None = None, *, llm: Any = None,
                 documents: Mapping[str, Any] | None = None, tokenizer: Any = None):
        """``index``: a ``retrieval.Retriever`` or an index directory; ``store``: an ``AdapterStore``
        or its directory; ``llm``: an existing ``vllm.LLM`` to share (else one is built);
        ``documents``: doc id -> text (or ``Document``) for passages when there is no index."""
        from prag.model_files import check_model_dir

        # missing model, truncated weights or no tokenizer: a named error before vLLM. The tokenizer and
        # vLLM load the resolved directory, so a cached hub id never sends them to the network.
        self.model_dir = str(check_model_dir(model))
        self.model = str(model)
        self.config = config or EngineConfig()
        check_missing_policy(self.config.on_missing_adapter)
        self.prompt_cfg = self.config.resolved_prompt()
        self.max_new_tokens = self.config.resolved_max_new_tokens()
        if self.max_new_tokens <= 0:
            raise PragError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        self.retriever = self._open_index(index)
        self.store = self._open_store(store)
        self.documents = documents
        self.rank = self.store.rank if self.store is not None else None
        check_top_k(self.config.top_k, self.rank)
        if self.store is not None and self.config.check_store_model:
            from prag.store import model_fingerprint

            self.store.check_compatible(model_fingerprint=model_fingerprint(self.model))
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        needed = smallest_lora_rank(self.config.top_k * (self.rank or 1))
        self._owns_llm = llm is None
        self.driver: Any
        if llm is None:
            rank = self.config.max_lora_rank or needed
            if rank not in SUPPORTED_LORA_RANKS:
                raise PragError(f"max_lora_rank must be one of {SUPPORTED_LORA_RANKS}, got {rank}")
            if self.config.kv_cache_gib is not None and not has_cuda():
                if int(self.config.kv_cache_gib) != self.config.kv_cache_gib or self.config.kv_cache_gib <= 0:
                    raise PragError(f"kv_cache_gib must be a positive whole number of GiB (vLLM's CPU KV cache "
                                    f"takes an integer), got {self.config.kv_cache_gib}")
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.config.kv_cache_gib))
            # LoRA slots cost memory and time; without a store no mode can use them
            targets = tuple(self.store.target_modules) if self.store is not None else None
            llm_cfg = self.config.llm_config(self.model_dir, rank, enable_lora=self.store is not None,
                                             lora_target_modules=targets)
            if self.config.resolved_driver(llm_cfg) == "async":
                from engine.vllm_backend.driver import AsyncLLMDriver
                from engine.vllm_backend.llm import async_engine_kwargs

                self.driver = AsyncLLMDriver(async_engine_kwargs(llm_cfg))
                llm = self.driver.llm
            else:
                llm = make_llm(llm_cfg)
        if not hasattr(self, "driver"):
            from engine.vllm_backend.driver import driver_for

            self.driver = driver_for(llm)
        self.llm = llm
        self.max_lora_rank, self.max_model_len = _lora_limits(llm)
        if self.store is not None and self.max_lora_rank is not None and needed > self.max_lora_rank:
            raise PragError(f"top_k={self.config.top_k} x rank {self.rank} needs max_lora_rank >= "
                            f"{self.config.top_k * self.rank}, but the vLLM engine has {self.max_lora_rank}")
        self.limits = Limits(max_model_len=self.max_model_len, max_tokens=self.max_model_len - 1,
                             adapter_rank=self.rank, max_lora_rank=self.max_lora_rank)
        # a question longer than this many characters cannot fit the context whatever it says: no token of
        # the vocabulary is longer than the longest one (the server rejects it before tokenising)
        longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
        self.max_question_chars = self.max_model_len * max(longest, 1)
        self.handover = self._choose_handover()
        if self.handover == "memory":
            from engine.vllm_backend import memory_lora

            self.cache = MergedAdapterCache(None, max_bytes=self.config.adapter_cache_bytes,
                                            on_insert=lambda e: memory_lora.register(e.lora_int_id, e.payload),
                                            on_evict=lambda e: memory_lora.unregister(e.lora_int_id))
        else:
            self.cache = MergedAdapterCache(self._write_adapter, root=self.config.adapter_dir,
                                            max_bytes=self.config.adapter_cache_bytes)
        self._timing_lock = threading.Lock()
        self._thread_times = {"store_read_s": 0.0, "merge_s": 0.0, "write_s": 0.0}
        self._pool = ThreadPoolExecutor(max_workers=self.config.resolved_prepare_threads(),
                                        thread_name_prefix="prag-adapter")
        # prompts are tokenised off the event loop, on one thread: a long question never stalls the server
        self._prompt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prag-prompt")
        self._retrieval = RetrievalBatcher(self.retriever, self.config.retrieval_method) \
            if self.retriever is not None else None
        self._row_merges: dict[int, Any] = {}
        self._in_flight = 0
        self._closed = False
        self.last_stats = GenerateStats()

    @classmethod
    def from_paths(cls, model: str, index: str | None = None, store: str | None = None,
                   config: EngineConfig | None = None, **kw) -> "Engine":
        return cls(model, index=index, store=store, config=config, **kw)

    # -- set-up helpers ---------------------------------------------------------------------
    def _open_index(self, index):
        if index is None or not isinstance(index, (str, os.PathLike)):
            return index
        from retrieval.retriever import Retriever

        return Retriever.load(index)

    def _open_store(self, store):
        if store is None or not isinstance(store, (str, os.PathLike)):
            return store
        from prag.store import AdapterStore

        return AdapterStore.open(store)

    def _choose_handover(self) -> str | None:
        """"memory" or "dir" (None without a store or LoRA); see ``EngineConfig.adapter_handover``."""
        want = self.config.adapter_handover
        if want not in ("auto", "memory", "dir"):
            raise PragError(f"adapter_handover must be auto, memory or dir, got {want!r}")
        if self.store is None or self.max_lora_rank is None:
            return None
        from engine.vllm_backend import compat, memory_lora

        problem = None if want == "dir" else compat.memory_handover_problem(self.llm)
        manager = compat.worker_lora_manager(self.llm)
        if problem is None and want != "dir":
            try:
                self._slot_plan = memory_lora.SlotPlan.build(manager, self.store.layout)
            except PragError as exc:
                problem = str(exc)
        # memory_handover_problem checked the symbols already, except on the "dir" path
        if manager is not None and problem is None and (want != "dir" or not compat.symbol_problems(True)):
            memory_lora.install(manager)  # also times vLLM's own loader on the dir path
        if want == "dir":
            return "dir"
        if problem is not None:
            if want == "memory":
                raise PragError(f"adapter_handover='memory' is not possible: {problem}")
            log.warning("merged adapters go to vLLM through tmpfs directories: %s", problem)
            return "dir"
        return "memory"

    def _write_adapter(self, merged: MergedAdapter, out_dir: Path) -> None:
        from offline_encode.peft_format import write_peft_adapter

        t0 = time.perf_counter()
        write_peft_adapter(merged.tensors, out_dir, rank=merged.rank, alpha=merged.alpha,
                           target_modules=self.store.target_modules, base_model_name_or_path=self.model,
                           dtype=self.config.adapter_dtype)
        self._add_time("write_s", time.perf_counter() - t0)

    def _add_time(self, name: str, seconds: float) -> None:
        with self._timing_lock:
            self._thread_times[name] += seconds

    def close(self) -> None:
        """Stop the helper threads, remove the merged-adapter folder, and shut vLLM down if this engine
        started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._retrieval is not None:
            self._retrieval.close()
        self._pool.shutdown(wait=True)
        self._prompt_pool.shutdown(wait=True)
        self.cache.close()
        if self._owns_llm:
            if hasattr(self.driver, "vllm_config"):  # AsyncLLMDriver owns its engine
                self.driver.close()
            else:
                shutdown_llm(self.llm)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset_prefix_cache(self) -> bool:
        """Drop vLLM's cached KV (benchmarks: a repeat must not reuse the previous repeat's prefill)."""
        return self.driver.reset_prefix_cache()

    @property
    def in_flight(self) -> int:
        """Questions inside :meth:`stream` right now (retrieving, merging or decoding)."""
        return self._in_flight

    # -- pieces of the per-question flow ---------------------------------------------------------
    def _adapter(self, key: CacheKey) -> CachedAdapter:
        """Read the documents' adapters and cat-merge them (sorted doc-id order); cached and pinned once."""
        doc_ids = list(key[0])

        def build():
            t0 = time.perf_counter()
            rows = self.store.get_rows(doc_ids, verify=self.config.verify_rows)
            t1 = time.perf_counter()
            merged = self._row_merge(len(doc_ids))(rows)
            self._add_time("store_read_s", t1 - t0)
            self._add_time("merge_s", time.perf_counter() - t1)
            return merged

        return self.cache.get_or_build(key, build, pin=True)

    def _row_merge(self, k: int):
        """The one-gather cat-merge of ``k`` store rows, built once per k: :class:`engine.merge.RowMerge`
        for the dir hand-over, :class:`engine.vllm_backend.memory_lora.SlotMerge` (straight into vLLM's
        padded slot layout) for the memory one."""
        merge = self._row_merges.get(k)
        if merge is None:
            if self.handover == "memory":
                from engine.vllm_backend.memory_lora import SlotMerge

                merge = SlotMerge(self.store.layout, k, self.store.alpha, self._slot_plan)
            else:
                merge = RowMerge(self.store.layout, k, self.store.alpha)
            self._row_merges[k] = merge
        return merge

    def _texts(self, doc_ids: Sequence[str]) -> tuple[list[str] | None, str | None]:
        """The passages of ``doc_ids`` in order, or (None, why not)."""
        if self.documents is not None:
            missing = [d for d in doc_ids if d not in self.documents]
            if missing:
                return None, f"document id(s) {missing[:5]} not found in the documents mapping"
            return [d if isinstance(d, str) else d.text for d in (self.documents[i] for i in doc_ids)], None
        if self.retriever is None:
            return None, "mode needs passages but the engine has no index or documents"
        try:
            return [doc.text for doc in self.retriever.fetch(list(doc_ids))], None
        except PragError:  # some id is unknown: find which
            missing = []
            for d in doc_ids:
                try:
                    self.retriever.fetch([d])
                except PragError:
                    missing.append(d)
            return None, f"document id(s) {missing[:5]} not found in the index"

    def _prompt(self, a: Answer, passages: Sequence[str] | None, budget: int) -> None:
        """Tokenise the prompt into ``a`` (the prompt thread), or record why it cannot be built."""
        try:
            built = build_prompt(self.tokenizer, a.question, passages, self.prompt_cfg, budget)
        except PragError as exc:
            a.fail(FailureKind.PROMPT_TOO_LONG, str(exc))
            return
        a.prompt_token_ids, a.prompt = built.ids, built.text
        if built.truncation is not None:
            a.truncated, a.truncation = True, built.truncation

    def _passages_and_prompt(self, a: Answer, passage_ids: Sequence[str] | None, budget: int) -> None:
        passages = None
        if passage_ids:
            passages, why = self._texts(passage_ids)
            if passages is None:
                a.fail(FailureKind.UNKNOWN_DOCUMENT, why)
                return
        self._prompt(a, passages, budget)

    def _check_mode_setup(self, mode: Mode, explicit_docs: bool) -> None:
        """Configuration problems (a mode this engine cannot serve) raise before any work starts."""
        if mode.needs_adapter:
            if self.store is None:
                raise RequestInvalid("mode", f"mode {mode} needs an adapter store (--store)")
            if self.max_lora_rank is None:
                raise RequestInvalid("mode", f"mode {mode} needs a vLLM engine with LoRA enabled")
        if mode.needs_documents and not explicit_docs and self.retriever is None:
            raise RequestInvalid("mode", f"mode {mode} needs an index (--index) or explicit doc_ids")

    # -- the public calls ------------------------------------------------------------------------
    def request(self, question: Any, mode: Any = None, top_k: Any = None, max_tokens: Any = None,
                doc_ids: Sequence[str] | None = None, sampling: Sampling | None = None) -> PragRequest:
        """A validated request with this engine's defaults (the server's and the CLI's entry point)."""
        req = check_request(self.limits, question, "prag" if mode is None else mode,
                            self.config.top_k if top_k is None else top_k,
                            self.max_new_tokens if max_tokens is None else max_tokens, doc_ids, sampling)
        self._check_mode_setup(req.mode, req.doc_ids is not None)
        return req

    async def answer(self, req: PragRequest, request_id: str | None = None,
                     _hits: list[tuple[str, float]] | None = None) -> Answer:
        """One question, answered whole (the last event of :meth:`stream`)."""
        answer = None
        gen = self.stream(req, request_id, stream_tokens=False, _hits=_hits)
        try:
            async for event in gen:
                if isinstance(event, Finished):
                    answer = event.answer
        finally:
            await gen.aclose()
        return answer

    async def stream(self, req: PragRequest, request_id: str | None = None, stream_tokens: bool = True,
                     _hits: list[tuple[str, float]] | None = None) -> AsyncIterator[Retrieved | Delta | Finished]:
        """Answer one question as events: :class:`Retrieved`, one :class:`Delta` per generated step (if
        ``stream_tokens``), then :class:`Finished`. A failure is a typed ``Answer.error``, never an exception.
        Closing the iterator early aborts the question's vLLM request."""
        if self._closed:
            raise PragError("the engine is closed")
        rid = request_id or f"prag-{uuid.uuid4().hex}"
        a = Answer(question=req.question, mode=req.mode.value)
        t_start = time.perf_counter()
        self._in_flight += 1
        adapter_job: Future | None = None
        try:
            if not req.question.strip():
                yield Finished(a.fail(FailureKind.EMPTY_QUESTION, "empty question"))
                return
            # 1. documents: explicit ones, else the shared retrieval batch
            if req.mode.needs_documents:
                if req.doc_ids is not None:
                    a.doc_ids = list(req.doc_ids)
                else:
                    t0 = time.perf_counter()
                    hits = _hits if _hits is not None else await self._retrieval.search(req.question, req.top_k)
                    a.timings["retrieve_s"] = time.perf_counter() - t0
                    a.doc_ids = [d for d, _ in hits]
                    a.scores = [float(s) for _, s in hits]
                if not a.doc_ids:
                    yield Finished(a.fail(FailureKind.NO_DOCUMENTS, "no documents retrieved for this question"))
                    return
                yield Retrieved(list(a.doc_ids), list(a.scores))
            # 2. the merged adapter starts now, on the adapter thread, while the prompt is tokenised
            passage_ids = a.doc_ids if req.mode.needs_passages else None
            t_adapter = time.perf_counter()
            key = None
            if req.mode.needs_adapter:
                present = a.doc_ids
                if self.config.on_missing_adapter != "error":
                    absent = set(self.store.missing(a.doc_ids))
                    a.missing_doc_ids = [d for d in a.doc_ids if d in absent]
                    if a.missing_doc_ids:
                        a.on_missing_adapter = self.config.on_missing_adapter
                        present = [d for d in a.doc_ids if d not in absent]
                        if self.config.on_missing_adapter == "fallback-rag" and not req.mode.needs_passages:
                            passage_ids = a.missing_doc_ids
                if present:  # skip-doc / fallback-rag with no adapter at all: the base model answers
                    key = make_key(present, self.store.version)
                    if len(key[0]) * self.rank > self.max_lora_rank:
                        yield Finished(a.fail(FailureKind.RANK_LIMIT, f"{len(key[0])} documents x rank "
                                              f"{self.rank} exceed the engine's max_lora_rank {self.max_lora_rank}"))
                        return
                    a.adapter_cache_hit = key in self.cache
                    adapter_job = self._pool.submit(self._adapter, key)
            budget = self.max_model_len - req.max_tokens
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._prompt_pool, self._passages_and_prompt, a, passage_ids, budget)
            lora = None
            if adapter_job is not None:
                t_ready = time.perf_counter()
                try:
                    entry = await asyncio.wrap_future(adapter_job)
                except PragError as exc:  # missing or corrupt adapter: this question fails, others go on
                    adapter_job = None
                    if a.ok:
                        a.fail(_adapter_failure(exc), str(exc))
                else:
                    a.timings["adapter_wait_s"] = time.perf_counter() - t_ready
                    a.lora_name = entry.lora_name
                    from vllm.lora.request import LoRARequest

                    lora = LoRARequest(entry.lora_name, entry.lora_int_id, entry.lora_path)
                a.timings["adapter_s"] = time.perf_counter() - t_adapter
            if not a.ok:
                yield Finished(a)
                return
            # 3. into vLLM's running batch
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            params = SamplingParams(max_tokens=req.max_tokens, **req.sampling.vllm_kwargs(),
                                    output_kind=RequestOutputKind.DELTA if stream_tokens
                                    else RequestOutputKind.FINAL_ONLY)
            outputs = self.driver.generate(a.prompt_token_ids, params, lora, rid)
            text: list[str] = []
            try:
                async for out in outputs:
                    comp = out.outputs[0]
                    if "ttft_s" not in a.timings and comp.token_ids:
                        a.timings["ttft_s"] = time.perf_counter() - t_start
                    if stream_tokens:
                        text.append(comp.text)
                        a.output_token_ids.extend(comp.token_ids)
                        if comp.text or comp.token_ids:
                            yield Delta(comp.text, list(comp.token_ids))
                    else:
                        text, a.output_token_ids = [comp.text], list(comp.token_ids)
                    if out.finished:
                        a.finish_reason = comp.finish_reason
            except PragError:
                raise
            except Exception as exc:  # noqa: BLE001 - vLLM refused or failed this request
                a.fail(FailureKind.ENGINE, f"vLLM failed on this request: {exc}")
            finally:
                await outputs.aclose()
            a.text = "".join(text)
            if a.ok and a.finish_reason is None:
                a.fail(FailureKind.ENGINE, "vLLM returned no output for this request")
            a.prediction = extract_answer(a.text, self.prompt_cfg.chain_of_thought)
            a.timings["total_s"] = time.perf_counter() - t_start
            yield Finished(a)
        finally:
            self._in_flight -= 1
            if adapter_job is not None:  # each built adapter was pinned once for this question
                adapter_job.add_done_callback(lambda f, key=key: self._unpin_built(f, key))

    def _unpin_built(self, fut: Future, key: CacheKey) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.cache.unpin([key])

    async def answer_many(self, requests: Sequence[PragRequest], max_in_flight: int | None = None) -> list[Answer]:
        """Answer many questions at once, in input order: questions needing retrieval share batched
        searches, and at most ``max_in_flight`` (None: all) are inside the engine at a time."""
        requests = list(requests)
        hits: dict[int, list] = {}
        need = [i for i, r in enumerate(requests) if r.mode.needs_documents and r.doc_ids is None
                and r.question.strip()]
        if need and self._retrieval is not None:
            by_k: dict[int, list[int]] = {}
            for i in need:
                by_k.setdefault(requests[i].top_k, []).append(i)
            for k, idx in by_k.items():
                t0 = time.perf_counter()
                found = await asyncio.to_thread(self.retriever.search, [requests[i].question for i in idx], k,
                                                method=self.config.retrieval_method)
                self.last_stats.retrieve_s += time.perf_counter() - t0
                hits.update(zip(idx, found))
        gate = asyncio.Semaphore(max_in_flight) if max_in_flight else None

        async def one(i: int, req: PragRequest) -> Answer:
            if gate is None:
                return await self.answer(req, _hits=hits.get(i))
            async with gate:
                return await self.answer(req, _hits=hits.get(i))

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    def generate(self, questions: Sequence[str], mode: str = "prag", top_k: int | None = None,
                 doc_ids: Sequence[Sequence[str] | None] | None = None,
                 max_new_tokens: int | None = None, max_in_flight: int | None = None) -> list[Answer]:
        """Batch evaluation: answer ``questions`` in ``mode``; ``doc_ids[i]`` (optional) overrides retrieval.

        Per-question problems (empty question, unknown doc id, prompt too long, a missing adapter) are
        recorded in that Answer's ``error``/``error_kind`` and the rest still runs; configuration problems
        raise PragError. Runs on a private event loop, so it must not be called from inside one.
        """
        if isinstance(questions, str):
            raise PragError("generate() takes a list of questions, not a single string")
        questions = list(questions)
        if doc_ids is not None and len(doc_ids) != len(questions):
            raise PragError(f"doc_ids has {len(doc_ids)} entries for {len(questions)} questions")
        m = Mode.parse(mode)
        k = check_top_k(self.config.top_k if top_k is None else top_k, self.rank)
        if m.needs_adapter and self.max_lora_rank is not None and self.rank and k * self.rank > self.max_lora_rank:
            raise RequestInvalid("top_k", f"top_k={k} x adapter rank {self.rank} = {k * self.rank} exceeds the "
                                          f"engine's max_lora_rank {self.max_lora_rank}; lower top_k or restart "
                                          f"with a larger max_lora_rank")
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        requests, bad = [], {}
        for i, q in enumerate(questions):
            ids = doc_ids[i] if doc_ids is not None else None
            if not isinstance(q, str):
                bad[i] = Answer(question=str(q), mode=m.value).fail(
                    FailureKind.EMPTY_QUESTION, "empty question" if q is None
                    else f"question must be a string, got {type(q).__name__}")
                q = ""
            ids = None if ids is None else [str(d) for d in ids]
            try:
                requests.append(check_request(self.limits, q, m, k, n, ids or None))
            except RequestInvalid as exc:
                if exc.param != "doc_ids":
                    raise
                bad[i] = Answer(question=q, mode=m.value).fail(FailureKind.RANK_LIMIT, str(exc))
                requests.append(check_request(self.limits, q, m, k, n))
        self._check_mode_setup(m, doc_ids is not None and all(d for d in doc_ids))
        return self._run_batch(requests, bad, max_in_flight)

    def _run_batch(self, requests: list[PragRequest], bad: dict[int, Answer], max_in_flight: int | None) -> list[Answer]:
        from engine.vllm_backend.memory_lora import TIMERS

        t_start = time.perf_counter()
        stats = self.last_stats = GenerateStats(questions=len(requests))
        vllm_before = TIMERS.snapshot()
        with self._timing_lock:
            thread_before = dict(self._thread_times)
        cache_before = (self.cache.stats.hits, self.cache.stats.misses)
        live = [r for i, r in enumerate(requests) if i not in bad]
        answers = iter(asyncio.run(self.answer_many(live, max_in_flight)))
        out = [bad[i] if i in bad else next(answers) for i in range(len(requests))]
        stats.total_s = time.perf_counter() - t_start
        for a in out:
            stats.generated_tokens += len(a.output_token_ids)
            stats.prompt_tokens += len(a.prompt_token_ids) if a.ok else 0
            stats.adapter_wait_s += a.timings.get("adapter_wait_s", 0.0)
        stats.generate_s = stats.total_s - stats.retrieve_s
        keys = {a.lora_name for a in out if a.lora_name}
        stats.adapters_built = self.cache.stats.misses - cache_before[1]
        stats.adapters_reused = max(0, len(keys) - stats.adapters_built)
        stats.vllm_load_s = TIMERS.load_s - vllm_before.load_s
        stats.slot_fill_s = TIMERS.slot_fill_s - vllm_before.slot_fill_s
        with self._timing_lock:
            for name, before in thread_before.items():
                setattr(stats, name, self._thread_times[name] - before)
        return out


def _lora_limits(llm) -> tuple[int | None, int]:
    """(max_lora_rank or None if LoRA is off, max_model_len) of a ``vllm.LLM`` or ``AsyncLLM``."""
    vllm_config = llm.vllm_config if hasattr(llm, "vllm_config") else llm.llm_engine.vllm_config
    lora = getattr(vllm_config, "lora_config", None)
    return (lora.max_lora_rank if lora is not None else None), vllm_config.model_config.max_model_len
