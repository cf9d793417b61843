"""Augmented JSONL -> one LoRA adapter per document in an adapter store (resumable, optionally on Ray).

The driver streams the augmented file twice: a cheap first pass classifies every record (trainable,
already in the store, or skipped with a reason) so the progress bar knows its total and nothing is
loaded when there is nothing to do; the second pass feeds shards of pending records to workers.
A worker (in-process, or one Ray actor per GPU / per N CPUs) loads the base model once, builds the
paper's training sequences, trains with ``BatchedLoraTrainer`` and writes a shard file; only the
driver commits shards to the store's index, so the store has a single writer and every committed
document is complete. Rerunning the same command skips committed documents.

A document whose training diverged (non-finite loss, gradient or weights, or weights that overflow the
storage dtype) is never stored: it is counted as failed with its reason, the CLI exits with
``EXIT_DOCS_FAILED``, and since it is not in the store a rerun trains it again (and, training being
deterministic, reports it again unless the settings changed).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from offline_encode.augment.records import record_doc_id, record_problem
from offline_encode.config import EncodeConfig
from offline_encode.ray_jobs import RayOptions, WorkerPool, chunked, ray_session
from prag.store import AdapterStore, Layout, ShardMeta, StoreSpec, model_fingerprint, write_shard_file
from prag.errors import PragError
from prag.io import OutputKind, check_readable, iter_jsonl, json_marker, read_json, resumable_output_dir, sha256_file
from prag.model_files import check_model_dir
from prag.prompt import PromptConfig

ALREADY = "already in the store"
# --out: an existing adapter store is resumed; any other non-empty folder is refused
STORE_OUTPUT = OutputKind("an adapter store", "prag encode", json_marker("manifest.json", format="prag-adapter-store"))
DEFAULT_SHARD_DOCS = 256
EXIT_DOCS_FAILED = 3  # `prag encode`'s exit status when the run finished but some documents failed
TORN_LINE = "torn last line (no newline, not valid JSON: its writer was interrupted)"


def storage_overflow(adapter: dict, storage_dtype: str) -> tuple[str, str] | None:
    """(reason, detail) when finite fp32 weights would become inf in ``storage_dtype`` (float16 stops at 65504)."""
    import torch

    dtype = getattr(torch, storage_dtype)
    for key, tensor in adapter.items():
        if not bool(torch.isfinite(tensor.to(dtype)).all()):
            return (f"adapter weights overflow the storage dtype {storage_dtype}",
                    f"{key}: max |w| {tensor.abs().max().item():.3g}")
    return None


@dataclass
class EncodeSummary:
    """What an encode run did; ``format()`` is the CLI's report."""

    augmented: str
    store: str
    records: int = 0
    trained: int = 0
    already_encoded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # reason -> documents trained but not stored
    failed_docs: dict[str, list[str]] = field(default_factory=dict)  # doc_id -> [reason, detail]
    docs_in_store: int = 0
    shards_written: int = 0
    bytes_per_doc: int = 0
    storage_dtype: str = ""
    seconds: float = 0.0
    train_seconds: float = 0.0
    workers: int = 1
    ray_address: str | None = None

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def add_failure(self, doc_id: str, reason: str, detail: str = "") -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1
        self.failed_docs[doc_id] = [reason, detail]

    @property
    def docs_per_s(self) -> float:
        return self.trained / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "docs_per_s": self.docs_per_s}

    def format(self) -> str:
        lines = [
            f"encoded {self.trained} document(s) into {self.store} "
            f"({self.docs_in_store} in the store, {self.shards_written} new shard(s))",
            f"  records read: {self.records}; already encoded (skipped): {self.already_encoded}",
        ]
        for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            examples = ", ".join(self.skipped_examples.get(reason, []))
            lines.append(f"  skipped {count}: {reason}" + (f" (e.g. {examples})" if examples else ""))
        for reason, count in sorted(self.failed.items(), key=lambda kv: -kv[1]):
            examples = [f"doc_id {d!r} {detail}".rstrip() for d, (r, detail) in self.failed_docs.items()
                        if r == reason][:3]
            lines.append(f"  FAILED {count} (not stored): {reason}; e.g. {', '.join(examples)}")
        if self.failed:
            lines.append(f"  {self.n_failed} document(s) failed and were not stored; a rerun trains them again")
        lines.append(f"  {self.bytes_per_doc:,} bytes per document ({self.storage_dtype})")
        where = f"Ray at {self.ray_address}, {self.workers} worker(s)" if self.ray_address else "in-process"
        lines.append(f"  {self.seconds:.1f} s total, {self.docs_per_s:.2f} docs/s ({where})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Pass 1: which records are trainable


@dataclass
class _Plan:
    pending_lines: list[int]
    augmenters: set[str]
    models: set[str]


def _classify(augmented: Path, store: AdapterStore | None, summary: EncodeSummary) -> _Plan:
    seen: set[str] = set()
    plan = _Plan([], set(), set())
    skipped: Counter[str] = Counter()
    def torn(lineno: int) -> None:
        print(f"warning: {augmented}:{lineno}: {TORN_LINE}; that record is skipped (rerun `prag augment` to "
              f"complete the file)", file=sys.stderr)
        skipped[TORN_LINE] += 1
        summary.skipped_examples.setdefault(TORN_LINE, []).append(f"line {lineno}")

    for lineno, record in iter_jsonl(augmented, "augmented file", allow_torn_tail=True, on_torn_tail=torn):
        summary.records += 1
        reason = record_problem(record)
        doc_id = record_doc_id(record)
        if reason is None and doc_id in seen:
            reason = "duplicate doc_id (the first occurrence is used)"
        if reason is not None:
            skipped[reason] += 1
            examples = summary.skipped_examples.setdefault(reason, [])
            if len(examples) < 3:
                examples.append(f"line {lineno}" + (f" doc_id {doc_id!r}" if doc_id else ""))
            continue
        seen.add(doc_id)
        if isinstance(record.get("augmenter"), str):
            plan.augmenters.add(record["augmenter"])
        if isinstance(record.get("model"), str):
            plan.models.add(record["model"])
        if store is not None and doc_id in store:
            summary.already_encoded += 1
            continue
        plan.pending_lines.append(lineno)
    summary.skipped = dict(skipped)
    return plan


def _pending_records(augmented: Path, lines: list[int]) -> Iterator[dict]:
    wanted = iter(lines)
    nxt = next(wanted, None)
    for lineno, record in iter_jsonl(augmented, "augmented file", allow_torn_tail=True):
        if nxt is None:
            return
        if lineno == nxt:
            yield {**record, "doc_id": record_doc_id(record)}
            nxt = next(wanted, None)
    if nxt is not None:
        raise PragError(f"{augmented} changed while encoding (line {nxt} disappeared); rerun to resume")


# --------------------------------------------------------------------------------------------
# The worker: one per process / Ray actor, loads the model once


class EncodeWorker:
    """Builds training sequences, trains a shard of documents and writes its shard file."""

    def __init__(self, model: str, cfg: EncodeConfig, store_dir: str, prompt_cfg: PromptConfig):
        self.model, self.cfg, self.store_dir, self.prompt_cfg = model, cfg, Path(store_dir), prompt_cfg
        self._trainer = None
        self._layout: Layout | None = None
        # Two calls may run at once (WorkerPool concurrency 2): one trains while the other writes its shard.
        self._train_lock = threading.Lock()
        # In-process only: called per training step with the documents' worth of work done (a Ray actor
        # reports per shard, through its result)
        self.on_progress: Callable[[float], None] | None = None

    def _get_trainer(self):
        if self._trainer is None:
            from offline_encode.trainer import BatchedLoraTrainer

            init = None
            if AdapterStore.exists(self.store_dir):  # workers after the first reuse the stored init
                store = AdapterStore.open(self.store_dir)
                try:
                    init = store.init_adapter()
                finally:
                    store.close()
            self._trainer = BatchedLoraTrainer(self.model, self.cfg, init_adapter=init)
        return self._trainer

    def init_adapter(self) -> dict:
        """The shared initial adapter (made from ``cfg.init_seed``); called once to create the store."""
        with self._train_lock:
            return self._get_trainer().init_adapter

    def encode_shard(self, records: list[dict]) -> tuple[ShardMeta | None, float, list[tuple[str, str, str]]]:
        """Train a shard's documents and write its shard file (not committed: the driver does that).

        Returns the shard (None when every document failed), the training seconds and the failed
        documents as ``(doc_id, reason, detail)``; a failed document's adapter is left out of the shard.
        """
        from offline_encode.training_data import build_training_sequences

        with self._train_lock:
            trainer = self._get_trainer()
            if self._layout is None:
                manifest = read_json(self.store_dir / "manifest.json", "adapter store manifest")
                self._layout = Layout.from_json(manifest["layout"])
            docs = [build_training_sequences(trainer.tokenizer, r, self.prompt_cfg, self.cfg.with_cot)
                    for r in records]
            start = time.perf_counter()
            adapters = trainer.train(docs, on_progress=self.on_progress)
            seconds = time.perf_counter() - start
            failed = {i: (f.reason, f.detail) for i, f in trainer.last_stats.failed.items()}
        for i, adapter in enumerate(adapters):
            if i not in failed and (overflow := storage_overflow(adapter, self.cfg.storage_dtype)) is not None:
                failed[i] = overflow
        failures = [(records[i]["doc_id"], *failed[i]) for i in sorted(failed)]
        keep = [i for i in range(len(records)) if i not in failed]
        if not keep:
            return None, seconds, failures
        meta = write_shard_file(self.store_dir, self._layout, self.cfg.storage_dtype,  # overlaps the next train
                                [records[i]["doc_id"] for i in keep], [adapters[i] for i in keep])
        return meta, seconds, failures


# --------------------------------------------------------------------------------------------
# The driver


def source_key(augmentation: dict) -> tuple:
    """What makes two augmented inputs one source: the file, its augmenter(s) and model(s). Its sha256
    is recorded too, but not compared: an augmentation that was resumed or extended is the same source."""
    return augmentation.get("path"), tuple(augmentation.get("augmenter") or ()), tuple(augmentation.get("model") or ())


def check_same_source(store: AdapterStore, augmentation: dict, append: bool) -> None:
    """Refuse to mix another augmented source into a store silently (its documents would be skipped as
    'already encoded' when their ids repeat, or mixed in unannounced when they do not)."""
    recorded = store.manifest.get("augmentation") or []
    if append or not recorded or any(source_key(a) == source_key(augmentation) for a in recorded):
        return
    shown = "; ".join(f"{a.get('path')} (augmenter {', '.join(a.get('augmenter') or ['?'])})" for a in recorded[:3])
    raise PragError(f"adapter store {store.path} was encoded from {shown}, not from {augmentation['path']} "
                    f"(augmenter {', '.join(augmentation['augmenter']) or '?'}). Pass --append to add this source's "
                    f"documents (ids already in the store are kept, not retrained), or choose another --out")


def encode_corpus(augmented_path: str | Path, model: str | Path, store_dir: str | Path,
                  cfg: EncodeConfig = EncodeConfig(), ray_address: str | None = None, progress: bool = True,
                  *, docs_per_shard: int | None = None, prompt_cfg: PromptConfig = PromptConfig(),
                  ray_opts: RayOptions | None = None, append: bool = False) -> EncodeSummary:
    """Train an adapter for every trainable, not yet encoded record of ``augmented_path`` into ``store_dir``.

    An existing store keeps to its augmented source (same file, augmenter and model; the file may
    have grown since); ``append=True`` is the explicit way to add documents from another source.

    ``docs_per_shard`` documents are trained and committed together (default 256, or fewer on Ray
    so that every worker gets shards); a killed run loses at most the shards in flight. ``ray_address``
    (``host:port``, ``ray://...``, ``auto`` or ``local``) runs the shards on Ray actors; the
    store directory must then be on a filesystem every node can write.

    ``store_dir`` must be new, empty or an adapter store (resumed); a failed run that created it
    removes it again unless it already holds a store (then rerunning resumes).
    """
    started = time.perf_counter()
    augmented = check_readable(augmented_path, "augmented file")
    if docs_per_shard is not None and (isinstance(docs_per_shard, bool) or not isinstance(docs_per_shard, int)
                                       or docs_per_shard < 1):
        raise PragError(f"--docs-per-shard must be a whole number >= 1, got {docs_per_shard!r}")
    check_model_dir(model)  # a truncated weight file or no tokenizer: a named error before any work
    with resumable_output_dir(store_dir, STORE_OUTPUT, inputs=(augmented, model),
                              what="adapter store directory (--out)") as store_dir:
        return _encode_corpus(augmented, model, store_dir, cfg, ray_address, progress, docs_per_shard, prompt_cfg,
                              ray_opts, started, append)


def _encode_corpus(augmented: Path, model: str | Path, store_dir: Path, cfg: EncodeConfig, ray_address: str | None,
                   progress: bool, docs_per_shard: int | None, prompt_cfg: PromptConfig, ray_opts: RayOptions | None,
                   started: float, append: bool = False) -> EncodeSummary:
    shard_docs = max(docs_per_shard or DEFAULT_SHARD_DOCS, 1)
    summary = EncodeSummary(augmented=str(augmented), store=str(store_dir), storage_dtype=cfg.storage_dtype,
                            ray_address=ray_address)
    fingerprint = model_fingerprint(model)
    spec = StoreSpec(base_model=str(model), model_fingerprint=fingerprint, rank=cfg.rank, alpha=cfg.alpha,
                     target_modules=tuple(cfg.target_modules), storage_dtype=cfg.storage_dtype,
                     encode_config=cfg.to_dict(), prompt_config=asdict(prompt_cfg))

    store: AdapterStore | None = None
    if AdapterStore.exists(store_dir):
        store = AdapterStore.create_or_open(store_dir, spec)  # checks model / rank / targets / config
    try:
        plan = _classify(augmented, store, summary)
        if store is None and not plan.pending_lines:
            reasons = "; ".join(f"{n} {r}" for r, n in sorted(summary.skipped.items(), key=lambda kv: -kv[1]))
            raise PragError(f"{augmented}: no trainable records ({summary.records} read"
                            + (f"; skipped: {reasons}" if reasons else "") + "); no adapter store was created")
        spec.augmentation = {"path": str(augmented.resolve()), "sha256": sha256_file(augmented),
                             "augmenter": sorted(plan.augmenters), "model": sorted(plan.models)}
        if store is not None:
            check_same_source(store, spec.augmentation, append)
            store.record_augmentation(spec.augmentation)
        if plan.pending_lines:
            store = _train_pending(augmented, model, store_dir, cfg, prompt_cfg, spec, store, plan, shard_docs,
                                   docs_per_shard is not None, ray_address, ray_opts, progress, summary)
        summary.docs_in_store = len(store) if store is not None else 0
        summary.bytes_per_doc = store.bytes_per_doc if store is not None else 0
    finally:
        if store is not None:
            store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _train_pending(augmented: Path, model, store_dir: Path, cfg: EncodeConfig, prompt_cfg: PromptConfig,
                   spec: StoreSpec, store: AdapterStore | None, plan: _Plan, shard_docs: int,
                   explicit_shard_size: bool, ray_address: str | None, ray_opts: RayOptions | None, progress: bool,
                   summary: EncodeSummary) -> AdapterStore:
    opts = None
    if ray_address is not None:
        opts = ray_opts or RayOptions(address=ray_address)
        if opts.address != ray_address:
            opts = RayOptions(**{**asdict(opts), "address": ray_address})
    with ray_session(opts) if opts is not None else contextlib.nullcontext():
        pool = WorkerPool(EncodeWorker, (str(model), cfg, str(store_dir), prompt_cfg), ray_opts=opts, concurrency=2)
        try:
            summary.workers = pool.size
            if store is None:
                store = AdapterStore.create_or_open(store_dir, spec, init_adapter=lambda: pool.call_first(
                    "init_adapter"))
                created = store
            else:
                created = None
            try:
                _run_shards(pool, store, augmented, plan, shard_docs, explicit_shard_size, progress, summary)
            except BaseException:
                if created is not None:  # the caller never sees it: release the writer lock here
                    created.close()
                raise
        finally:
            pool.close()
    return store


def _run_shards(pool: WorkerPool, store: AdapterStore, augmented: Path, plan: _Plan, shard_docs: int,
                explicit_shard_size: bool, progress: bool, summary: EncodeSummary) -> None:
    """Feed shards of pending records to the workers and commit each finished shard (single writer)."""
    n_pending = len(plan.pending_lines)
    if pool.size > 1 and not explicit_shard_size:  # enough shards to keep every worker busy
        shard_docs = max(1, min(shard_docs, -(-n_pending // (2 * pool.size))))
    bar = None
    if progress:
        from tqdm import tqdm

        # docs/s and an ETA from tqdm; in-process the bar moves every training step, on Ray per shard
        bar = tqdm(total=n_pending, desc="encode", unit="doc", smoothing=0.1,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
        if pool.local_worker is not None:  # per-step fractions may overshoot the total by a rounding error
            pool.local_worker.on_progress = lambda docs: bar.update(max(0.0, min(docs, bar.total - bar.n)))
    try:
        shards = chunked(_pending_records(augmented, plan.pending_lines), shard_docs)
        for _, (meta, train_seconds, failures) in pool.map("encode_shard", shards):
            if meta is not None:
                store.commit_shard(meta)
                summary.trained += len(meta.doc_ids)
                summary.shards_written += 1
            summary.train_seconds += train_seconds
            for doc_id, reason, detail in failures:
                summary.add_failure(doc_id, reason, detail)
            if bar is not None and pool.local_worker is None:
                bar.update((len(meta.doc_ids) if meta is not None else 0) + len(failures))
    finally:
        if bar is not None:
            if pool.local_worker is not None:
                pool.local_worker.on_progress = None
            bar.close()
