"""``prag eval`` (batch evaluation) and ``prag serve`` (OpenAI-compatible HTTP server)."""

from __future__ import annotations

import argparse
import json

from engine.request import MODES
from prag.errors import PragError


def _engine_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it can be (numbers, booleans, objects)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an Engine (eval, serve)."""
    p.add_argument("--top-k", type=int, default=3, help="documents per question (default 3, the paper's)")
    p.add_argument("--max-new-tokens", type=int, help="default 20, or 128 with --cot")
    p.add_argument("--cot", action="store_true", help="chain-of-thought prompt with few-shot examples")
    p.add_argument("--fewshot", help="JSON list of {question, answer} few-shot examples for --cot")
    p.add_argument("--retrieval-method", choices=["dense", "bm25", "hybrid"], default="dense")
    p.add_argument("--dtype", default="auto", help="model dtype for vLLM (default auto)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length (default 2048); longer "
                   "prompts get their passages truncated, see README")
    p.add_argument("--max-loras", type=int, help="adapters per batch step (default 16 on CPU, 32 on GPU)")
    p.add_argument("--max-cpu-loras", type=int, help="vLLM's CPU adapter cache size (default 4 x max-loras)")
    p.add_argument("--max-lora-rank", type=int, help="default: smallest allowed value >= top-k x store rank")
    p.add_argument("--kv-cache-gib", type=int, help="CPU KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--adapter-dir", help="where merged adapters are written (default: /dev/shm)")
    p.add_argument("--adapter-cache-mb", type=int, default=1024, help="merged-adapter cache bound (default 1024)")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run vLLM's engine core inside this process (default: yes on a CPU, where a separate "
                        "busy-waiting engine process takes a core from the model; no on a GPU)")
    p.add_argument("--on-missing-adapter", choices=["error", "skip-doc", "fallback-rag"], default="error",
                   help="a retrieved document without an adapter (prag/combine): error (default; eval stops before "
                        "generating and prints the select/augment/encode commands that fill the gap, serve fails "
                        "that request), skip-doc (merge only the documents that have adapters) or fallback-rag "
                        "(also put the others in the prompt as passages)")
    p.add_argument("--adapter-handover", choices=["auto", "memory", "dir"], default="auto",
                   help="how merged adapters reach vLLM: memory (no files; needs vLLM's worker in this process), "
                        "dir (a PEFT folder on tmpfs), auto (memory where possible, default)")
    p.add_argument("--driver", choices=["auto", "llm", "async"], default="auto",
                   help="what drives vLLM: llm (one thread steps a vllm.LLM; the engine core in this process), "
                        "async (vLLM's AsyncLLM, engine core in its own process), auto (llm where the engine core "
                        "runs in this process, the CPU default; async elsewhere)")
    p.add_argument("--engine-arg", action="append", type=_engine_arg, default=[], metavar="KEY=VALUE",
                   help="any other vllm.LLM argument, e.g. --engine-arg enforce_eager=true (repeatable)")


def engine_config(args: argparse.Namespace):
    from engine.engine import EngineConfig
    from engine.prompts import load_fewshot

    if args.fewshot and not args.cot:
        raise PragError("--fewshot only applies with --cot")
    if args.adapter_cache_mb <= 0:
        raise PragError(f"--adapter-cache-mb must be positive, got {args.adapter_cache_mb}")
    return EngineConfig(
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, chain_of_thought=args.cot,
        fewshot=load_fewshot(args.fewshot) if args.fewshot else None, retrieval_method=args.retrieval_method,
        dtype=args.dtype, max_model_len=args.max_model_len, max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization, in_process=args.in_process,
        engine_args=dict(args.engine_arg), on_missing_adapter=args.on_missing_adapter,
        adapter_handover=args.adapter_handover, driver=args.driver,
        adapter_dir=args.adapter_dir, adapter_cache_bytes=args.adapter_cache_mb << 20)


class _Unset:
    """Default of the eval flags a recorded run can supply, so ``--config`` knows which flags were given."""

    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset()
# `prag eval` flags that a run's config.json supplies under --config (explicit flags override it)
_RECORDED_FLAGS = ("model", "index", "store", "dataset", "data", "modes", "limit", "batch_size", "top_k",
                   "max_new_tokens", "cot", "fewshot", "retrieval_method", "dtype", "max_model_len", "max_loras",
                   "max_cpu_loras", "max_lora_rank", "kv_cache_gib", "gpu_memory_utilization", "adapter_dir",
                   "adapter_cache_mb", "in_process", "engine_arg", "on_missing_adapter", "adapter_handover")
# flags copied as they are onto the recorded EvalConfig / EngineConfig
_EVAL_OVERRIDES = ("model", "index", "store", "dataset", "data", "limit", "batch_size")
_ENGINE_OVERRIDES = ("top_k", "max_new_tokens", "retrieval_method", "dtype", "max_model_len", "max_loras",
                     "max_cpu_loras", "max_lora_rank", "kv_cache_gib", "gpu_memory_utilization", "adapter_dir",
                     "in_process", "on_missing_adapter", "adapter_handover")


def _given_flags(args: argparse.Namespace) -> set[str]:
    """The recorded-run flags given on the command line; the others get their usual defaults back."""
    given = {d for d in _RECORDED_FLAGS if getattr(args, d, None) is not _UNSET}
    for dest, default in getattr(args, "_flag_defaults", {}).items():
        if dest not in given:
            setattr(args, dest, default)
    return given


def _repeat_config(args: argparse.Namespace, given: set[str]):
    """``--config RUN/config.json``: the recorded run's settings, with the flags given on top."""
    from dataclasses import replace

    from engine.engine import parse_modes
    from engine.eval.harness import load_run_config
    from engine.prompts import load_fewshot

    cfg = load_run_config(args.config, args.out)
    ev = {d: getattr(args, d) for d in _EVAL_OVERRIDES if d in given}
    if "modes" in given:
        ev["modes"] = parse_modes(args.modes)
    eng = {d: getattr(args, d) for d in _ENGINE_OVERRIDES if d in given}
    if "cot" in given and not cfg.engine.chain_of_thought:
        eng["chain_of_thought"] = True
        eng.setdefault("max_new_tokens", None)  # the chain-of-thought default (128), not the recorded 20
    if "fewshot" in given:
        if not eng.get("chain_of_thought", cfg.engine.chain_of_thought):
            raise PragError("--fewshot only applies with --cot (the recorded run has no chain of thought)")
        eng["fewshot"] = load_fewshot(args.fewshot)
    if "adapter_cache_mb" in given:
        if args.adapter_cache_mb <= 0:
            raise PragError(f"--adapter-cache-mb must be positive, got {args.adapter_cache_mb}")
        eng["adapter_cache_bytes"] = args.adapter_cache_mb << 20
    if "engine_arg" in given:
        eng["engine_args"] = {**cfg.engine.engine_args, **dict(args.engine_arg)}
    return replace(cfg, **ev, engine=replace(cfg.engine, **eng))


