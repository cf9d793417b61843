"""``prag augment|encode|export-adapter``: thin handlers over offline_encode's library functions."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    _register_augment(sub)
    _register_encode(sub)
    _register_export_adapter(sub)
    _register_store(sub)


# --- prag encode / export-adapter (owned by the store + encode work) ---
def _encode(args: argparse.Namespace) -> int:
    import json

    from offline_encode.config import EncodeConfig
    from offline_encode.encode import encode_corpus
    from offline_encode.ray_jobs import RayOptions

    defaults = EncodeConfig()
    cfg = EncodeConfig(
        rank=args.rank, alpha=args.alpha,
        target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets
        else defaults.target_modules,
        learning_rate=args.lr, epochs=args.epochs, weight_decay=args.weight_decay,
        docs_per_step=args.docs_per_step, compute_dtype=args.compute_dtype, storage_dtype=args.storage_dtype,
        init_seed=args.init_seed, loss_chunk_tokens=args.loss_chunk_tokens, device=args.device,
        with_cot=args.with_cot)
    ray_opts = None
    if args.ray_address:
        ray_opts = RayOptions(address=args.ray_address, num_cpus=args.ray_num_cpus,
                              cpus_per_actor=args.ray_cpus_per_actor, max_actors=args.ray_max_actors,
                              gpu_actors=args.ray_gpu_actors)
    summary = encode_corpus(args.augmented, args.model, args.out, cfg, ray_address=args.ray_address,
                            progress=not args.no_progress, docs_per_shard=args.docs_per_shard, ray_opts=ray_opts,
                            append=args.append)
    print(summary.format())
    if args.summary_json:
        from prag.io import atomic_write_json

        atomic_write_json(args.summary_json, summary.to_dict())
    elif args.json:
        print(json.dumps(summary.to_dict()))
    if summary.failed:
        import sys

        from offline_encode.encode import EXIT_DOCS_FAILED

        print(f"prag encode: error: {summary.n_failed} document(s) failed and were not stored "
              f"({'; '.join(summary.failed)}); exit status {EXIT_DOCS_FAILED}", file=sys.stderr)
        return EXIT_DOCS_FAILED
    return 0


def _register_encode(sub) -> None:
    from offline_encode.config import EncodeConfig

    d = EncodeConfig()
    p = sub.add_parser("encode", help="train one LoRA adapter per document into an adapter store (resumable); "
                       "exit status 3 when some documents failed (diverged) and were not stored")
    p.add_argument("--augmented", required=True, help="augmented JSONL from `prag augment`")
    p.add_argument("--model", required=True, help="base model directory (Hugging Face format, safetensors)")
    p.add_argument("--out", required=True, help="adapter store directory: new, empty, or a store to resume "
                   "(rerunning skips encoded docs); any other folder is refused")
    p.add_argument("--ray-address", help="run on Ray: a cluster address (host:port or ray://host:port), "
                   "'auto' (the cluster of this machine, e.g. under `ray job submit`) or 'local' (start one here)")
    p.add_argument("--ray-num-cpus", type=int, help="with --ray-address local: CPUs of the local cluster")
    p.add_argument("--ray-cpus-per-actor", type=int,
                   help="CPU-only clusters: one trainer actor per this many CPUs (default min(4, all))")
    p.add_argument("--ray-max-actors", type=int, help="at most this many trainer actors")
    p.add_argument("--ray-gpu-actors", type=int,
                   help="start this many one-GPU trainer actors even if the GPU nodes are not up yet "
                        "(an autoscaling cluster launches them); default: one per GPU present")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha})")
    p.add_argument("--targets", help=f"comma-separated target module names (default {','.join(d.target_modules)})")
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"AdamW learning rate (default {d.learning_rate})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs per document (default {d.epochs})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--docs-per-step", type=int, default=d.docs_per_step,
                   help=f"documents trained together in one batched step (default {d.docs_per_step})")
    p.add_argument("--append", action="store_true",
                   help="add documents from another augmented source (file, augmenter or model) to an existing "
                        "store; without it a different source is refused (ids already in the store are kept)")
    p.add_argument("--docs-per-shard", type=int,
                   help="documents per store shard = per commit (default 256); a killed run redoes at most these")
    p.add_argument("--storage-dtype", choices=["float32", "bfloat16", "float16"], default=d.storage_dtype,
                   help=f"dtype of stored adapters (default {d.storage_dtype})")
    p.add_argument("--compute-dtype", default=d.compute_dtype,
                   help="training dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default=d.device, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--init-seed", type=int, default=d.init_seed, help="seed of the shared initial adapter")
    p.add_argument("--loss-chunk-tokens", type=int, default=d.loss_chunk_tokens,
                   help="positions per logits/cross-entropy chunk (bounds memory with large vocabularies)")
    p.add_argument("--with-cot", action="store_true", help="train on full_answer (chain-of-thought answers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    p.add_argument("--summary-json", help="write the summary as JSON to this file")
    p.set_defaults(func=_encode)


def _export_adapter(args: argparse.Namespace) -> int:
    from offline_encode.export import export_adapter

    out = export_adapter(args.store, args.doc_id, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote PEFT adapter for doc id {args.doc_id!r} to {out}")
    return 0


def _register_export_adapter(sub) -> None:
    p = sub.add_parser("export-adapter", help="export one document's adapter as a PEFT directory (PEFT and vLLM load it)")
    p.add_argument("--store", required=True, help="adapter store directory")
    p.add_argument("--doc-id", required=True, help="document id")
    p.add_argument("--out", required=True, help="output directory, written atomically; must be new or empty, or a "
                   "previous export with --overwrite (a folder of other files, or one holding the store, is refused)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export at --out")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype in the exported file (default: float32)")
    p.set_defaults(func=_export_adapter)


# --- prag augment (owned by the augmentation work; keep edits for other commands out of here) ---
def _augment(args: argparse.Namespace) -> int:
    from offline_encode.augment import (LLMAugmenter, LLMAugmenterConfig, RuleAugmenter, RuleAugmenterConfig,
                                        augment_corpus)
    from prag.errors import PragError

    if args.augmenter == "llm":
        if not args.model:
            raise PragError("--augmenter llm needs --model (a Hugging Face name or local model path)")
        kw = {k: v for k, v in dict(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                                    dtype=args.dtype, max_model_len=args.max_model_len,
                                    max_question_chars=args.max_question_chars,
                                    max_answer_chars=args.max_answer_chars,
                                    max_full_answer_chars=args.max_full_answer_chars,
                                    chunk_size=args.batch_size).items() if v is not None}
        augmenter = LLMAugmenter(LLMAugmenterConfig(model=args.model, n_qa=args.n_qa, n_rewrites=args.n_rewrites,
                                                    seed=args.seed, include_title=args.include_title,
                                                    engine_args=dict(args.engine_arg), **kw))
    else:
        if args.model:
            raise PragError("--model is only used with --augmenter llm")
        augmenter = RuleAugmenter(RuleAugmenterConfig(n_qa=args.n_qa, n_rewrites=args.n_rewrites,
                                                      include_title=args.include_title,
                                                      batch_size=args.batch_size or 256))
    ray_opts = None
    if args.ray_address:
        from offline_encode.ray_jobs import RayOptions

        ray_opts = RayOptions(address=args.ray_address, num_cpus=args.ray_num_cpus,
                              cpus_per_actor=args.ray_cpus_per_actor, max_actors=args.ray_max_actors)
    summary = augment_corpus(args.corpus, args.out, augmenter, limit=args.limit, retry_failed=args.retry_failed,
                             progress=not args.no_progress, ray_opts=ray_opts)
    print(summary.format())
    return 0


def _engine_arg(text: str) -> tuple[str, object]:
    from engine.cli import _engine_arg as parse

    return parse(text)


def _register_augment(sub) -> None:
    p = sub.add_parser("augment", help="augment documents with rewrites + QA pairs (resumable JSONL)")
    p.add_argument("--corpus", required=True, help="corpus file: JSONL {id, title?, text} or DPR TSV")
    p.add_argument("--augmenter", choices=["rule", "llm"], required=True,
                   help="rule: deterministic, no model; llm: the paper's vLLM rewrite + QA generation")
    p.add_argument("--model", help="model for --augmenter llm (Hugging Face name or local path)")
    p.add_argument("--out", required=True, help="output JSONL; rerunning resumes, skipping doc ids already in it")
    p.add_argument("--n-qa", type=int, default=3, help="QA pairs per document (default 3)")
    p.add_argument("--n-rewrites", type=int, default=1, help="rewrites per document (default 1)")
    p.add_argument("--temperature", type=float, help="llm sampling temperature (default 0.7)")
    p.add_argument("--top-k", type=int, help="llm top-k (default 50)")
    p.add_argument("--max-tokens", type=int, help="llm max new tokens per rewrite / QA list (default 512)")
    p.add_argument("--max-question-chars", type=int, help="llm QA schema bound on question length (default 150)")
    p.add_argument("--max-answer-chars", type=int, help="llm QA schema bound on answer length (default 60)")
    p.add_argument("--max-full-answer-chars", type=int, help="llm QA schema bound on full_answer length (default 200)")
    p.add_argument("--dtype", help="llm engine dtype (default auto)")
    p.add_argument("--max-model-len", type=int, help="llm engine max model length (default: the model's own)")
    p.add_argument("--engine-arg", action="append", type=_engine_arg, default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument for --augmenter llm, VALUE as JSON if it parses "
                        "(e.g. enforce_eager=true); repeatable")
    p.add_argument("--seed", type=int, default=0, help="llm sampling seed (per-document seeds derive from it)")
    p.add_argument("--include-title", choices=["auto", "always", "never"], default="auto",
                   help="prefix the title to the passage: auto = only when the text does not mention it")
    p.add_argument("--batch-size", type=int, help="documents per generation call / written batch (default 256)")
    p.add_argument("--limit", type=int, help="augment only the first N documents of the corpus")
    p.add_argument("--retry-failed", action="store_true", help="rerun documents recorded as failed")
    p.add_argument("--ray-address", help="shard the batches over Ray actors: a cluster address, 'auto' or 'local'")
    p.add_argument("--ray-num-cpus", type=int, help="with --ray-address local: CPUs of the local cluster")
    p.add_argument("--ray-cpus-per-actor", type=int, help="CPU clusters: one augmenter actor per this many CPUs")
    p.add_argument("--ray-max-actors", type=int, help="at most this many augmenter actors (one per GPU by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_augment)


# --- prag store verify (owned by the store-integrity work) ---
def _store_verify(args: argparse.Namespace) -> int:
    import json

    from prag.store import verify_store

    report = verify_store(args.store, drop_bad=args.drop_bad)
    print(report.format())
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0 if report.ok else 1


def _register_store(sub) -> None:
    p = sub.add_parser("store", help="check and repair an adapter store")
    actions = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    v = actions.add_parser("verify", help="check every row (checksum + finite values), every shard file, the index "
                           "and the manifest; exits 1 naming the bad documents")
    v.add_argument("--store", required=True, help="adapter store directory")
    v.add_argument("--drop-bad", action="store_true",
                   help="drop the bad documents from the index, so rerunning the same `prag encode` re-encodes them")
    v.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    v.set_defaults(func=_store_verify)
