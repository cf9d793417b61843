"""A real ``prag serve`` subprocess on 127.0.0.1 for the server tests, and the data it serves.

The server runs as users run it (the CLI, its own process, uvicorn's signal handling), so SIGTERM,
/dev/shm clean-up and vLLM's process-wide metrics are tested for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]

# 24 short fictional records; questions name a record, so dense retrieval finds it
DOCS = {f"d{i}": f"Record {i}: the lighthouse of Pell{i} was lit in {1900 + i} by keeper Orla{i}, "
                 f"who came from the village of Varn{i}." for i in range(24)}


def questions(n: int, offset: int = 0) -> list[str]:
    """``n`` distinct questions about the records."""
    kinds = ("When was the lighthouse of Pell{} lit?", "Who kept the lighthouse of Pell{}?",
             "Where did keeper Orla{} come from?", "Which lighthouse did Orla{} keep?")
    return [kinds[(i + offset) % 4].format((i + offset) % len(DOCS)) + f" (case {i + offset})" for i in range(n)]


def build_site(root: Path, model_dir: Path, seed: int = 3) -> dict:
    """A random adapter store and a dense index over :data:`DOCS` under ``root``."""
    from retrieval.index import build_index
    from tests.helpers.random_store import build_random_store

    store = build_random_store(root / "store", model_dir, list(DOCS), seed=seed)
    store.close()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in DOCS.items()))
    build_index(corpus, root / "index", progress=False)
    return {"store": root / "store", "index": root / "index", "model": model_dir}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    api_key: str | None
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {'name{labels}': value} (samples only)."""
        text = httpx.get(f"{self.base}/metrics", headers=self.headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(site: dict, log: Path, *args: str, api_key: str | None = "test-key",
                 timeout: float = 240) -> ServerProcess:
    """``prag serve`` over ``site`` (fp32, context 1024) with extra CLI ``args``; waits for /health."""
    return launch(["--model", str(site["model"]), "--index", str(site["index"]), "--store", str(site["store"]),
                   "--dtype", "float32", "--max-model-len", "1024", "--served-model-name", "prag-tiny", *args],
                  log, api_key=api_key, timeout=timeout)


def launch(serve_args: list[str], log: Path, api_key: str | None = None, timeout: float = 240) -> ServerProcess:
    """``prag serve SERVE_ARGS --port <free>`` in its own process (output in ``log``); waits for /health."""
    port = free_port()
    cmd = [sys.executable, "-m", "prag.cli", "serve", *serve_args, "--port", str(port)]
    env = dict(os.environ)
    env.pop("PRAG_API_KEY", None)
    if api_key:
        env["PRAG_API_KEY"] = api_key
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    srv = ServerProcess(proc, port, api_key, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prag serve exited with {proc.returncode}:\n{srv.log_tail()}")
        try:
            if httpx.get(f"{srv.base}/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            srv.stop()
            raise RuntimeError(f"prag serve did not answer /health within {timeout} s:\n{srv.log_tail()}")
        time.sleep(0.25)
