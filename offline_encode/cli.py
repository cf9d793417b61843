"""``prag augment|encode|export-adapter`` (filled in by the offline-encoding milestone)."""

from __future__ import annotations

import argparse

from prag.errors import NotImplementedYet


def _todo(args: argparse.Namespace) -> int:
    raise NotImplementedYet(f"'{args.command}' is not implemented yet")


def register(sub) -> None:
    _register_augment(sub)
    for name, help_ in [("encode", "train one LoRA adapter per document into an adapter store"),
                        ("export-adapter", "export one document's adapter as a PEFT directory")]:
        sub.add_parser(name, help=f"{help_} (not implemented yet)").set_defaults(func=_todo)


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
                                    chunk_size=args.batch_size).items() if v is not None}
        augmenter = LLMAugmenter(LLMAugmenterConfig(model=args.model, n_qa=args.n_qa, n_rewrites=args.n_rewrites,
                                                    seed=args.seed, include_title=args.include_title, **kw))
    else:
        if args.model:
            raise PragError("--model is only used with --augmenter llm")
        augmenter = RuleAugmenter(RuleAugmenterConfig(n_qa=args.n_qa, n_rewrites=args.n_rewrites,
                                                      include_title=args.include_title,
                                                      batch_size=args.batch_size or 256))
    if args.ray_address:
        raise PragError("--ray-address for augment is not wired yet: run without it (single process)")
    summary = augment_corpus(args.corpus, args.out, augmenter, limit=args.limit, retry_failed=args.retry_failed,
                             progress=not args.no_progress)
    print(summary.format())
    return 0


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
    p.add_argument("--dtype", help="llm engine dtype (default auto)")
    p.add_argument("--max-model-len", type=int, help="llm engine max model length (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="llm sampling seed (per-document seeds derive from it)")
    p.add_argument("--include-title", choices=["auto", "always", "never"], default="auto",
                   help="prefix the title to the passage: auto = only when the text does not mention it")
    p.add_argument("--batch-size", type=int, help="documents per generation call / written batch (default 256)")
    p.add_argument("--limit", type=int, help="augment only the first N documents of the corpus")
    p.add_argument("--retry-failed", action="store_true", help="rerun documents recorded as failed")
    p.add_argument("--ray-address", help="shard the work over a Ray cluster (address, 'auto' or 'local')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_augment)