def _eval(args: argparse.Namespace) -> int:
    from engine.engine import check_top_k, parse_modes
    from engine.eval.harness import EvalConfig, evaluate, results_markdown

    given = _given_flags(args)
    if getattr(args, "config", None):
        cfg = _repeat_config(args, given)
    else:
        missing = [f"--{d}" for d in ("model", "dataset", "data") if not getattr(args, d)]
        if missing:
            raise PragError(f"the following arguments are required (unless --config repeats a recorded run): "
                            f"{', '.join(missing)}")
        cfg = EvalConfig(dataset=args.dataset, data=args.data, out=args.out, model=args.model, index=args.index,
                         store=args.store, modes=parse_modes(args.modes), limit=args.limit,
                         batch_size=args.batch_size, engine=engine_config(args))
    check_top_k(cfg.engine.top_k)
    if cfg.limit is not None and cfg.limit <= 0:
        raise PragError(f"--limit must be positive, got {cfg.limit}")
    ray_flags = (args.num_engines, args.gpus_per_engine, args.cpus_per_engine, args.ray_num_cpus)
    if args.ray_address is None and any(f is not None for f in ray_flags):
        raise PragError("--num-engines, --gpus-per-engine, --cpus-per-engine and --ray-num-cpus need --ray-address")
    if args.ray_address is not None:
        from engine.cluster.eval import RayEvalConfig, evaluate_on_ray

        rc = RayEvalConfig(address=args.ray_address, num_engines=args.num_engines,
                           gpus_per_engine=args.gpus_per_engine, cpus_per_engine=args.cpus_per_engine or 1.0,
                           num_cpus=args.ray_num_cpus)
        rc.check()
        results = evaluate_on_ray(cfg, rc)
    else:
        results = evaluate(cfg)
    print(results_markdown(results))
    print(f"wrote {args.out}/results.json, results.md and predictions.jsonl")
    return 0


