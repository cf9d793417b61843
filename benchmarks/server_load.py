"""HTTP load: ``prag serve`` on loopback under the official ``openai`` async client, against the offline batch.

Setup: the serving benchmark's (small fixture model, NQ gold passages as the corpus, a random
adapter store, k=3, 20 new tokens, greedy). The server runs as users run it (``prag serve`` in its own
process, retrieval inside it). Every measurement uses questions no earlier one used, so each starts
with a cold merged-adapter cache and no reusable KV, as the offline number does.

For ``prag`` and ``rag``, at concurrency 1, 8, 32 and 128 (``--levels``): questions/s, p50/p99
latency of non-streamed requests, and p50 time to first token with ``stream=True``. A level sends
``--requests-per-client`` (default 2) requests per client, at least ``--low-n``: each client sends a
second request when its first is answered, so the level measures throughput *at* that concurrency, not
only the ramp of one burst. The top level is also run as one burst (exactly as many requests as
clients, all sent at once), reported as its own row.

The baseline is the offline batch (``Engine.generate``, same settings, retrieval included) in this
process, on a warm engine that stays open while the server runs: ``--repeats`` times (default 3) it
answers the same questions as one top-level HTTP run, its caches cleared first, the two alternating
(offline first, then HTTP first, ...) because this benchmark runs on shared, noisy machines. The ratio
is mean HTTP q/s over mean offline q/s. The modes share one sequence of questions: rag builds no
adapters, and its prompts (with passages) share no KV cache with prag's.

The client is ``openai.AsyncOpenAI`` with the SDK's aiohttp transport (``openai.DefaultAioHttpClient``,
``--http-client aiohttp``, the default): it needs about a third of the CPU per request of the default
httpx transport, and the client shares the cores with the server here. ``--http-client httpx`` measures
with the default transport.

Continuous batching: ``--long`` requests of 120 tokens start decoding, then a 2-token request is
sent; its latency over the long requests' wall time should be small (it joins the running batch).

Writes ``results.json``, ``results.md`` and ``load.png`` to ``--out``.

    python -m benchmarks.server_load --out bench-output/server_load
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks import save_results
from benchmarks.serve_throughput import _env, _prepare, default_dtype, load_nq

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"
WARM_UP = 8  # requests before the timed levels
OFFLINE_WARM_UP = 4  # questions the offline engine answers in each mode before it is timed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _site(args, work: Path, n_questions: int) -> tuple[dict, list[dict]]:
    from tests.helpers.random_store import build_random_store

    questions, corpus = load_nq(n_questions, max(args.corpus_size, n_questions))
    model, index = _prepare(work, args.size, corpus)
    store_dir, stamp = work / f"store-{args.size}-all", work / f"store-{args.size}-all.stamp"
    want = f"{len(corpus)}:{corpus[-1]['id']}"
    if not stamp.exists() or stamp.read_text() != want:  # one adapter per corpus document, built once
        import shutil

        shutil.rmtree(store_dir, ignore_errors=True)
        build_random_store(store_dir, model, [d["id"] for d in corpus]).close()
        stamp.write_text(want)
    return {"model": model, "index": index, "store": store_dir}, questions


def _engine_config(args):
    from engine.engine import EngineConfig

    return EngineConfig(top_k=args.top_k, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                        max_model_len=args.max_model_len, max_loras=args.max_loras)


def _offline_engine(site: dict, args, warm_up: list[str], modes: list[str]):
    """The offline side: one warm ``Engine`` in this process, open (and idle) while the server runs, so
    offline and HTTP runs can alternate."""
    from engine.engine import Engine

    eng = Engine(site["model"], index=site["index"], store=site["store"], config=_engine_config(args))
    for mode in modes:
        eng.generate(warm_up, mode=mode)  # kernels, embedder
    return eng


def _offline(eng, questions: list[str], mode: str) -> float:
    """questions/s of one cold batch through Engine.generate (retrieval included, as the server does it)."""
    eng.cache.clear(forget_identities=True)
    eng.reset_prefix_cache()
    t0 = time.perf_counter()
    answers = eng.generate(questions, mode=mode)
    secs = time.perf_counter() - t0
    bad = [a.error for a in answers if not a.ok]
    if bad:
        raise RuntimeError(f"offline {mode}: {len(bad)} failed, e.g. {bad[0]}")
    return len(questions) / secs


def _start_server(site: dict, args, log: Path):
    from tests.helpers.server import launch

    return launch(["--model", str(site["model"]), "--index", str(site["index"]), "--store", str(site["store"]),
                   "--served-model-name", "bench", "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                   "--max-loras", str(args.max_loras), "--top-k", str(args.top_k), "--max-new-tokens",
                   str(args.max_new_tokens), "--max-in-flight", "1024"], log, api_key=API_KEY, timeout=300)


async def _level(client, questions: list[str], mode: str, concurrency: int, stream: bool,
                 max_tokens: int | None = None) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    ttfts: list[float] = []

    async def one(q: str) -> None:
        async with gate:
            kw = dict(model="bench", messages=[{"role": "user", "content": q}], extra_body={"prag": {"mode": mode}})
            if max_tokens is not None:
                kw["max_tokens"] = max_tokens
            t0 = time.perf_counter()
            if stream:
                first = None
                async for chunk in await client.chat.completions.create(stream=True, **kw):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                ttfts.append(first if first is not None else time.perf_counter() - t0)
            else:
                await client.chat.completions.create(**kw)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(q) for q in questions))
    secs = time.perf_counter() - t0
    row = {"mode": mode, "concurrency": concurrency, "stream": stream, "requests": len(questions),
           "questions_per_s": len(questions) / secs, "p50_s": _percentile(latencies, 0.5),
           "p99_s": _percentile(latencies, 0.99)}
    if stream:
        row["ttft_p50_s"] = _percentile(ttfts, 0.5)
    return row


async def _continuous_batching(client, questions: list[str], n_long: int) -> dict:
    """A 2-token request sent while ``n_long`` 120-token requests decode: its latency / their wall time."""
    done_long: list[float] = []
    started = asyncio.Event()
    t0 = time.perf_counter()

    async def long(q: str) -> None:
        async for chunk in await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": q}], max_tokens=120, stream=True,
                extra_body={"prag": {"mode": "none"}}):
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
        done_long.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(long(q)) for q in questions[:n_long]]
    await started.wait()
    await asyncio.sleep(0.2)  # the long ones are decoding now
    t_short = time.perf_counter()
    await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": questions[n_long]}],
                                         max_tokens=2, extra_body={"prag": {"mode": "none"}})
    short_s = time.perf_counter() - t_short
    await asyncio.gather(*tasks)
    wall = max(done_long)
    return {"long_requests": n_long, "long_wall_s": wall, "short_latency_s": short_s, "ratio": short_s / wall}


def _chart(rows: list[dict], offline: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, color in (("prag", "#e07b39"), ("rag", "#4a90d9")):
        if mode not in offline:  # --modes left it out
            continue
        pts = [r for r in rows if r["mode"] == mode and not r["stream"]]
        ax.plot([r["concurrency"] for r in pts], [r["questions_per_s"] for r in pts], "o-", color=color,
                label=f"{mode} over HTTP")
        ax.axhline(offline[mode], color=color, ls="--", lw=1, label=f"{mode} offline batch")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("questions / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _client(port: int, transport: str):
    import openai

    extra = {"http_client": openai.DefaultAioHttpClient()} if transport == "aiohttp" else {}
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=600,
                              **extra)


def _rows(rows: list[dict], mode: str, clients: int, stream: bool = False, burst: bool = False) -> list[dict]:
    return [r for r in rows if r["mode"] == mode and r["concurrency"] == clients and r["stream"] == stream
            and r.get("burst", False) == burst]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, load.png)")
    p.add_argument("--size", choices=["tiny", "small"], default="small")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=default_dtype())
    p.add_argument("--levels", default="1,8,32,128", help="client concurrency levels (default 1,8,32,128)")
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="non-streamed requests per client at each level (default 2)")
    p.add_argument("--low-n", type=int, default=32, help="fewest requests in a level (default 32)")
    p.add_argument("--repeats", type=int, default=3,
                   help="offline/HTTP pairs at the top level, on the same questions, alternating (default 3)")
    p.add_argument("--modes", default="prag,rag")
    p.add_argument("--http-client", choices=["aiohttp", "httpx"], default="aiohttp",
                   help="the openai client's transport (default aiohttp, the SDK's DefaultAioHttpClient)")
    p.add_argument("--long", type=int, default=32, help="long requests in the continuous-batching check")
    p.add_argument("--corpus-size", type=int, default=1200)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-loras", type=int, default=96)
    p.add_argument("--work", help="cache folder for the model/index/store (default OUT/work)")
    args = p.parse_args(argv)
    _env()

    levels = [int(x) for x in args.levels.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if min(args.requests_per_client, args.low_n, args.repeats) < 1:
        p.error("--requests-per-client, --low-n and --repeats must be at least 1")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    top = max(levels)
    plain_n = {c: max(args.low_n, args.requests_per_client * c) for c in levels}
    stream_n = {c: max(args.low_n, c) for c in levels}  # streamed rows give TTFT only: one request per client
    offline_n = plain_n[top]
    # Every HTTP measurement of a mode gets questions no earlier one used (the server's caches stay
    # cold); the modes share one sequence (the NQ file has 2,655 questions), see the module doc.
    need = sum(plain_n[c] + stream_n[c] for c in levels if c != top) + args.repeats * offline_n \
        + stream_n[top] + top
    extra = WARM_UP + OFFLINE_WARM_UP + args.long + 1
    site, records = _site(args, work, need + extra)
    if len(records) < need + extra:
        p.error(f"the NQ file has {len(records)} questions; this run needs {need + extra} (lower --levels, "
                f"--repeats, --requests-per-client or --low-n)")
    questions = [r["question"] for r in records]
    shared, rest = questions[:need], iter(questions[need:])

    offline_runs: dict[str, list[float]] = {m: [] for m in modes}
    rows: list[dict] = []
    offline_eng = _offline_engine(site, args, [next(rest) for _ in range(OFFLINE_WARM_UP)], modes)
    server = None
    try:
        server = _start_server(site, args, out / "server.log")

        async def drive() -> dict:
            async def level(questions: list[str], mode: str, clients: int, stream: bool) -> dict:
                # a fresh client (and connection pool) per level: the server drops idle keep-alive
                # connections after 5 s, and the offline runs leave them idle for longer
                client = _client(server.port, args.http_client)
                try:
                    return await _level(client, questions, mode, clients, stream)
                finally:
                    await client.close()

            await level([next(rest) for _ in range(WARM_UP)], "prag", WARM_UP, False)
            for mode in modes:
                pool = iter(shared)

                def take(n: int) -> list[str]:
                    return [next(pool) for _ in range(n)]

                for c in levels:
                    if c == top:
                        # the offline batch answers the same questions as each HTTP run (its caches
                        # are cleared first); the two alternate, offline first in even pairs and HTTP
                        # first in odd ones, so a slow spell of this shared host hits both alike
                        for r in range(args.repeats):
                            qs = take(plain_n[c])
                            for side in (("offline", "http") if r % 2 == 0 else ("http", "offline")):
                                if side == "offline":
                                    offline_runs[mode].append(
                                        await asyncio.to_thread(_offline, offline_eng, qs, mode))
                                else:
                                    rows.append(await level(qs, mode, c, stream=False))
                            print(f"{mode}: offline {offline_runs[mode][-1]:.1f} q/s, HTTP c={c} "
                                  f"{rows[-1]['questions_per_s']:.1f} q/s", flush=True)
                    else:
                        rows.append(await level(take(plain_n[c]), mode, c, stream=False))
                    rows.append(await level(take(stream_n[c]), mode, c, stream=True))
                    print(f"{mode} c={c}: {rows[-2]['questions_per_s']:.1f} q/s, p50 {rows[-2]['p50_s']:.3f} s, "
                          f"ttft p50 {rows[-1]['ttft_p50_s']:.3f} s", flush=True)
                burst = await level(take(top), mode, top, stream=False)
                rows.append({**burst, "burst": True})
                print(f"{mode} burst of {top}: {burst['questions_per_s']:.1f} q/s", flush=True)
            client = _client(server.port, args.http_client)
            try:
                return await _continuous_batching(client, [next(rest) for _ in range(args.long + 1)], args.long)
            finally:
                await client.close()

        batching = asyncio.run(drive())
    finally:
        if server is not None:
            server.stop()
        offline_eng.close()
    offline = {m: statistics.mean(v) for m, v in offline_runs.items()}
    http_top = {m: statistics.mean(r["questions_per_s"] for r in _rows(rows, m, top)) for m in modes}
    ratios = {m: http_top[m] / offline[m] for m in modes}
    burst_ratios = {m: _rows(rows, m, top, burst=True)[0]["questions_per_s"] / offline[m] for m in modes}
    result = {"meta": {"size": args.size, "dtype": args.dtype, "top_k": args.top_k,
                       "max_new_tokens": args.max_new_tokens, "levels": levels, "requests_per_level": plain_n,
                       "streamed_requests_per_level": stream_n, "offline_questions": offline_n,
                       "repeats": args.repeats, "http_client": args.http_client, "cpus": os.cpu_count()},
              "offline_questions_per_s": offline, "offline_runs": offline_runs, f"http_c{top}_questions_per_s": http_top,
              "rows": rows,
              f"http_c{top}_vs_offline": ratios, f"http_burst{top}_vs_offline": burst_ratios,
              "continuous_batching": batching}
    md = (f"HTTP load, {args.size} fixture, {args.dtype}, k={args.top_k}, {args.max_new_tokens} tokens, "
          f"{os.cpu_count()} CPU cores shared by server and client (openai SDK, {args.http_client} transport); "
          f"every row uses fresh questions (cold adapter cache). Requests per level: "
          f"{', '.join(f'{plain_n[c]} at {c}' for c in levels)} (streamed: {', '.join(str(stream_n[c]) for c in levels)})."
          f"\n\n| mode | clients | requests | questions/s | p50 latency (s) | p99 latency (s) | p50 TTFT, streamed (s) |"
          f"\n|---|---|---|---|---|---|---|\n")
    for m in modes:
        for c in levels:
            st = _rows(rows, m, c, stream=True)[0]
            for plain in _rows(rows, m, c):
                md += (f"| {m} | {c} | {plain['requests']} | {plain['questions_per_s']:.1f} | {plain['p50_s']:.3f} | "
                       f"{plain['p99_s']:.3f} | {st['ttft_p50_s']:.3f} |\n")
        b = _rows(rows, m, top, burst=True)[0]
        md += (f"| {m} | {top}, one burst | {b['requests']} | {b['questions_per_s']:.1f} | {b['p50_s']:.3f} | "
               f"{b['p99_s']:.3f} | |\n")
    md += "\n" + "\n".join(
        f"- {m}: offline batch of {offline_n} {offline[m]:.1f} q/s (runs {', '.join(f'{v:.1f}' for v in offline_runs[m])}), "
        f"HTTP at {top} clients {http_top[m]:.1f} q/s, alternating with them: HTTP / offline = **{ratios[m]:.2f}x** "
        f"(one burst of {top}: {burst_ratios[m]:.2f}x)"
        for m in modes) + "\n"
    md += (f"\nContinuous batching: a 2-token request sent while {batching['long_requests']} requests of up to 120 "
           f"tokens decode took {batching['short_latency_s']:.3f} s, {batching['ratio']:.3f}x of their "
           f"{batching['long_wall_s']:.2f} s wall time.\n")
    _chart([r for r in rows if not r.get("burst")], offline, out / "load.png")
    return save_results(out, result, md)


if __name__ == "__main__":
    main(sys.argv[1:])
