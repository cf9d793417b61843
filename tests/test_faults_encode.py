"""Fault isolation on the encode path and at model loading (README, Data safety): a diverged document is never stored
and fails only itself; bad hyper-parameters, damaged models and damaged augmented files are named errors.

Divergence is injected into the real model with a forward hook on its token embedding: every batch row
that contains ``POISON`` gets NaN embeddings, so exactly that document's loss turns NaN mid-training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offline_encode import trainer as trainer_mod
from offline_encode.config import EncodeConfig
from offline_encode.encode import EXIT_DOCS_FAILED, TORN_LINE, encode_corpus
from prag.store import AdapterStore
from offline_encode.trainer import DIVERGED_LOSS, DIVERGED_WEIGHTS, BatchedLoraTrainer, DocFailure
from offline_encode.training_data import build_training_sequences
from prag.cli import main
from prag.errors import PragError
from tests.test_encode import DOCS, prag_cmd, _env

CFG = EncodeConfig(docs_per_step=4, device="cpu", compute_dtype="float32")


def records(n: int) -> list[dict]:
    return [{"doc_id": d, "passage": p, "rewrites": [r],
             "qa": [{"question": q, "answer": a, "full_answer": f"The answer is {a}."} for q, a in qa],
             "augmenter": "hand", "model": None} for d, p, r, qa in DOCS[:n]]


def write_jsonl(path: Path, recs: list[dict], tail: bytes = b"") -> Path:
    path.write_bytes("".join(json.dumps(r) + "\n" for r in recs).encode() + tail)
    return path


def poison_hook(model, token_id: int):
    """NaN embeddings for every row holding ``token_id``: that document's loss becomes NaN, no other's."""
    def hook(module, args, output):
        rows = (args[0] == token_id).any(dim=1)
        if not bool(rows.any()):
            return None
        output = output.clone()
        output[rows] = float("nan")
        return output

    return model.get_input_embeddings().register_forward_hook(hook)


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    return BatchedLoraTrainer(tiny_model_dir, CFG)


@pytest.fixture(scope="module")
def docs(trainer):
    return [build_training_sequences(trainer.tokenizer, r) for r in records(5)]


def unique_token(docs: list[list[list[int]]], victim: int, seq: int) -> int:
    """A token of ``docs[victim][seq]`` that occurs in no earlier sequence of it and in no other document."""
    others = {t for i, d in enumerate(docs) if i != victim for s in d for t in s}
    earlier = {t for s in docs[victim][:seq] for t in s}
    candidates = sorted(set(docs[victim][seq]) - others - earlier)
    assert candidates, "the fixture documents share every token"
    return candidates[0]


# ----------------------------------------------------------------------------- the batched trainer


def test_one_diverging_document_does_not_touch_the_others(trainer, docs):
    victim, step = 2, 3
    token = unique_token(docs, victim, step - 1)
    clean = trainer.train(docs)
    assert trainer.last_stats.failed == {}
    handle = poison_hook(trainer.model, token)
    try:
        poisoned = trainer.train(docs)
    finally:
        handle.remove()
    assert trainer.last_stats.failed == {victim: DocFailure(DIVERGED_LOSS, f"from step {step} of {len(docs[victim])}")}
    assert all(torch.isnan(t).all() for t in poisoned[victim].values())
    assert all(torch.isfinite(t).all() for t in clean[victim].values())
    for i in range(len(docs)):
        if i != victim:  # same batches, same micro-batches: bit-identical, not merely close
            assert all(torch.equal(poisoned[i][k], clean[i][k]) for k in clean[i]), f"doc {i} changed"
    # and equal (to float reordering) to a run that never saw the diverging document
    without = trainer.train(docs[:victim] + docs[victim + 1:])
    for got, i in zip(without, [i for i in range(len(docs)) if i != victim]):
        for k in got:
            torch.testing.assert_close(got[k], clean[i][k], atol=1e-6, rtol=0)


def test_a_huge_learning_rate_fails_every_document(trainer, docs):
    big = BatchedLoraTrainer(trainer.model, EncodeConfig(docs_per_step=4, learning_rate=1e8, epochs=3),
                             init_adapter=trainer.init_adapter)
    try:
        adapters = big.train(docs[:3])
    finally:
        big.close()
    assert sorted(big.last_stats.failed) == [0, 1, 2]
    assert {f.reason for f in big.last_stats.failed.values()} <= {DIVERGED_LOSS, DIVERGED_WEIGHTS}
    assert all(not torch.isfinite(a[k]).all() for a in adapters for k in a)


# ----------------------------------------------------------------------------- encode: never stores garbage


@pytest.fixture()
def poisoned_model(monkeypatch, tiny_model_dir, trainer):
    """Every model the encode worker loads gets the NaN hook for the token that only doc 'elsa' has."""
    recs = records(4)
    seqs = [build_training_sequences(trainer.tokenizer, r) for r in recs]
    token = unique_token(seqs, 2, 0)
    real = trainer_mod.load_base_model

    def load(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        poison_hook(model, token)
        return model, tokenizer

    monkeypatch.setattr(trainer_mod, "load_base_model", load)
    return recs


def test_encode_stores_the_healthy_documents_only_and_retries_the_failed_one(
        tmp_path, tiny_model_dir, poisoned_model, monkeypatch):
    aug = write_jsonl(tmp_path / "aug.jsonl", poisoned_model)
    s = encode_corpus(aug, tiny_model_dir, tmp_path / "poisoned", CFG, progress=False)
    assert (s.trained, s.n_failed, s.docs_in_store) == (3, 1, 3)
    assert s.failed == {DIVERGED_LOSS: 1} and s.failed_docs["elsa"][0] == DIVERGED_LOSS
    assert "FAILED 1 (not stored): training diverged" in s.format() and "doc_id 'elsa' from step 1" in s.format()
    with AdapterStore.open(tmp_path / "poisoned") as st:
        assert "elsa" not in st and len(st) == 3
    # a rerun does not treat the failed document as done: it trains it again (and reports it again)
    again = encode_corpus(aug, tiny_model_dir, tmp_path / "poisoned", CFG, progress=False)
    assert (again.trained, again.already_encoded, again.n_failed) == (0, 3, 1)
    # the healthy documents are bit-identical to a run without the fault; once it is gone the rerun completes
    monkeypatch.undo()
    clean = encode_corpus(aug, tiny_model_dir, tmp_path / "clean", CFG, progress=False)
    assert clean.n_failed == 0 and clean.trained == 4
    with AdapterStore.open(tmp_path / "poisoned") as a, AdapterStore.open(tmp_path / "clean") as b:
        ids = ["varnholt", "brenn", "marr"]
        assert torch.equal(a.get_rows(ids), b.get_rows(ids))
    healed = encode_corpus(aug, tiny_model_dir, tmp_path / "poisoned", CFG, progress=False)
    assert (healed.trained, healed.already_encoded, healed.n_failed, healed.docs_in_store) == (1, 3, 0, 4)


def test_cli_exit_status_and_torn_tail_warning(tmp_path, tiny_model_dir, poisoned_model, capsys):
    aug = write_jsonl(tmp_path / "aug.jsonl", poisoned_model, tail=b'{"doc_id": "cut", "passage": "Half a li')
    rc = main(["encode", "--augmented", str(aug), "--model", str(tiny_model_dir), "--out", str(tmp_path / "s"),
               "--docs-per-step", "4", "--no-progress", "--summary-json", str(tmp_path / "summary.json")])
    out, err = capsys.readouterr()
    assert rc == EXIT_DOCS_FAILED == 3
    assert f"warning: {aug}:5: torn last line" in err
    assert "1 document(s) failed and were not stored (training diverged" in err and "exit status 3" in err
    assert "encoded 3 document(s)" in out and f"skipped 1: {TORN_LINE} (e.g. line 5)" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == {DIVERGED_LOSS: 1} and summary["skipped"] == {TORN_LINE: 1}
    assert summary["records"] == 4 and list(summary["failed_docs"]) == ["elsa"]


def test_cli_huge_learning_rate_stores_nothing_and_exits_3(tmp_path, tiny_model_dir):
    """The issue's repro: `--lr 1e8 --epochs 3` exited 0 with every stored tensor NaN."""
    aug = write_jsonl(tmp_path / "aug.jsonl", records(2))
    out = tmp_path / "store"
    r = subprocess.run(prag_cmd("encode", "--augmented", str(aug), "--model", str(tiny_model_dir), "--out",
                                str(out), "--lr", "1e8", "--epochs", "3", "--no-progress"),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert "2 document(s) failed and were not stored" in r.stderr
    assert "FAILED 2 (not stored): training diverged" in r.stdout and "encoded 0 document(s)" in r.stdout
    if AdapterStore.exists(out):
        with AdapterStore.open(out) as st:
            assert len(st) == 0


# ----------------------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", -1.0, "--lr (learning_rate) must be a finite number > 0, got -1.0"),
    ("learning_rate", 0.0, "--lr (learning_rate) must be a finite number > 0, got 0.0"),
    ("learning_rate", math.nan, "--lr (learning_rate) must be a finite number, got nan"),
    ("learning_rate", math.inf, "--lr (learning_rate) must be a finite number, got inf"),
    ("epochs", 0, "--epochs must be at least 1, got 0"),
    ("rank", 0, "--rank must be at least 1, got 0"),
    ("rank", 2.5, "--rank must be a whole number, got 2.5"),
    ("alpha", 0, "--alpha must be a finite number > 0, got 0"),
    ("weight_decay", -0.01, "--weight-decay (weight_decay) must be a finite number >= 0, got -0.01"),
    ("docs_per_step", 0, "--docs-per-step (docs_per_step) must be at least 1, got 0"),
    ("loss_chunk_tokens", 0, "--loss-chunk-tokens (loss_chunk_tokens) must be at least 1, got 0"),
    ("target_modules", (), "--targets (target_modules) must be a non-empty list of module names"),
    ("target_modules", ("up_proj", "up_proj"), "--targets (target_modules) must be a list without repeated"),
    ("storage_dtype", "int8", "--storage-dtype (storage_dtype) must be one of float32, bfloat16, float16, got 'int8'"),
    ("compute_dtype", "fp8", "--compute-dtype (compute_dtype) must be one of auto"),
    ("device", "tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("max_padding", 1.0, "max_padding must be in [0, 1), got 1.0"),
])
def test_config_refuses_bad_hyper_parameters(field, value, message):
    with pytest.raises(PragError) as info:
        EncodeConfig(**{field: value})
    assert message in str(info.value)


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "--lr (learning_rate) must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr (learning_rate) must be a finite number, got nan"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--targets", ","], "--targets (target_modules) must be a non-empty list"),
    (["--docs-per-shard", "0"], "--docs-per-shard must be a whole number >= 1, got 0"),
])
def test_cli_refuses_bad_hyper_parameters_before_any_work(tmp_path, tiny_model_dir, capsys, flags, message):
    aug = write_jsonl(tmp_path / "aug.jsonl", records(1))
    start = time.monotonic()
    rc = main(["encode", "--augmented", str(aug), "--model", str(tiny_model_dir), "--out", str(tmp_path / "s"),
               "--no-progress", *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert time.monotonic() - start < 5  # no model was loaded
    assert not AdapterStore.exists(tmp_path / "s")


# ----------------------------------------------------------------------------- damaged inputs


def damaged_model(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "truncated":
        weights = dst / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    elif how == "no-tokenizer":
        for p in dst.glob("tokenizer*"):
            p.unlink()
    return dst


DAMAGE = [("truncated", "model.safetensors is truncated or damaged (its header describes"),
          ("no-tokenizer", "model directory has no tokenizer files (one of tokenizer.json")]


@pytest.mark.parametrize("how,message", DAMAGE)
def test_encode_names_a_damaged_model(tmp_path, tiny_model_dir, how, message):
    model = damaged_model(tiny_model_dir, tmp_path / "model", how)
    aug = write_jsonl(tmp_path / "aug.jsonl", records(1))
    r = subprocess.run(prag_cmd("encode", "--augmented", str(aug), "--model", str(model), "--out",
                                str(tmp_path / "s"), "--no-progress"),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "prag encode: error: --model: " in r.stderr and message in r.stderr
    assert str(model) in r.stderr


@pytest.mark.parametrize("how,message", DAMAGE)
def test_eval_names_a_damaged_model_before_vllm_starts(tmp_path, tiny_model_dir, how, message):
    model = damaged_model(tiny_model_dir, tmp_path / "model", how)
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"question": "Q?", "answer": "a"}]))
    argv = ["eval", "--model", str(model), "--dataset", "generic", "--data", str(data), "--out",
            str(tmp_path / "out"), "--modes", "none"]
    # a fresh interpreter, so "was vLLM's engine class ever imported" is a meaningful question
    code = ("import sys; from prag.cli import main; rc = main(sys.argv[1:]); "
            "print('LLM imported:', 'vllm.entrypoints.llm' in sys.modules); sys.exit(rc)")
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, *argv], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "prag eval: error: --model: " in r.stderr and message in r.stderr
    assert "LLM imported: False" in r.stdout
    assert time.monotonic() - start < 120  # interpreter + imports; a vLLM start would add its own minute