def register(sub) -> None:
    from engine.eval.datasets import dataset_names

    p = sub.add_parser("eval", help="evaluate none/rag/prag/combine on a QA dataset (EM/F1, throughput)")
    p.add_argument("--config", metavar="RUN/config.json",
                   help="repeat a recorded run: its config.json supplies every setting (the dtype as it ran, "
                        "prompt, top-k, batch size, ...); flags given as well override it")
    p.add_argument("--model", help="base model (HF directory or hub id in the local cache); required without --config")
    p.add_argument("--index", help="index directory from `prag index build` (needed by rag/prag/combine)")
    p.add_argument("--store", help="adapter store from `prag encode` (needed by prag/combine)")
    p.add_argument("--dataset", help=f"one of: {', '.join(dataset_names())}; required without --config")
    p.add_argument("--data", help="the dataset file (or the folder it unpacks into); required without --config")
    p.add_argument("--modes", default="none,rag,prag,combine", help="comma-separated (default all four)")
    p.add_argument("--out", required=True, help="output directory: new, empty, or a previous eval run, which "
                   "is resumed (rerun the same command); any other folder is refused")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions (the paper's --sample)")
    p.add_argument("--batch-size", type=int, default=256, help="questions per engine call / checkpoint (256)")
    p.add_argument("--ray-address", metavar="ADDR", help="shard the questions over engine actors on Ray: a cluster "
                   "address (host:port or ray://host:port), 'auto' (this machine's cluster, e.g. under `ray job "
                   "submit`) or 'local' (start one here); outputs are the single-process run's")
    p.add_argument("--num-engines", type=int, help="engine actors (default: one per GPU, or per --cpus-per-engine "
                   "CPUs, of the cluster as it is now)")
    p.add_argument("--gpus-per-engine", type=float, help="GPUs per engine (default 1 on a cluster with GPUs, else "
                   "0); a whole number > 1 also sets vLLM's tensor_parallel_size")
    p.add_argument("--cpus-per-engine", type=float, help="CPUs per engine (default 1)")
    p.add_argument("--ray-num-cpus", type=int, help="with --ray-address local: CPUs of the local cluster")
    add_engine_flags(p)
    p.set_defaults(func=_eval)
    # remember the real defaults, then mark the recorded-run flags unset (see _given_flags)
    p.set_defaults(_flag_defaults={d: p.get_default(d) for d in _RECORDED_FLAGS})
    p.set_defaults(**{d: _UNSET for d in _RECORDED_FLAGS})

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming, metrics)",
                       description="Serve the engine over HTTP: POST /v1/chat/completions and /v1/completions "
                                   "(PRAG controls in the body's 'prag' object: mode, top_k, doc_ids), GET "
                                   "/v1/models, GET /metrics (Prometheus), GET /health. SIGTERM or Ctrl+C stops "
                                   "taking requests, lets those in flight finish, then exits.")
    p.add_argument("--model", required=True, help="base model (HF directory or hub id in the local cache)")
    p.add_argument("--index", help="index directory (needed by rag/prag/combine unless requests pass doc_ids)")
    p.add_argument("--store", help="adapter store (needed by prag/combine)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                   "the PRAG_API_KEY environment variable, else no key)")
    p.add_argument("--served-model-name", help="model id reported by /v1/models and required in requests "
                   "(default: --model)")
    p.add_argument("--default-mode", default="prag", choices=list(MODES),
                   help="mode for requests that do not name one (default prag)")
    p.add_argument("--max-in-flight", type=int, default=256,
                   help="questions answered at once; more get 429 with Retry-After (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body; larger ones get 413 unread (default 1048576)")
    p.add_argument("--max-tokens-cap", type=int,
                   help="largest max_tokens a request may ask for (default: what the context allows)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds requests in flight get to finish after SIGTERM (default 30)")
    p.add_argument("--no-docs", dest="docs", action="store_false",
                   help="do not serve /docs and /openapi.json (served behind the API key otherwise)")
    g = p.add_argument_group("replicated on Ray Serve (engine/cluster/serve.py)")
    g.add_argument("--ray-address", metavar="ADDR", help="answer with --replicas vLLM engines on Ray Serve behind "
                   "this server: a cluster address (host:port or ray://host:port), 'auto' or 'local' (start one "
                   "here); the API, auth, errors and metrics stay the same")
    g.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default 1)")
    g.add_argument("--gpus-per-replica", type=float, help="GPUs per replica (default 1 on a cluster with GPUs, else 0)")
    g.add_argument("--routing", choices=["affinity", "default"], default="affinity",
                   help="affinity (default): a request goes to a replica that already holds its merged adapter "
                        "(Serve model multiplexing by document set); default: Serve's own routing")
    g.add_argument("--ray-num-cpus", type=int, help="with --ray-address local: CPUs of the local cluster")
    add_engine_flags(p)
    p.set_defaults(func=_serve)
    register_run(sub)


