"""``prag eval`` flag validation: every bad input fails fast (before vLLM starts) with exit 2 and a clear message."""

from __future__ import annotations

import json

import pytest

from prag.cli import main
from prag.errors import PragError


def _eval(tmp_path, *extra):
    data = tmp_path / "q.json"
    if not data.exists():
        data.write_text(json.dumps([{"question": "Q?", "answer": "a"}]))
    return main(["eval", "--model", str(tmp_path / "model"), "--dataset", "generic", "--data", str(data),
                 "--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("extra,message", [
    (["--modes", "none,icl"], "unknown mode 'icl'; valid modes: none, rag, prag, combine"),
    (["--modes", "none", "--top-k", "0"], "top_k must be a positive integer"),
    (["--modes", "none", "--top-k", "600"], "above vLLM's largest max_lora_rank 512"),
    (["--modes", "none,rag"], "need --index"),
    (["--modes", "prag", "--index", "."], "need --store"),
    (["--modes", "prag", "--index", ".", "--store", "/nonexistent-store"], "--store directory not found"),
    (["--modes", "none", "--limit", "0"], "--limit must be positive"),
    (["--modes", "none"], "model not found"),
    (["--modes", "none", "--fewshot", "x.json"], "--fewshot only applies with --cot"),
])
def test_bad_flags_exit_2_with_message(tmp_path, capsys, extra, message):
    assert _eval(tmp_path, *extra) == 2
    assert message in capsys.readouterr().err


def test_unknown_dataset_lists_valid_names(tmp_path, capsys):
    rc = main(["eval", "--model", "m", "--dataset", "squad", "--data", "x", "--out", str(tmp_path / "o"),
               "--modes", "none"])
    err = capsys.readouterr().err
    assert rc == 2
    for name in ("2wikimultihopqa", "hotpotqa", "popqa", "complexwebquestions", "nq", "generic"):
        assert name in err


def test_serve_rejects_a_bad_port_before_loading_anything(capsys):
    assert main(["serve", "--model", "no-such-model", "--port", "0"]) == 2
    assert "port must be between 1 and 65535, got 0" in capsys.readouterr().err


def test_prepare_threads_default_to_one_on_a_cpu(monkeypatch):
    """Adapter threads compete with the model's threads on a CPU (measured); a GPU gets 4."""
    from engine import engine as engine_mod
    from engine.engine import EngineConfig

    monkeypatch.setattr(engine_mod, "has_cuda", lambda: False)
    assert EngineConfig().resolved_prepare_threads() == 1
    assert EngineConfig(prepare_threads=3).resolved_prepare_threads() == 3
    monkeypatch.setattr(engine_mod, "has_cuda", lambda: True)
    assert EngineConfig().resolved_prepare_threads() == 4
    with pytest.raises(PragError, match="prepare_threads must be >= 1, got 0"):
        EngineConfig(prepare_threads=0).resolved_prepare_threads()