def test_encode_names_the_non_utf8_line(tmp_path, tiny_model_dir, capsys):
    aug = write_jsonl(tmp_path / "aug.jsonl", records(2))
    with open(aug, "ab") as fh:
        fh.write(b'{"doc_id": "latin1", "passage": "caf\xe9", "qa": []}\n')
    rc = main(["encode", "--augmented", str(aug), "--model", str(tiny_model_dir), "--out", str(tmp_path / "s"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{aug}:3: not UTF-8 text (byte 0xe9 at column 37)" in err
    assert not AdapterStore.exists(tmp_path / "s")


def test_a_cached_hub_model_name_loads_from_the_cache_without_the_network(tiny_model_dir, tmp_path):
    """A hub id in the local cache is loaded from its snapshot directory: with HF_HUB_OFFLINE unset and no
    network, transformers given the *name* would spend a minute retrying the hub (encode refused names)."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0" * 40)
    script = ("import sys\n"
              "from prag.model_files import check_model_dir\n"
              "from offline_encode.trainer import BatchedLoraTrainer\n"
              "from offline_encode.config import EncodeConfig\n"
              "print(check_model_dir('acme/tiny-llama'))\n"
              "t = BatchedLoraTrainer('acme/tiny-llama', EncodeConfig(device='cpu', compute_dtype='float32'))\n"
              "print('OK', type(t.model).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == str(snap) and "OK LlamaForCausalLM" in proc.stdout