def _serve(args: argparse.Namespace) -> int:
    import os

    from engine.engine import Engine
    from engine.http.app import ServerConfig, serve

    cfg = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("PRAG_API_KEY") or None,
                       served_model_name=args.served_model_name, default_mode=args.default_mode,
                       max_in_flight=args.max_in_flight, max_body_bytes=args.max_body_bytes,
                       max_tokens_cap=args.max_tokens_cap, shutdown_grace=args.shutdown_grace,
                       docs=args.docs).check()  # bad flags fail before the engine starts
    config = engine_config(args)
    config.engine_args.setdefault("disable_log_stats", False)  # vLLM's own metrics on GET /metrics
    if args.ray_address is None:
        with Engine(args.model, index=args.index, store=args.store, config=config) as engine:
            serve(engine, cfg)
        return 0
    from engine.cluster.serve import ReplicaConfig, ReplicatedEngine
    from offline_encode.ray_jobs import RayOptions, ray_session

    replicas = ReplicaConfig(replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                             gpus_per_replica=args.gpus_per_replica, routing=args.routing).check()
    with ray_session(RayOptions(address=args.ray_address, num_cpus=args.ray_num_cpus)):
        engine = ReplicatedEngine(args.model, args.index, args.store, config, replicas)
        try:
            serve(engine, cfg)
        finally:
            engine.close()
    return 0


# -- prag run: the whole pipeline from one config (prag/pipeline.py) ---------------------------------


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from prag.pipeline import load_run_config, run_pipeline

    cfg = load_run_config(args.config)
    if args.run_dir:
        from prag.pipeline import validate_run_config

        cfg = validate_run_config(replace(cfg, run_dir=args.run_dir))
    redo = [s.strip() for s in args.redo.split(",") if s.strip()] if args.redo else []
    summary = run_pipeline(cfg, ray_address=args.ray_address, redo=redo, progress=not args.quiet)
    print(summary.format())
    return 0


def register_run(sub) -> None:
    from prag.pipeline import STAGES

    p = sub.add_parser(
        "run", help="the whole pipeline from one YAML config: index -> select -> augment -> encode -> eval",
        description="Run (or resume) every stage of CONFIG.yaml into its run_dir: RUN_DIR/<stage>/ holds each "
                    "stage's output and RUN_DIR/run.json the resolved config, package versions, the model "
                    "fingerprint and each stage's hash, status and time. A stage whose output is complete and "
                    "whose settings and inputs are unchanged is skipped; an interrupted stage resumes; a stage "
                    "whose settings changed is refused (naming what changed) unless --redo names it. "
                    "See configs/demo.yaml and configs/paper/.")
    p.add_argument("config", metavar="CONFIG.yaml", help="the run config (see configs/ and the README)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run the stages that support Ray on this cluster (host:port, ray://..., auto or local): "
                        "index build, augment, encode and eval (the engine actors of prag eval --ray-address); select runs "
                        "on this machine")
    p.add_argument("--run-dir", help="override the config's run_dir")
    p.add_argument("--redo", metavar="STAGE[,STAGE]",
                   help=f"rebuild these stages and every later one, deleting their previous output in the run "
                        f"folder (stages: {', '.join(STAGES)})")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines, only the summary")
    p.set_defaults(func=_run)
