"""A run records everything that changes its answers, and can be repeated exactly (README, Data safety).

Real vLLM throughout: the session's ``shared_llm`` (float32) for the library route, and one CLI run of
``prag eval --config`` that starts its own engine.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest

from prag.errors import PragError

QUESTIONS = [
    "Where does the river Varn flow?", "Who founded the school of landscape art?",
    "When was the bridge over the Olm completed?", "What is the capital of the province of Hest?",
    "Who succeeded the mayor of Brenna?", "Which company did the two brothers found?",
]
MODES = ["none", "rag", "prag"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, shared_llm):
    from engine.engine import Engine
    from tests.helpers.random_store import build_random_store
    from retrieval.index import build_index

    root = tmp_path_factory.mktemp("repro")
    doc_ids = [f"doc{i}" for i in range(12)]
    store = build_random_store(root / "store", tiny_model_dir, doc_ids, seed=11)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "text": f"Document {i}: the river Varn{i} flows past Olm{i}."})
                              + "\n" for i, d in enumerate(doc_ids)))
    build_index(corpus, root / "index", progress=False)
    data = root / "q.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer": "Varn"}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    engine = Engine(tiny_model_dir, index=root / "index", store=store, llm=shared_llm)
    yield {"engine": engine, "store": store, "root": root, "data": data, "model": tiny_model_dir}
    engine.close()


def _cfg(setup, out, batch_size):
    from engine.eval.harness import EvalConfig

    return EvalConfig(dataset="generic", data=str(setup["data"]), out=str(out), model=str(setup["model"]),
                      index=str(setup["root"] / "index"), store=str(setup["root"] / "store"), modes=MODES,
                      batch_size=batch_size, progress=False)


def _tokens(out) -> dict:
    recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return {(r["id"], r["mode"]): r["output_token_ids"] for r in recs}


def _identity(out) -> dict:
    from engine.eval.harness import RECORD_ONLY

    rec = json.loads((out / "config.json").read_text())
    return {k: v for k, v in rec.items() if k not in RECORD_ONLY}


@pytest.fixture(scope="module")
def first_run(setup):
    """The original run: 6 questions x 3 modes, 2 questions per engine call."""
    from engine.eval.harness import evaluate

    out = setup["root"] / "run-a"
    evaluate(_cfg(setup, out, batch_size=2), engine=setup["engine"])
    return out


def test_two_runs_and_two_batch_sizes_give_identical_tokens(setup, first_run):
    """What holds today: a second run, and all questions in one engine call instead of three, change nothing."""
    from engine.eval.harness import evaluate

    evaluate(_cfg(setup, setup["root"] / "run-b", batch_size=6), engine=setup["engine"])
    evaluate(_cfg(setup, setup["root"] / "run-c", batch_size=2), engine=setup["engine"])  # warm adapter cache
    a = _tokens(first_run)
    assert len(a) == len(QUESTIONS) * len(MODES) and all(a.values())
    assert _tokens(setup["root"] / "run-b") == a
    assert _tokens(setup["root"] / "run-c") == a
    # the adapters act, so equal prag tokens are not trivially the base model's
    assert sum(a[(f"q{i}", "prag")] != a[(f"q{i}", "none")] for i in range(len(QUESTIONS))) >= len(QUESTIONS) - 1
    assert _identity(setup["root"] / "run-b") == _identity(first_run)


def test_config_records_everything_that_changes_tokens(setup, first_run):
    from importlib.metadata import version

    from prag.store import model_fingerprint
    from retrieval.manifest import read_manifest

    rec = json.loads((first_run / "config.json").read_text())
    assert rec["dtype"] == "float32"  # as vLLM runs it (the session engine), not EngineConfig's "auto"
    assert rec["requested"] == {"dtype": "auto", "max_new_tokens": None, "max_model_len": 2048}
    assert rec["max_model_len"] == 1024 and rec["max_new_tokens"] == 20 and rec["top_k"] == 3
    assert rec["model"] == str(setup["model"].resolve())
    assert rec["model_fingerprint"] == model_fingerprint(setup["model"])["hash"]
    assert rec["store_version"] == setup["store"].version
    assert rec["index_manifest"]["count"] == 12
    assert rec["index_manifest"]["corpus_sha256"] == read_manifest(setup["root"] / "index").corpus_sha256
    assert rec["prompt"]["assistant_prefix"] == "The answer is" and rec["chain_of_thought"] is False
    assert rec["chat_template_sha256"] and len(rec["chat_template_sha256"]) == 64 and rec["fewshot_sha256"] is None
    assert rec["custom_ops"] == ["all"]  # vLLM's C++ norm/rotary/activation on a CPU LoRA engine
    assert rec["lora_ops"] in ("prag-native-c", "prag-grouped-torch")
    assert rec["versions"]["torch"] == version("torch") and rec["versions"]["vllm"]
    assert rec["engine_args"] == {} and rec["seed"] == 0 and rec["retrieval_method"] == "dense"
    assert rec["runtime"]["batch_size"] == 2 and rec["runtime"]["modes"] == MODES


def test_repeat_from_recorded_config_gives_identical_tokens(setup, first_run):
    """Library route: load_run_config -> the same settings -> the same tokens, on the same engine."""
    from engine.engine import Engine
    from engine.eval.harness import evaluate, load_run_config

    out = setup["root"] / "repeat-lib"
    cfg = load_run_config(first_run / "config.json", str(out))
    assert (cfg.engine.dtype, cfg.engine.max_model_len, cfg.batch_size, cfg.modes) == ("float32", 1024, 2, MODES)
    engine = Engine(cfg.model, index=cfg.index, store=cfg.store, config=cfg.engine, llm=setup["engine"].llm,
                    tokenizer=setup["engine"].tokenizer)
    try:
        evaluate(cfg, engine=engine)
    finally:
        engine.close()
    assert _tokens(out) == _tokens(first_run)
    assert _identity(out) == _identity(first_run)
    assert json.loads((out / "config.json").read_text())["runtime"]["repeat_of"] == str(first_run / "config.json")


def test_cli_repeat_with_config_and_an_override(setup, first_run, capsys):
    """`prag eval --config RUN/config.json --out NEW` on its own (new) engine; --batch-size overrides."""
    from prag.cli import main

    out = setup["root"] / "repeat-cli"
    assert main(["eval", "--config", str(first_run / "config.json"), "--out", str(out), "--batch-size", "4"]) == 0
    assert _tokens(out) == _tokens(first_run)
    assert _identity(out) == _identity(first_run)
    assert json.loads((out / "config.json").read_text())["runtime"]["batch_size"] == 4
    assert "wrote" in capsys.readouterr().out


def test_mismatching_rerun_fails_before_vllm_starts(setup, first_run, capsys, monkeypatch):
    from engine.eval import harness as evaluate_mod
    from prag.cli import main

    def no_engine(*a, **k):
        raise AssertionError("an engine was built before the resume check")

    monkeypatch.setattr(evaluate_mod, "Engine", no_engine)
    before = (first_run / "predictions.jsonl").read_bytes()
    t0 = time.perf_counter()
    rc = main(["eval", "--config", str(first_run / "config.json"), "--out", str(first_run), "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "holds predictions made with other settings (dtype: before 'float32', now 'bfloat16')" in err
    assert "Traceback" not in err
    rc = main(["eval", "--config", str(first_run / "config.json"), "--out", str(first_run), "--top-k", "2"])
    assert rc == 2 and "top_k: before 3, now 2" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 45  # seconds, a loose bound; the spy above is the real check
    assert (first_run / "predictions.jsonl").read_bytes() == before  # nothing written is lost


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(colour="blue"), "unknown key(s) 'colour'"),
    (lambda r: r.pop("dtype"), "missing key(s) 'dtype'"),
    (lambda r: r["runtime"].pop("batch_size"), "missing key(s) in 'runtime': 'batch_size'"),
    (lambda r: r["runtime"].update(max_lores=4), "unknown key(s) in 'runtime': 'max_lores'"),
    (lambda r: r["prompt"].pop("passage_format"), "missing ['passage_format']"),
    (lambda r: r.update(format=1), "key 'format' is 1"),
])
def test_bad_recorded_config_names_the_key(setup, first_run, tmp_path, capsys, edit, message):
    from prag.cli import main

    rec = json.loads((first_run / "config.json").read_text())
    edit(rec)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(rec))
    assert main(["eval", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err, err
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_unreadable_config_names_the_file(tmp_path, capsys):
    from engine.eval.harness import load_run_config
    from prag.cli import main

    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["eval", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert str(bad) in capsys.readouterr().err
    with pytest.raises(PragError, match="--config file not found"):
        load_run_config(tmp_path / "missing.json", str(tmp_path / "o"))


def test_dtype_auto_resolves_as_vllm_does_and_the_cast_is_said_once(tiny_model_dir):
    from vllm.platforms import current_platform

    from engine.vllm_backend.llm import _VLLM_CAST_LOGGER, _CastWarningFilter, cast_note, checkpoint_dtype, dtype_name, resolve_dtype

    model = str(tiny_model_dir)
    assert checkpoint_dtype(model) == "float32"
    auto = resolve_dtype(model, "auto")
    # vLLM's rule: a float32 checkpoint runs in the platform's first supported dtype (bfloat16 on this CPU)
    assert auto == dtype_name(current_platform.supported_dtypes[0])
    assert resolve_dtype(model, "float") == "float32" and resolve_dtype(model, "half") == "float16"
    with pytest.raises(PragError, match="unknown dtype 'fp8'"):
        resolve_dtype(model, "fp8")
    note = cast_note(model, "auto", "float32", "bfloat16")
    assert note.count("\n") == 0 and "stored in float32 but runs in bfloat16 (--dtype auto" in note
    assert "pass --dtype float32" in note and cast_note(model, "auto", "float32", "float32") is None

    # vLLM's per-weight warning is dropped for exactly the announced cast; other warnings pass
    import torch

    vlog = logging.getLogger(_VLLM_CAST_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    quiet = _CastWarningFilter("float32", "bfloat16")
    vlog.addHandler(handler)
    vlog.addFilter(quiet)
    try:
        for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight"):
            vlog.warning("Attempted to load weight %s with dtype %s into parameter with dtype %s",
                         name, torch.float32, torch.bfloat16)
        vlog.warning("Attempted to load weight %s with dtype %s into parameter with dtype %s",
                     "odd.weight", torch.float16, torch.bfloat16)
        vlog.warning("some other vLLM warning")
    finally:
        vlog.removeFilter(quiet)
        vlog.removeHandler(handler)
    assert quiet.dropped == 3
    assert seen == ["Attempted to load weight odd.weight with dtype torch.float16 into parameter with dtype "
                    "torch.bfloat16", "some other vLLM warning"]
