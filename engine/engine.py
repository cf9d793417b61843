"""The PRAG engine: question -> top-k doc ids -> merged adapter (cached) -> one batched vLLM run -> answer.

Modes (the paper's names):

* ``none``    - the question alone;
* ``rag``     - the top-k passages in the prompt;
* ``prag``    - the cat-merged adapter of the top-k documents, no passages;
* ``combine`` - both.

Batching and overlap. ``generate`` sends every question of a call to the same vLLM engine so
continuous batching works across all of them, each request carrying its own ``LoRARequest``.
Adapters are prepared ahead on a thread pool (store read -> cat-merge -> PEFT dir on tmpfs, one
job per distinct document set) while the main thread retrieves passages and tokenises prompts.
Requests are then *enqueued* into vLLM as soon as their adapter is ready (``LLM.enqueue``): the
engine core runs in its own process, so it starts decoding the first requests while later
adapters are still being merged, and new requests join the running batch at the next step.
One ``wait_for_completion`` collects everything (a vLLM without ``enqueue`` gets one ``generate``
call with a per-prompt ``lora_request`` list instead). Repeated document sets hit the merged-adapter
cache (stable ``lora_name``/``lora_int_id``) and therefore vLLM's own adapter cache too.

The merge order inside an adapter is the sorted doc-id order (the cache key), so the same set
retrieved in another order reuses the adapter; the delta is a sum, so order does not change it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.adapter_cache import DEFAULT_MAX_BYTES, CachedAdapter, CacheKey, MergedAdapterCache, make_key
from engine.merge import MergedAdapter, RowMerge
from engine.prompts import build_prompt, prompt_config
from engine.eval.scoring import extract_answer
from prag.errors import PragError
from engine.vllm_backend.llm import SUPPORTED_LORA_RANKS, LLMConfig, has_cuda, make_llm, shutdown_llm, smallest_lora_rank
from prag.prompt import PromptConfig

log = logging.getLogger(__name__)

MODES = ("none", "rag", "prag", "combine")
PASSAGE_MODES = ("rag", "combine")
ADAPTER_MODES = ("prag", "combine")
# What a retrieved document without an adapter does to a prag/combine question: "error" fails the
# question (the eval harness fails the whole run before generating, listing the gap), "skip-doc" merges
# only the documents that have adapters, "fallback-rag" also puts the others in the prompt as passages.
MISSING_ADAPTER_POLICIES = ("error", "skip-doc", "fallback-rag")


def check_missing_policy(policy: str) -> str:
    if policy not in MISSING_ADAPTER_POLICIES:
        raise PragError(f"--on-missing-adapter must be one of {', '.join(MISSING_ADAPTER_POLICIES)}, got {policy!r}")
    return policy
MAX_LORA_RANK = SUPPORTED_LORA_RANKS[-1]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise PragError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


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
        raise PragError(f"top_k must be a positive integer, got top_k={top_k!r}")
    rank = rank or 1  # unknown until the store is open; no adapter has rank < 1
    if top_k * rank > MAX_LORA_RANK:
        raise PragError(f"top_k={top_k} with adapter rank {rank} gives a merged rank of {top_k * rank}, above "
                        f"vLLM's largest max_lora_rank {MAX_LORA_RANK}; use top_k <= {MAX_LORA_RANK // rank}")
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

    def resolved_prepare_threads(self) -> int:
        if self.prepare_threads is not None:
            if self.prepare_threads < 1:
                raise PragError(f"prepare_threads must be >= 1, got {self.prepare_threads}")
            return self.prepare_threads
        return 4 if has_cuda() else 1

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
    truncated: bool = False
    truncation: dict | None = None
    lora_name: str | None = None
    finish_reason: str | None = None
    # retrieved documents that had no adapter, and the policy that handled them (None: none missing)
    missing_doc_ids: list[str] = field(default_factory=list)
    on_missing_adapter: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateStats:
    """Timing of the last ``generate`` call (seconds) and adapter-cache activity."""

    questions: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    retrieve_s: float = 0.0
    prompt_s: float = 0.0
    adapter_wait_s: float = 0.0  # time vLLM sat idle waiting for the first (or next) merged adapter
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


def _llm_lora_limits(llm) -> tuple[int | None, int]:
    """(max_lora_rank or None if LoRA is off, max_model_len) of an existing ``vllm.LLM``."""
    engine = llm.llm_engine
    lora = getattr(engine.vllm_config, "lora_config", None)
    return (lora.max_lora_rank if lora is not None else None), engine.model_config.max_model_len


def _external_id(request_id: str) -> str:
    """vLLM appends '-<8 random chars>' to the id LLM.enqueue hands out; outputs carry the bare id."""
    head, sep, tail = request_id.rpartition("-")
    return head if sep and head and len(tail) == 8 else request_id


def _unpin_when_built(cache: MergedAdapterCache, key: CacheKey, fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        cache.unpin([key])


class Engine:
    """Serve the four modes over one vLLM engine. See the module doc for the batching design."""

    def __init__(self, model: str | os.PathLike, index: Any = None, store: Any = None,
                 config: EngineConfig | None = None, *, llm: Any = None,
                 documents: Mapping[str, Any] | None = None, tokenizer: Any = None):
        """``index``: a ``retrieval.Retriever`` or an index directory; ``store``: an ``AdapterStore``
        or its directory; ``llm``: an existing ``vllm.LLM`` to reuse (else one is built);
        ``documents``: doc id -> text (or ``Document``) for passages when there is no index."""
        from prag.model_files import check_model_dir

        # missing model, truncated weights or no tokenizer: a named error before vLLM. The tokenizer and
        # vLLM load the resolved directory, so a cached hub id never sends them to the network.
        self.model_dir = str(check_model_dir(model))
        self.model = str(model)
        self.config = config or EngineConfig()
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
            llm = make_llm(self.config.llm_config(self.model_dir, rank, enable_lora=self.store is not None,
                                                  lora_target_modules=targets))
            self._owns_llm = True
        else:
            self._owns_llm = False
        self.llm = llm
        self.max_lora_rank, self.max_model_len = _llm_lora_limits(llm)
        if self.store is not None and self.max_lora_rank is not None and needed > self.max_lora_rank:
            raise PragError(f"top_k={self.config.top_k} x rank {self.rank} needs max_lora_rank >= "
                            f"{self.config.top_k * self.rank}, but the vLLM engine has {self.max_lora_rank}")
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
        self._generate_lock = threading.Lock()  # one batch at a time on the shared vLLM engine
        self._row_merges: dict[int, Any] = {}
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
        self._pool.shutdown(wait=True)
        self.cache.close()
        if self._owns_llm:
            shutdown_llm(self.llm)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pieces of the per-question flow ---------------------------------------------------------
    def _adapter(self, key: CacheKey) -> CachedAdapter:
        """Read the documents' adapters, cat-merge them (sorted doc-id order) and write the dir; cached."""
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

    def _passages(self, answers: Sequence[Answer], idx: Sequence[int],
                  which: Mapping[int, list[str]] | None = None) -> dict[int, list[str]]:
        """Passage texts per question (its ``doc_ids``, or ``which[i]``); a question whose documents cannot
        be fetched gets an error."""
        out: dict[int, list[str]] = {}
        ids_of = (lambda i: which[i]) if which is not None else (lambda i: answers[i].doc_ids)
        unique = list(dict.fromkeys(d for i in idx for d in ids_of(i)))
        texts: dict[str, str] = {}
        if self.documents is not None:
            for d in unique:
                if d in self.documents:
                    doc = self.documents[d]
                    texts[d] = doc if isinstance(doc, str) else doc.text
        elif self.retriever is not None and unique:
            try:
                texts = {d: doc.text for d, doc in zip(unique, self.retriever.fetch(unique))}
            except PragError:  # some id is unknown: find which, keep the rest
                for d in unique:
                    try:
                        texts[d] = self.retriever.fetch([d])[0].text
                    except PragError:
                        pass
        for i in idx:
            missing = [d for d in ids_of(i) if d not in texts]
            if missing:
                src = "the documents mapping" if self.documents is not None else "the index"
                answers[i].error = f"document id(s) {missing[:5]} not found in {src}" \
                    if (self.documents is not None or self.retriever is not None) \
                    else "mode needs passages but the engine has no index or documents"
            else:
                out[i] = [texts[d] for d in ids_of(i)]
        return out

    # -- the public call -------------------------------------------------------------------------
    def generate(self, questions: Sequence[str], mode: str = "prag", top_k: int | None = None,
                 doc_ids: Sequence[Sequence[str] | None] | None = None,
                 max_new_tokens: int | None = None) -> list[Answer]:
        """Answer ``questions`` in ``mode``; ``doc_ids[i]`` (optional) overrides retrieval for question i.

        Per-question problems (empty question, unknown doc id, prompt too long) are recorded in that
        Answer's ``error`` and the rest of the batch still runs; configuration problems raise PragError.
        """
        check_mode(mode)
        check_missing_policy(self.config.on_missing_adapter)
        if isinstance(questions, str):
            raise PragError("generate() takes a list of questions, not a single string")
        questions = list(questions)
        k = check_top_k(self.config.top_k if top_k is None else top_k, self.rank)
        if doc_ids is not None and len(doc_ids) != len(questions):
            raise PragError(f"doc_ids has {len(doc_ids)} entries for {len(questions)} questions")
        if mode in ADAPTER_MODES:
            if self.store is None:
                raise PragError(f"mode {mode!r} needs an adapter store (--store)")
            if self.max_lora_rank is None:
                raise PragError(f"mode {mode!r} needs a vLLM engine with LoRA enabled")
            if k * self.rank > self.max_lora_rank:
                raise PragError(f"top_k={k} x adapter rank {self.rank} = {k * self.rank} exceeds the engine's "
                                f"max_lora_rank {self.max_lora_rank}; lower top_k or restart with a larger "
                                f"max_lora_rank")
        new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens <= 0:
            raise PragError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        with self._generate_lock:
            return self._generate(questions, mode, k, doc_ids, new_tokens)

    def _generate(self, questions: list, mode: str, k: int, doc_ids, max_new_tokens: int) -> list[Answer]:
        t_start = time.perf_counter()
        stats = GenerateStats(questions=len(questions))
        from engine.vllm_backend.memory_lora import TIMERS

        vllm_before = TIMERS.snapshot()
        with self._timing_lock:
            thread_before = dict(self._thread_times)
        answers = [Answer(question=q if isinstance(q, str) else str(q), mode=mode) for q in questions]
        for a, q in zip(answers, questions):
            if not isinstance(q, str) or not q.strip():
                a.error = "empty question" if isinstance(q, str) or q is None else \
                    f"question must be a string, got {type(q).__name__}"
        live = [i for i, a in enumerate(answers) if a.ok]

        # 1. doc ids: explicit ones, else one batched retrieval call
        if mode != "none":
            need = []
            for i in live:
                given = doc_ids[i] if doc_ids is not None else None
                if given is None:
                    need.append(i)
                else:
                    answers[i].doc_ids = [str(d) for d in given]
            if need:
                if self.retriever is None:
                    raise PragError(f"mode {mode!r} needs an index (--index) or explicit doc_ids")
                t0 = time.perf_counter()
                hits = self.retriever.search([questions[i] for i in need], k, method=self.config.retrieval_method)
                stats.retrieve_s = time.perf_counter() - t0
                for i, h in zip(need, hits):
                    answers[i].doc_ids = [d for d, _ in h]
                    answers[i].scores = [float(s) for _, s in h]
            for i in live:
                if not answers[i].doc_ids:
                    answers[i].error = "no documents retrieved for this question"
            live = [i for i in live if answers[i].ok]

        # 2. adapters: one job per distinct document set, started now, finished while we tokenise
        futures: dict[CacheKey, Future] = {}
        keys: dict[int, CacheKey] = {}
        fallback_passages: dict[int, list[str]] = {}  # prag + fallback-rag: the adapter-less documents
        if mode in ADAPTER_MODES:
            version = self.store.version
            policy = self.config.on_missing_adapter
            if policy != "error":  # "error": the merge below raises MissingAdapterError for that question
                unique = list(dict.fromkeys(d for i in live for d in answers[i].doc_ids))
                absent = set(self.store.missing(unique))
                for i in live:
                    a = answers[i]
                    a.missing_doc_ids = [d for d in a.doc_ids if d in absent]
                    if a.missing_doc_ids:
                        a.on_missing_adapter = policy
                        if policy == "fallback-rag" and mode not in PASSAGE_MODES:
                            fallback_passages[i] = a.missing_doc_ids
            for i in live:
                present = [d for d in answers[i].doc_ids if d not in answers[i].missing_doc_ids]
                if not present:  # skip-doc / fallback-rag with no adapter at all: the base model answers
                    continue
                key = make_key(present, version)
                if len(key[0]) * self.rank > self.max_lora_rank:
                    answers[i].error = (f"{len(key[0])} documents x rank {self.rank} exceed the engine's "
                                        f"max_lora_rank {self.max_lora_rank}")
                    continue
                keys[i] = key
                if key not in futures:
                    if key in self.cache:
                        stats.adapters_reused += 1
                    futures[key] = self._pool.submit(self._adapter, key)
            live = [i for i in live if answers[i].ok]

        request_ids: dict[str, int] = {}  # vLLM's (internal) request id -> question index
        try:
            # 3. passages and prompt token ids (main thread, overlapping the adapter jobs)
            t0 = time.perf_counter()
            passages = self._passages(answers, live) if mode in PASSAGE_MODES else \
                self._passages(answers, list(fallback_passages), fallback_passages)
            live = [i for i in live if answers[i].ok]
            budget = self.max_model_len - max_new_tokens
            for i in live:
                try:
                    built = build_prompt(self.tokenizer, questions[i], passages.get(i), self.prompt_cfg, budget)
                except PragError as exc:
                    answers[i].error = str(exc)
                    continue
                a = answers[i]
                a.prompt_token_ids, a.prompt = built.ids, built.text
                if built.truncation is not None:
                    a.truncated, a.truncation = True, built.truncation
            live = [i for i in live if answers[i].ok]
            stats.prompt_s = time.perf_counter() - t0

            # 4. each request goes into vLLM as soon as its adapter is ready, and the engine steps
            #    while the other adapters are still being built, so generation overlaps preparation
            #    (an in-process vLLM engine only runs when stepped)
            from vllm import SamplingParams, TokensPrompt
            from vllm.lora.request import LoRARequest

            params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
            t_gen = time.perf_counter()

            can_enqueue = hasattr(self.llm, "enqueue") and hasattr(getattr(self.llm, "llm_engine", None), "step")
            deferred: list[tuple[int, LoRARequest | None]] = []  # vLLM without enqueue: one generate call
            outputs: list = []

            def submit(idx: list[int], lora: LoRARequest | None) -> None:
                if not idx:
                    return
                if not can_enqueue:
                    deferred.extend((i, lora) for i in idx)
                    return
                prompts = [TokensPrompt(prompt_token_ids=answers[i].prompt_token_ids) for i in idx]
                ids = self.llm.enqueue(prompts, params, lora_request=lora, use_tqdm=False)
                request_ids.update(zip(ids, idx))

            def running() -> bool:
                return can_enqueue and bool(request_ids) and self.llm.llm_engine.has_unfinished_requests()

            def step() -> None:  # what vllm.LLM.wait_for_completion does, one step at a time
                outputs.extend(out for out in self.llm.llm_engine.step() if out.finished)

            if mode not in ADAPTER_MODES:
                submit(live, None)
            else:
                by_key: dict[CacheKey, list[int]] = {}
                for i in live:
                    if i in keys:
                        by_key.setdefault(keys[i], []).append(i)
                submit([i for i in live if i not in keys], None)  # every document lacked an adapter
                waiting = {futures[key]: key for key in by_key}
                while waiting:
                    done = [fut for fut in waiting if fut.done()]
                    if not done:
                        if running():
                            step()
                            continue
                        t0 = time.perf_counter()
                        done, _ = wait(list(waiting), return_when=FIRST_COMPLETED)
                        stats.adapter_wait_s += time.perf_counter() - t0
                    for fut in done:
                        key = waiting.pop(fut)
                        try:
                            entry = fut.result()
                        except PragError as exc:  # e.g. MissingAdapterError: those questions fail, run goes on
                            for i in by_key[key]:
                                answers[i].error = str(exc)
                            continue
                        lora = LoRARequest(entry.lora_name, entry.lora_int_id, entry.lora_path)
                        for i in by_key[key]:
                            answers[i].lora_name = entry.lora_name
                        submit(by_key[key], lora)
                stats.adapters_built = len(by_key) - stats.adapters_reused
            if deferred:
                outputs = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=answers[i].prompt_token_ids) for i, _ in deferred], params,
                    lora_request=[lora for _, lora in deferred], use_tqdm=False)
                request_ids.update((out.request_id, i) for out, (i, _) in zip(outputs, deferred))
            while running():
                step()
            stats.generate_s = time.perf_counter() - t_gen
        except BaseException:
            if request_ids:  # do not leave our requests running inside the shared engine
                self.llm.llm_engine.abort_request(list(request_ids), internal=True)
            raise
        finally:
            # each successful adapter job pinned its entry once; release it (now, or when a job
            # still running after an error finishes)
            for key, fut in futures.items():
                fut.cancel()
                fut.add_done_callback(partial(_unpin_when_built, self.cache, key))

        by_external = {_external_id(r): i for r, i in request_ids.items()}
        for out in outputs:
            i = request_ids.get(out.request_id, by_external.get(_external_id(out.request_id)))
            if i is None:
                continue
            a, comp = answers[i], out.outputs[0]
            a.text = comp.text
            a.output_token_ids = list(comp.token_ids)
            a.finish_reason = comp.finish_reason
            a.prediction = extract_answer(comp.text, self.prompt_cfg.chain_of_thought)
            stats.generated_tokens += len(comp.token_ids)
            stats.prompt_tokens += len(a.prompt_token_ids)
        for i in request_ids.values():
            if answers[i].finish_reason is None and answers[i].ok:
                answers[i].error = "vLLM returned no output for this request"
        stats.total_s = time.perf_counter() - t_start
        stats.vllm_load_s = TIMERS.load_s - vllm_before.load_s
        stats.slot_fill_s = TIMERS.slot_fill_s - vllm_before.slot_fill_s
        with self._timing_lock:  # adapter jobs cancelled after an error may still add a little
            for name, before in thread_before.items():
                setattr(stats, name, self._thread_times[name] - before)
        self.last_stats = stats
        return answers
