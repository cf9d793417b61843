"""Encode throughput: the paper's reference loop (padded / unpadded) against the batched trainer.

    python -m benchmarks.encode_throughput --out DIR [--size small] [--docs N]
    python -m benchmarks.encode_throughput --out DIR --shape llama-1b        # on a GPU

All paths train the same model on the same augmented data: NQ gold passages from
``../shared/data/nq_open_oracle.jsonl.gz`` (synthetic encyclopedic text when that folder is absent),
augmented by the rule augmenter to 3 QA pairs + 1 rewrite, i.e. 5 training sequences per document.

Paths: (1) ``reference-padded``: PEFT, batch 1, every sequence padded to 3000 tokens as the paper's
code does; (2) ``reference``: the same loop unpadded; (3) ``batched-N``: ``BatchedLoraTrainer`` with
N documents per step. The reference runs in float32 (the paper's setting); the batched trainer in its
default compute dtype (float32 on CPU, bfloat16 on CUDA).

FLOP estimate (reported as TFLOP/s): ``4 * N_linear * T``, where ``N_linear`` counts every Linear
weight including lm_head (the input embedding is a lookup) and ``T`` the real (unpadded) training
tokens. The base model is frozen, so a token costs a forward (2N) plus the backward for activation
gradients only (2N); weight gradients of the base are never computed. LoRA matmuls (rank 2) and
attention scores are left out (< 2% at 400-token sequences). Padding is not counted as useful work.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import save_results

import torch

from offline_encode.config import EncodeConfig
from prag.errors import PragError
from prag.io import atomic_write_text

SHARED_NQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq_open_oracle.jsonl.gz"

# Llama-3.2-1B's shape (random weights): the encoder's GPU target shape.
SHAPES = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="docs/s of the reference encode loop vs the batched trainer")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md)")
    p.add_argument("--shape", default="auto", choices=["auto", "fixture", *SHAPES],
                   help="fixture: a prag fixture model (--size); llama-1b: random Llama-3.2-1B-shaped model "
                        "(GPU); auto: llama-1b on CUDA, fixture otherwise")
    p.add_argument("--size", default="small", choices=["tiny", "small"], help="fixture model size (default small)")
    p.add_argument("--model", help="use this existing HF model directory instead of building a fixture")
    p.add_argument("--docs", type=int, default=None, help="documents for the batched runs (default 16 CPU, 512 GPU)")
    p.add_argument("--ref-docs", type=int, default=None, help="documents for the unpadded reference (2 CPU, 16 GPU)")
    p.add_argument("--ref-padded-docs", type=int, default=None, help="documents for the padded reference (1 CPU, 4 GPU)")
    p.add_argument("--ref-padded-steps", type=int, default=None,
                   help="time only this many padded steps of one document and scale to its 5 steps (default 1 "
                        "on CPU, where one padded step of the small model takes ~20 s; 0 = whole documents)")
    p.add_argument("--pad-to", type=int, default=3000, help="padding length of the paper's code (default 3000)")
    p.add_argument("--docs-per-step", default=None, help="comma list of batch sizes (default 4,16 on CPU; 16,32,64 on GPU)")
    p.add_argument("--passage-words", type=int, default=None,
                   help="join consecutive gold passages until a passage has this many words "
                        "(default 0 = one NQ passage, ~100 words; 200 with llama-1b for 250-450-token sequences)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
def load_documents(n: int, passage_words: int = 0):
    """``n`` passages: NQ gold passages if ../shared/data is present, else synthetic encyclopedic text."""
    from retrieval.corpus import Document

    texts: list[tuple[str, str]] = []
    if SHARED_NQ.exists():
        seen = set()
        with gzip.open(SHARED_NQ, "rt", encoding="utf-8") as fh:
            for line in fh:
                ctx = json.loads(line)["ctxs"][0]
                if ctx["text"] not in seen:
                    seen.add(ctx["text"])
                    texts.append((ctx.get("title") or "", " ".join(ctx["text"].split())))
                if len(texts) >= n * 8:
                    break
        source = f"NQ gold passages ({SHARED_NQ.name})"
    else:
        texts = [("", _synthetic_passage(i)) for i in range(n * 8)]
        source = "synthetic passages (../shared/data absent)"
    docs, i = [], 0
    while len(docs) < n * 4 and i < len(texts):
        title, text = texts[i]
        i += 1
        while passage_words and len(text.split()) < passage_words and i < len(texts):
            text += " " + texts[i][1]
            i += 1
        docs.append(Document(id=f"d{len(docs)}", text=text, title=title))
    return docs, source


def _synthetic_passage(i: int) -> str:
    names = ["Anna Varn", "Tomas Keller", "Mira Olsen", "Jon Hale", "Ida Brenner", "Paul Marsh"]
    places = ["Varnholt", "Eastbridge", "Lindau", "Port Ellis", "Karsby", "Holmwick"]
    name, place, year = names[i % 6], places[(i // 6) % 6], 1800 + (i * 7) % 200
    return (f"{name} was born in {place} in {year}. {name.split()[0]} studied chemistry in Berlin and "
            f"founded the {place} Glassworks in {year + 25}, which employed {100 + i % 900} workers by "
            f"{year + 40}. The company built the {place} Bridge, completed on 4 March {year + 31}. "
            f"{name.split()[0]} served as mayor of {place} for {3 + i % 12} years and died in {year + 70}.")


def augment(docs, n: int) -> list[dict]:
    """Rule-augmented records with exactly 3 QA pairs and a rewrite (the paper's 5 sequences per document)."""
    from offline_encode.augment.rule import RuleAugmenter

    records = [r for r in RuleAugmenter().augment_documents(docs)
               if len(r.get("qa", [])) == 3 and r.get("rewrites")]
    if len(records) < n:
        raise PragError(f"only {len(records)} of {len(docs)} passages gave 3 QA pairs; need {n}")
    return records[:n]


# ----------------------------------------------------------------------------- models
def build_model(args, out: Path, docs, device: torch.device):
    """(fp32 model on ``device``, tokenizer, description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prag.fixture_model import build_fixture_model

    if args.model:
        model_dir = Path(args.model)
    else:
        size = "small" if args.shape in SHAPES else args.size
        model_dir = out / f"fixture-{size}"
        if not model_dir.exists():
            corpus = out / "corpus.jsonl"
            atomic_write_text(corpus, "".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n"
                                              for d in docs))
            build_fixture_model(model_dir, size=size, corpus=corpus, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if args.shape in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**SHAPES[args.shape], bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.float32)
        desc = f"random {args.shape} (tokenizer of {model_dir.name})"
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
        desc = str(model_dir.name)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, desc


def linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    from offline_encode.device import resolve_device
    from tests.helpers.encode_reference import train_reference
    from offline_encode.trainer import BatchedLoraTrainer, make_init_adapter
    from offline_encode.training_data import build_training_sequences

    args = parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.shape == "auto":
        args.shape = "llama-1b" if gpu and not args.model else "fixture"
    n_docs = args.docs or (512 if gpu else 16)
    ref_docs = args.ref_docs or (16 if gpu else 2)
    ref_padded_docs = args.ref_padded_docs or (4 if gpu else 1)
    ref_padded_steps = args.ref_padded_steps if args.ref_padded_steps is not None else (0 if gpu else 1)
    dps_list = [int(x) for x in (args.docs_per_step or ("16,32,64" if gpu else "4,16")).split(",")]
    passage_words = args.passage_words if args.passage_words is not None else (200 if args.shape in SHAPES else 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    need = max(n_docs, ref_docs, ref_padded_docs)
    raw_docs, source = load_documents(need, passage_words)
    records = augment(raw_docs, need)
    model, tokenizer, model_desc = build_model(args, out, raw_docs, device)
    sequences = [build_training_sequences(tokenizer, r) for r in records]
    lengths = [len(s) for seqs in sequences for s in seqs]
    cfg = EncodeConfig(device=str(device))
    init = make_init_adapter(model, cfg)
    n_linear = linear_params(model)
    rows: list[dict] = []

    def timed(fn, *a, **kw):
        """(result, wall seconds, CPU seconds of this process); CPU time is the fairer figure on a busy host."""
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        res = fn(*a, **kw)
        _sync(device)
        return res, time.perf_counter() - w0, time.process_time() - c0

    def record(path: str, docs: float, seconds: float, cpu_seconds: float, seqs, extra: dict | None = None) -> dict:
        tokens = sum(len(s) for d in seqs for s in d) * cfg.epochs
        row = {"path": path, "docs": docs, "seconds": round(seconds, 3), "docs_per_s": docs / seconds,
               "ms_per_doc": 1000 * seconds / docs, "cpu_ms_per_doc": 1000 * cpu_seconds / docs, "tokens": tokens,
               "tflops": 4 * n_linear * tokens / seconds / 1e12, **(extra or {})}
        rows.append(row)
        print(f"  {path}: {row['docs_per_s']:.3f} docs/s ({row['ms_per_doc']:.1f} ms/doc)", flush=True)
        return row

    print(f"encode benchmark: {model_desc} on {device}, {need} docs from {source}", flush=True)
    # Reference loops (float32, as in the paper). A one-step warm-up initialises kernels.
    train_reference(model, init, [sequences[0][:1]], cfg)
    # Padded: every step costs the same (pad_to tokens), so a few steps of one document scale exactly.
    if ref_padded_steps:
        padded_seqs = [sequences[0][:ref_padded_steps]]
        padded_docs = len(padded_seqs[0]) / len(sequences[0])
    else:
        padded_seqs, padded_docs = sequences[:ref_padded_docs], ref_padded_docs
    _, wall, cpu = timed(train_reference, model, init, padded_seqs, cfg, pad_to=args.pad_to)
    real = sum(min(len(s), args.pad_to) for d in padded_seqs for s in d)
    record("reference-padded", padded_docs, wall, cpu, padded_seqs,
           {"padding_fraction": 1 - real / (args.pad_to * sum(len(d) for d in padded_seqs))})
    reference_adapters, wall, cpu = timed(train_reference, model, init, sequences[:ref_docs], cfg)
    record("reference", ref_docs, wall, cpu, sequences[:ref_docs], {"padding_fraction": 0.0})
    # Batched trainer at several batch sizes (casts the model to its compute dtype in place).
    max_diff = None
    for dps in dps_list:
        trainer = BatchedLoraTrainer(model, replace(cfg, docs_per_step=dps), init_adapter=init)
        trainer.train(sequences[: min(2, n_docs)])  # warm-up
        adapters, wall, cpu = timed(trainer.train, sequences[:n_docs])
        stats = trainer.last_stats
        record(f"batched-{dps}", n_docs, wall, cpu, sequences[:n_docs],
               {"padding_fraction": stats.padding_fraction, "dtype": str(trainer.dtype).replace("torch.", "")})
        diff = max((adapters[i][k] - reference_adapters[i][k]).abs().max().item()
                   for i in range(min(ref_docs, n_docs)) for k in adapters[i])
        max_diff = diff if max_diff is None else max(max_diff, diff)
        trainer.close()
    padded = next(r for r in rows if r["path"] == "reference-padded")
    for r in rows:
        r["speedup_vs_padded"] = r["docs_per_s"] / padded["docs_per_s"]
        r["cpu_speedup_vs_padded"] = padded["cpu_ms_per_doc"] / r["cpu_ms_per_doc"]
    result = {
        "model": model_desc, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0],
        "data": source, "sequences_per_doc": 5, "seq_len_min": min(lengths), "seq_len_mean": sum(lengths) / len(lengths),
        "seq_len_max": max(lengths), "linear_params": n_linear, "pad_to": args.pad_to,
        "flop_formula": "4 * linear_params * real_tokens (frozen base: forward + activation-gradient backward)",
        "max_abs_diff_batched_vs_reference": max_diff, "config": cfg.to_dict(), "rows": rows,
        "command": "python -m benchmarks.encode_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    table = markdown_table(result)
    return save_results(out, result, table)


def markdown_table(result: dict) -> str:
    lines = [f"Encode throughput: {result['model']} on {result['device']} ({result['device_name']}, "
             f"{result['cpu_threads']} threads, load {result['load_avg_1min']:.1f}); {result['data']}; "
             f"5 sequences/doc of {result['seq_len_min']}-{result['seq_len_max']} tokens "
             f"(mean {result['seq_len_mean']:.0f}); 1 epoch.", "",
             "| path | docs | docs/s | ms/doc | CPU ms/doc | speedup vs padded (wall / CPU) | padding | TFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['path']} | {r['docs']:.4g} | {r['docs_per_s']:.3f} | {r['ms_per_doc']:.1f} | "
                     f"{r['cpu_ms_per_doc']:.1f} | {r['speedup_vs_padded']:.1f}x / {r['cpu_speedup_vs_padded']:.1f}x | "
                     f"{100 * r['padding_fraction']:.0f}% | {r['tflops']:.4g} |")
    padded = next(r for r in result["rows"] if r["path"] == "reference-padded")
    if padded["docs"] < 1:
        lines += ["", f"reference-padded was timed on {padded['docs'] * 5:.0f} padded step(s) of one document and "
                      f"scaled to its 5 steps: every padded step processes {result['pad_to']} tokens, so its cost "
                      f"does not depend on the sequence."]
    lines += ["", f"Max |batched - reference| over A,B of the reference documents: "
                  f"{result['max_abs_diff_batched_vs_reference']:.2e}. TFLOP/s = {result['flop_formula']}.",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
