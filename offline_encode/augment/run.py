"""Drive an augmenter over a corpus: stream, skip finished ids, write batches crash-safely, summarise.

Any augmenter works if it has ``name``, ``model``, ``batch_size`` and
``augment_documents(docs) -> list[record]`` (one record per doc, in order, never raising for a
single bad document). That per-batch call is also the unit a Ray job shards.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from prag.errors import PragError
from prag.io import check_output_file, check_readable
from offline_encode.augment.records import ResumableJsonlWriter, error_kind
from retrieval.corpus import CorpusStats, Document, iter_corpus


class Augmenter(Protocol):
    name: str
    batch_size: int

    @property
    def model(self) -> str | None: ...

    def augment_documents(self, docs: list[Document]) -> list[dict]: ...


@dataclass
class AugmentSummary:
    out_path: str
    done: int = 0  # newly written, successful
    failed: int = 0  # newly written with an "error"
    skipped_done: int = 0  # already in the output from an earlier run
    skipped_empty: int = 0  # empty texts in the corpus (never written)
    previously_failed: int = 0  # error records found in the output at start
    failure_reasons: dict[str, int] = field(default_factory=dict)
    truncated_bytes: int = 0  # a torn last line from a crash, cut off at start
    seconds: float = 0.0
    ray_address: str | None = None
    workers: int = 1

    def format(self) -> str:
        where = f", Ray at {self.ray_address} with {self.workers} worker(s)" if self.ray_address else ""
        lines = [f"augmented {self.done} document(s), {self.failed} failed, "
                 f"{self.skipped_done} skipped as already done -> {self.out_path} ({self.seconds:.1f} s{where})"]
        for reason, n in sorted(self.failure_reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  failed: {n} x {reason}")
        if self.skipped_empty:
            lines.append(f"  skipped {self.skipped_empty} document(s) with empty text")
        if self.previously_failed:
            lines.append(f"  {self.previously_failed} earlier failure(s) kept in the output "
                         "(use --retry-failed to run them again)")
        if self.truncated_bytes:
            lines.append(f"  dropped a torn last line ({self.truncated_bytes} bytes) left by an interrupted run")
        return "\n".join(lines)


def _count_lines(path: Path, limit: int | None) -> int | None:
    """Total for the progress bar; skipped for gzip or huge files, where it would cost a full read."""
    if path.suffix == ".gz" or path.stat().st_size > (1 << 30):
        return limit
    with open(path, "rb") as fh:
        n = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
    n -= 1 if path.suffix == ".tsv" else 0
    return min(n, limit) if limit is not None else n


class AugmentWorker:
    """Rebuilds an augmenter from (class, config) on a Ray worker; the engine loads once per actor."""

    def __init__(self, augmenter_cls: type, cfg: Any):
        self.augmenter = augmenter_cls(cfg)

    def run(self, docs: list[Document]) -> list[dict]:
        return self.augmenter.augment_documents(docs)


def _ray_spec(augmenter: Augmenter) -> tuple[type, Any]:
    from offline_encode.augment.llm import LLMAugmenter

    cfg = getattr(augmenter, "cfg", None)
    if cfg is None:
        raise PragError(f"augmenter {augmenter.name!r} cannot run on Ray: it has no config to rebuild it from")
    if isinstance(augmenter, LLMAugmenter) and not cfg.model:
        raise PragError("the llm augmenter on Ray needs a model path (cfg.model / --model), not an engine object")
    return type(augmenter), cfg


def augment_corpus(corpus_path: str | Path, out_path: str | Path, augmenter: Augmenter,
                   limit: int | None = None, retry_failed: bool = False, progress: bool = True,
                   batch_size: int | None = None, ray_opts: Any = None) -> AugmentSummary:
    """Augment every document of the corpus (the first ``limit``) into ``out_path``, resumably.

    Rerunning the same command skips the doc ids already in ``out_path``; a torn last line from a
    crash is cut off first. Per-document failures are written as error records and counted.
    ``ray_opts`` (``offline_encode.ray_jobs.RayOptions``) runs the batches on Ray actors, each
    rebuilding the augmenter from its config; records are then written in completion order
    (the content per document is the same: the llm augmenter seeds each document by its id).
    """
    corpus_path = check_readable(corpus_path, "corpus file")
    check_output_file(out_path, inputs=(corpus_path,))  # resuming would read (and trim) the corpus as output
    if limit is not None and limit < 1:
        raise PragError(f"--limit must be >= 1, got {limit}")
    batch = batch_size or augmenter.batch_size
    if batch < 1:
        raise PragError(f"batch size must be >= 1, got {batch}")
    t0 = time.perf_counter()
    summary = AugmentSummary(out_path=str(out_path))
    reasons: Counter[str] = Counter()
    stats = CorpusStats()
    writer = ResumableJsonlWriter(out_path, augmenter.name, augmenter.model, retry_failed=retry_failed)
    summary.truncated_bytes = writer.dropped_bytes
    summary.previously_failed = 0 if retry_failed else writer.previously_failed
    from tqdm import tqdm

    bar = tqdm(total=_count_lines(corpus_path, limit), unit="doc", desc=f"augment ({augmenter.name})",
               disable=not progress, dynamic_ncols=True)

    def commit(pending: list[Document], records: list[dict]) -> None:
        if len(records) != len(pending) or any(r["doc_id"] != d.id for r, d in zip(records, pending)):
            raise RuntimeError(f"augmenter {augmenter.name!r} returned records out of order")
        writer.write(records)
        for rec in records:
            if rec.get("error"):
                summary.failed += 1
                reasons[error_kind(rec["error"])] += 1
            else:
                summary.done += 1
        bar.update(len(pending))

    def batches() -> Iterator[list[Document]]:
        pending: list[Document] = []
        for i, doc in enumerate(iter_corpus(corpus_path, stats)):
            if limit is not None and i >= limit:
                break
            if doc.id in writer.done_ids:
                summary.skipped_done += 1
                bar.update(1)
                continue
            pending.append(doc)
            if len(pending) >= batch:
                yield pending
                pending = []
        if pending:
            yield pending

    try:
        if ray_opts is None:
            for pending in batches():
                commit(pending, augmenter.augment_documents(pending))
        else:
            from offline_encode.ray_jobs import WorkerPool, ray_session

            spec = _ray_spec(augmenter)
            summary.ray_address = ray_opts.address
            with ray_session(ray_opts):
                pool = WorkerPool(AugmentWorker, spec, ray_opts=ray_opts)
                summary.workers = pool.size
                sent: dict[int, list[Document]] = {}

                def tracked() -> Iterator[list[Document]]:
                    for i, pending in enumerate(batches()):
                        sent[i] = pending
                        yield pending

                try:
                    for i, records in pool.map("run", tracked()):
                        commit(sent.pop(i), records)
                finally:
                    pool.close()
    finally:
        bar.close()
        writer.close()
    summary.skipped_empty = stats.skipped_empty
    summary.failure_reasons = dict(reasons)
    summary.seconds = time.perf_counter() - t0
    return summary
