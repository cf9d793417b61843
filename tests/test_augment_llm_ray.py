"""`prag augment --augmenter llm --ray-address local` on the tiny fixture model: a record for every document
with the QA schema respected, and a run SIGKILLed half-way resumes to exactly the uninterrupted run's records.

Three engine starts in all (uninterrupted, killed, resumed), each inside one Ray actor of a 2-CPU local
cluster; --engine-arg enforce_eager=true skips vLLM's ~12 s torch.compile warm-up at each start.
--batch-size 1: a generate call then holds one document whatever the resume point. (With vLLM's compiled
CPU model, the default without enforce_eager, a document's tokens can depend on which documents share its
batch: 2 of 6 documents differed between one batch of 6 and single batches; eager, none did. A resume after
a kill that cut a batch re-batches the rest.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_DOCS = 6
N_QA = 3
QA_KEYS = {"question", "answer", "full_answer"}


def _corpus(path: Path) -> Path:
    text = ("Person {i} Dovanko was born in 18{i}4 in the town of Esterhalm. "
            "She founded the glassworks in 19{i}2 with {j} partners.")
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": text.format(i=i, j=i + 3)}) + "\n"
                            for i in range(N_DOCS)), encoding="utf-8")
    return path


def _cmd(model: Path, corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "prag.cli", "augment", "--augmenter", "llm", "--model", str(model),
            "--corpus", str(corpus), "--out", str(out), "--ray-address", "local", "--ray-num-cpus", "2",
            "--ray-max-actors", "1", "--batch-size", "1", "--n-qa", str(N_QA), "--max-tokens", "320",
            "--max-model-len", "1024", "--max-question-chars", "10", "--max-answer-chars", "5",
            "--max-full-answer-chars", "10", "--engine-arg", "enforce_eager=true", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _lines(path: Path) -> list[str]:
    """Complete lines only (a kill can leave a torn last one, which the rerun cuts off)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return data[:data.rfind(b"\n") + 1].decode().splitlines()


def _session_pids(sid: int) -> list[int]:
    """Processes still in the session the killed run led (Ray's GCS, raylet and actor, if they outlived it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:  # only processes of the session this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _check_records(lines: list[str]) -> dict[str, str]:
    by_id: dict[str, str] = {}
    for line in lines:
        rec = json.loads(line)
        assert "error" not in rec, rec
        assert rec["doc_id"] not in by_id, f"{rec['doc_id']} written twice"
        assert rec["augmenter"] == "llm" and len(rec["rewrites"]) == 1 and rec["rewrites"][0]
        # the structured-output schema: exactly n_qa objects with exactly these keys, non-empty strings
        # (no maxLength check: the random model emits partial UTF-8 byte tokens that decode to U+FFFD,
        # which the grammar counted as bytes, so a 10-char bound can read as 11; see test_augment_llm.py)
        assert isinstance(rec["qa"], list) and len(rec["qa"]) == N_QA
        for qa in rec["qa"]:
            assert set(qa) == QA_KEYS and all(isinstance(qa[k], str) and qa[k] for k in QA_KEYS)
        by_id[rec["doc_id"]] = line
    return by_id


def test_llm_augmenter_on_ray_every_document_and_resumes_after_sigkill(tiny_model_dir, tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl")
    all_ids = {f"d{i}" for i in range(N_DOCS)}

    # 1. uninterrupted run
    ref_out = tmp_path / "ref.jsonl"
    r = subprocess.run(_cmd(tiny_model_dir, corpus, ref_out), env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"augmented {N_DOCS} document(s), 0 failed" in r.stdout and "Ray at local with 1 worker(s)" in r.stdout
    ref = _check_records(_lines(ref_out))
    assert set(ref) == all_ids

    # 2. the same command, SIGKILLed (driver, Ray and actor) once some but not all records are written
    out = tmp_path / "aug.jsonl"
    proc = subprocess.Popen(_cmd(tiny_model_dir, corpus, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(_lines(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        _kill_session(proc)
    before = _lines(out)
    assert 2 <= len(before) < N_DOCS, f"the kill came too late or too early: {len(before)} records"
    assert not _session_pids(proc.pid), "processes of the killed run survived"

    # 3. rerun: the missing documents are added, nothing written before the kill changes
    r = subprocess.run(_cmd(tiny_model_dir, corpus, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (f"augmented {N_DOCS - len(before)} document(s), 0 failed, {len(before)} skipped as already done"
            in r.stdout), r.stdout
    after = _lines(out)
    assert after[:len(before)] == before  # byte-identical lines, in place
    resumed = _check_records(after)  # every document exactly once
    assert set(resumed) == all_ids
    # per-document seeds: the killed-and-resumed run wrote exactly the uninterrupted run's records
    assert resumed == ref
