"""Quiet by default: `prag eval` on the fixture model says little beyond its results; --verbose says everything.

Before prag.logs a 50-question eval printed 92 lines, 47 of them warnings (35 one per-weight dtype warning).
Two subprocess runs, one engine start each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prag.logs import QuietFilter


def _eval(model: Path, tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    data = tmp_path / "q.json"
    if not data.exists():
        data.write_text(json.dumps([{"question": f"Where was person {i} born?", "answer": "Esterhalm"}
                                    for i in range(8)]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    for var in ("VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH", "TRANSFORMERS_VERBOSITY",
                "PYTHONWARNINGS", "TORCH_CPP_LOG_LEVEL", "VLLM_LOGGING_STREAM"):
        env.pop(var, None)  # what a user's shell has: the defaults
    # --dtype auto runs the float32 fixture in bfloat16 on this CPU: vLLM's per-weight cast warning, said once
    return subprocess.run([sys.executable, "-m", "prag.cli", "eval", "--model", str(model), "--dataset", "generic",
                           "--data", str(data), "--modes", "none", "--out", str(tmp_path / name), *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def _log_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar's carriage-return updates count as one line."""
    return [line.split("\r")[-1] for line in text.splitlines() if line.split("\r")[-1].strip()]


def test_eval_is_quiet_by_default_and_verbose_on_request(tiny_model_dir, tmp_path):
    quiet = _eval(tiny_model_dir, tmp_path, "quiet")
    assert quiet.returncode == 0, quiet.stderr
    err = _log_lines(quiet.stderr)
    assert len(err) < 8, "\n".join(err)
    # the dtype choice, in one line
    cast = [line for line in err if "is stored in float32 but runs in bfloat16" in line]
    assert len(cast) == 1 and cast[0].startswith("prag: model "), err
    assert not any("Attempted to load weight" in line for line in err)
    # stdout carries the results only: no vLLM log line among them
    assert quiet.stdout.startswith("| mode | EM | F1"), quiet.stdout[:500]
    assert " INFO " not in quiet.stdout and "WARNING" not in quiet.stdout

    verbose = _eval(tiny_model_dir, tmp_path, "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    loud = _log_lines(verbose.stderr)
    assert len(loud) > 3 * len(err) and len(loud) >= 30, len(loud)
    assert sum(" INFO " in line for line in loud) >= 20  # vLLM's own start-up log, on stderr
    assert any("is stored in float32 but runs in bfloat16" in line for line in loud)
    assert verbose.stdout.startswith("| mode | EM | F1")  # results stay alone on stdout


def test_quiet_filter_drops_harmless_vllm_warnings_and_repeats():
    import logging

    def rec(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    f = QuietFilter()
    assert not f.filter(rec("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected on x86 CPUs."))
    assert f.filter(rec("vllm.config", "max_model_len 4096 exceeds the model's 2048"))  # a real one stays
    assert not f.filter(rec("vllm.config", "max_model_len 4096 exceeds the model's 2048"))  # once
    assert f.filter(rec("other", "Triton is not installed"))  # the list is for vLLM's records only
