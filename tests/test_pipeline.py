"""``prag run``: one config, every stage, skip when unchanged, resume after a kill (fixture model, CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prag.pipeline import STAGES, load_run_config, run_pipeline
from prag.errors import PragError
from prag.io import atomic_write_jsonl, iter_jsonl

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 6


def _small_data(tmp: Path) -> tuple[Path, Path]:
    """The first demo documents and a few questions about them."""
    docs = [rec for _, rec in iter_jsonl(REPO / "demo/data/corpus.jsonl")][:N_DOCS]
    ids = {d["id"] for d in docs}
    questions = [{"id": r["id"], "question": r["question"], "answer": r["answer"]}
                 for _, r in iter_jsonl(REPO / "demo/data/questions.jsonl") if r["doc_id"] in ids][::3]
    corpus, data = tmp / "corpus.jsonl", tmp / "questions.jsonl"
    atomic_write_jsonl(corpus, docs)
    atomic_write_jsonl(data, questions)
    return corpus, data


def _write_config(tmp: Path, model: Path, run_dir: Path, name: str = "run.yaml", **extra) -> Path:
    corpus, data = _small_data(tmp)
    cfg = {
        "run_dir": str(run_dir),
        "model": {"path": str(model)},
        "corpus": str(corpus),
        "dataset": {"name": "generic", "data": str(data)},
        "retrieval": {"method": "dense", "top_k": 2},
        "index": {"index_type": "flat"},
        "augment": {"augmenter": "rule", "rule": {"n_qa": 3}},
        # one document per shard, so a run killed in encode has committed some documents and not others
        "encode": {"epochs": 1, "docs_per_shard": 1},
        "eval": {"modes": ["none", "prag"], "dtype": "float32", "max_model_len": 1024},
        "torch_threads": 1,
        **extra,
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _predictions(run_dir: Path) -> dict[tuple[str, str], tuple[list[int], str, list[str]]]:
    return {(r["id"], r["mode"]): (r["output_token_ids"], r["prediction"], r["doc_ids"])
            for _, r in iter_jsonl(run_dir / "eval" / "predictions.jsonl")}


def test_shipped_demo_config_validates(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the working directory: the repository root
    cfg = load_run_config(REPO / "configs/demo.yaml")
    assert cfg.model.path is None and cfg.model.fixture is not None and cfg.model.fixture.size == "tiny"
    assert cfg.augment.augmenter == "rule" and cfg.retrieval.top_k == 1
    assert Path(cfg.corpus).is_file() and Path(cfg.dataset.data).is_file()
    assert Path(cfg.model.fixture.pretrain_data).is_file() and cfg.run_dir == str(REPO / "demo-run")
    assert cfg.eval.modes == ["none", "rag", "prag", "combine"]


def test_paper_configs_validate():
    files = sorted((REPO / "configs/paper").glob("*.yaml"))
    assert len(files) == 12
    models, datasets = set(), set()
    for f in files:
        cfg = load_run_config(f)
        models.add(cfg.model.path)
        datasets.add(cfg.dataset.name)
        assert (cfg.dataset.limit, cfg.retrieval.top_k, cfg.retrieval.method) == (300, 3, "bm25"), f
        lora = cfg.encode.lora
        assert (lora.rank, lora.alpha, lora.learning_rate, lora.epochs) == (2, 32, 3e-4, 1), f
        assert (cfg.augment.augmenter, cfg.augment.llm.n_rewrites, cfg.augment.llm.n_qa) == ("llm", 1, 3), f
        assert cfg.eval.modes == ["none", "rag", "prag", "combine"], f
        assert cfg.reference is None or isinstance(cfg.reference.get("source"), str), f
        assert "reference:" in f.read_text(), f  # every file says what the paper reports (or null, with why)
    assert models == {"meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct",
                      "meta-llama/Meta-Llama-3-8B-Instruct"}
    assert datasets == {"2wikimultihopqa", "hotpotqa", "popqa", "complexwebquestions"}


@pytest.mark.parametrize("section,key,message", [
    ("encode", "lrr", "unknown key 'encode.lrr'"),
    ("index", "bm52", "unknown key 'index.bm52'"),
    ("eval", "top_k", "key 'eval.top_k' is set in 'retrieval'"),
])
def test_unknown_key_is_named(tmp_path, capsys, section, key, message):
    from prag.cli import main

    cfg_path = _write_config(tmp_path, tmp_path / "no-model", tmp_path / "run")
    data = yaml.safe_load(cfg_path.read_text())
    data.setdefault(section, {})[key] = 1
    cfg_path.write_text(yaml.safe_dump(data))
    with pytest.raises(PragError, match=re.escape(message)):
        load_run_config(cfg_path)
    assert main(["run", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(cfg_path) in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_bad_values_are_named(tmp_path):
    cfg_path = _write_config(tmp_path, tmp_path / "m", tmp_path / "run")
    data = yaml.safe_load(cfg_path.read_text())
    data["encode"]["learning_rate"] = "fast"
    cfg_path.write_text(yaml.safe_dump(data))
    with pytest.raises(PragError, match=r"encode\.learning_rate must be a number, got 'fast'"):
        load_run_config(cfg_path)
    data["encode"]["learning_rate"] = -1.0
    cfg_path.write_text(yaml.safe_dump(data))
    with pytest.raises(PragError, match=r"encode: --lr \(learning_rate\) must be"):
        load_run_config(cfg_path)
    data["encode"]["learning_rate"] = 3e-4
    data["retrieval"]["method"] = "bm25"
    cfg_path.write_text(yaml.safe_dump(data))
    with pytest.raises(PragError, match=r"needs 'index.bm25: true'"):
        load_run_config(cfg_path)
    cfg_path.write_text(cfg_path.read_text() + "corpus: again.jsonl\n")
    with pytest.raises(PragError, match="duplicate key 'corpus'"):
        load_run_config(cfg_path)


@pytest.mark.slow
def test_run_skip_and_resume_after_kill(tmp_path, tiny_model_dir, shared_llm):
    # 1. an uninterrupted run
    cfg_a = load_run_config(_write_config(tmp_path, tiny_model_dir, tmp_path / "run-a"))
    first = run_pipeline(cfg_a, llm=shared_llm, progress=False)
    assert [(s.name, s.status) for s in first.stages] == [(s, "ran") for s in STAGES if s != "fixture"]
    n_questions = sum(1 for _ in iter_jsonl(tmp_path / "questions.jsonl"))
    assert first.results["none"]["n"] == first.results["prag"]["n"] == n_questions
    manifest = json.loads((tmp_path / "run-a" / "run.json").read_text())
    assert manifest["config"]["encode"]["lora"]["learning_rate"] == 3e-4
    assert manifest["model"]["fingerprint"] and manifest["versions"]["torch"]
    assert all(manifest["stages"][s]["status"] == "complete" for s in ("index", "select", "augment", "encode", "eval"))

    # 2. a rerun skips every stage and changes no file
    before = _snapshot(tmp_path / "run-a")
    again = run_pipeline(load_run_config(tmp_path / "run.yaml"), llm=shared_llm, progress=False)
    assert [s.status for s in again.stages] == ["skipped"] * 5
    assert _snapshot(tmp_path / "run-a") == before
    assert again.results == first.results

    # 3. changed settings are refused, naming the stage and the setting, until --redo
    data = yaml.safe_load((tmp_path / "run.yaml").read_text())
    data["encode"]["learning_rate"] = 1e-3
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PragError, match=r"stage 'encode'.*learning_rate: 0\.0003 -> 0\.001.*--redo encode"):
        run_pipeline(load_run_config(tmp_path / "changed.yaml"), llm=shared_llm, progress=False)
    assert _snapshot(tmp_path / "run-a") == before

    # 4. the same run in a subprocess, SIGKILLed once encode has started, then resumed here
    cfg_b_path = _write_config(tmp_path, tiny_model_dir, tmp_path / "run-b", name="run-b.yaml")
    run_json = tmp_path / "run-b" / "run.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "prag.cli", "run", str(cfg_b_path), "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                stage = json.loads(run_json.read_text())["stages"].get("encode", {})
            except (OSError, ValueError):
                stage = {}
            shards = tmp_path / "run-b" / "encode" / "shards"
            if stage.get("status") == "running" and shards.is_dir() and any(shards.iterdir()):
                break  # encode has written its first shard
            time.sleep(0.02)
        assert proc.poll() is None, f"prag run ended before encode was killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    killed = json.loads(run_json.read_text())["stages"]
    assert killed["encode"]["status"] == "running" and "eval" not in killed
    from prag.store import AdapterStore

    with AdapterStore.open(tmp_path / "run-b" / "encode") as store:
        committed = len(store)
    selected = sum(1 for _ in iter_jsonl(tmp_path / "run-b" / "select" / "corpus.jsonl"))
    print(f"killed in encode with {committed} of {selected} documents committed")
    assert committed < selected

    resumed = run_pipeline(load_run_config(cfg_b_path), llm=shared_llm, progress=False)
    assert [(s.name, s.status) for s in resumed.stages] == [
        ("index", "skipped"), ("select", "skipped"), ("augment", "skipped"), ("encode", "resumed"), ("eval", "ran")]
    a, b = _predictions(tmp_path / "run-a"), _predictions(tmp_path / "run-b")
    assert len(a) == 2 * n_questions and a == b  # identical output tokens, predictions and retrieved documents
    assert {m: resumed.results[m]["em"] for m in ("none", "prag")} == {m: first.results[m]["em"] for m in ("none", "prag")}
