"""Replica affinity on Ray Serve: how often a request lands on a replica that already holds its adapter.

A workload where document sets repeat (``--sets`` distinct sets of ``--k`` documents, each asked
``--repeats`` times, in shuffled order, ``--concurrency`` at a time) goes through the replicated
engine (engine/cluster/serve.py) twice, each on freshly started replicas: with affinity routing
(``multiplexed_model_id`` = the merged adapter's key) and with Serve's default routing. The share of
requests whose replica already held their merged adapter is read from each answer
(``adapter_cache_hit``); the best possible share is ``1 - sets / requests`` (each set's first request
must build it).

    python -m benchmarks.serve_affinity --out bench-output/affinity
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path


def _site(work: Path, n_docs: int) -> dict:
    from prag.fixture_model import build_fixture_model
    from prag.io import atomic_write_jsonl
    from retrieval.index import build_index
    from tests.helpers.random_store import build_random_store

    model = work / "model-tiny"
    if not (model / "config.json").exists():
        build_fixture_model(model, size="tiny")
    docs = [{"id": f"doc{i}", "text": f"Record {i}: the lighthouse of Pell{i} was lit in {1900 + i}."}
            for i in range(n_docs)]
    if not (work / "index").exists():
        atomic_write_jsonl(work / "corpus.jsonl", docs)
        build_index(work / "corpus.jsonl", work / "index", progress=False)
    if not (work / "store").exists():
        build_random_store(work / "store", model, [d["id"] for d in docs]).close()
    return {"model": model, "index": work / "index", "store": work / "store"}


def _workload(sets: int, k: int, repeats: int, n_docs: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    chosen = [rng.sample([f"doc{i}" for i in range(n_docs)], k) for _ in range(sets)]
    work = [ids for ids in chosen for _ in range(repeats)]
    rng.shuffle(work)
    return work


def _run(site: dict, routing: str, workload: list[list[str]], args) -> dict:
    from engine.cluster.serve import ReplicaConfig, ReplicatedEngine
    from engine.engine import EngineConfig

    t0 = time.perf_counter()
    eng = ReplicatedEngine(str(site["model"]), str(site["index"]), str(site["store"]),
                           EngineConfig(max_model_len=512, kv_cache_gib=1),
                           ReplicaConfig(replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                                         routing=routing))
    start_s = time.perf_counter() - t0
    try:
        async def main():
            gate = asyncio.Semaphore(args.concurrency)

            async def one(ids):
                async with gate:
                    return await eng.answer(eng.request("Who kept the lighthouse?", "prag", max_tokens=4,
                                                        doc_ids=ids))

            t = time.perf_counter()
            answers = await asyncio.gather(*(one(ids) for ids in workload))
            return answers, time.perf_counter() - t

        answers, secs = asyncio.run(main())
        stats = eng.replica_stats()
    finally:
        eng.close()
    failed = [a.error for a in answers if not a.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    hits = sum(bool(a.adapter_cache_hit) for a in answers)
    per_replica: dict[str, int] = {}
    for a in answers:
        per_replica[a.replica] = per_replica.get(a.replica, 0) + 1
    return {"routing": routing, "requests": len(answers), "hits": hits, "hit_share": hits / len(answers),
            "questions_per_s": len(answers) / secs, "seconds": secs, "replica_start_s": start_s,
            "requests_per_replica": sorted(per_replica.values()),
            "replica_cache": {r: {"hits": s["hits"], "misses": s["misses"]} for r, s in stats.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (results.json, results.md)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--sets", type=int, default=24, help="distinct document sets (default 24)")
    p.add_argument("--k", type=int, default=3, help="documents per set (default 3)")
    p.add_argument("--repeats", type=int, default=6, help="requests per set (default 6)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="cache folder for the model/index/store (default OUT/work)")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray

    from prag.io import atomic_write_json, atomic_write_text

    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    n_docs = max(args.sets * args.k, 64)
    site = _site(work, n_docs)
    workload = _workload(args.sets, args.k, args.repeats, n_docs, args.seed)
    ray.init(num_cpus=max(2, int(args.replicas * args.cpus_per_replica)), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        rows = [_run(site, routing, workload, args) for routing in ("affinity", "default")]
    finally:
        ray.shutdown()
    best = 1 - args.sets / len(workload)
    result = {"meta": {"replicas": args.replicas, "sets": args.sets, "k": args.k, "repeats": args.repeats,
                       "concurrency": args.concurrency, "best_possible_hit_share": best}, "rows": rows}
    md = (f"Replica affinity, {args.replicas} replicas (tiny fixture, CPU), {args.sets} document sets x "
          f"{args.repeats} requests, shuffled, concurrency {args.concurrency}; best possible hit share "
          f"{best:.2f}.\n\n| routing | hit share | hits / requests | requests per replica | questions/s |\n"
          "|---|---|---|---|---|\n")
    for r in rows:
        md += (f"| {r['routing']} | {r['hit_share']:.2f} | {r['hits']}/{r['requests']} | "
               f"{r['requests_per_replica']} | {r['questions_per_s']:.1f} |\n")
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", md)
    print(md)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
