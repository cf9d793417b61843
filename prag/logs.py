"""One logging setup for every ``prag`` command: quiet by default, ``--verbose`` for everything.

Quiet means: our own one-line messages (loggers ``prag``, ``engine``, ``offline_encode``,
``retrieval``, ``benchmarks`` at INFO), other libraries' warnings that a user can act on, each
said once, and nothing on stdout but results. A 50-question eval printed 92 lines before, 47 of
them warnings, most of them vLLM's start-up chatter on a CPU.

``setup_logging`` must run before vLLM, torch, transformers or Ray are imported: they read their
settings from the environment at import time. The settings go into the environment (where the
user has not set them) so worker processes (vLLM's engine core, Ray actors) inherit them.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

OUR_LOGGERS = ("prag", "engine", "offline_encode", "retrieval", "benchmarks")

# vLLM warnings that every CPU run prints and that nothing a user can do changes; --verbose shows them.
HARMLESS_WARNINGS = (
    "The global random seed is set to",  # we pass the seed on purpose
    "Triton is not installed",
    "Triton is installed, but doesn't include CPU backend",
    "Model Runner V2 requires Triton",
    "Reset SSM cache type",
    "is not found in LD_PRELOAD",  # libtcmalloc / libiomp performance hints
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    "does not officially support disabling chunked prefill",  # the llm augmenter's choice on a CPU, tested
    "Enforce eager set, disabling torch.compile",  # echoes the user's own enforce_eager
    "Inductor compilation was disabled by user settings",
)

_verbose = False
_MAX_REMEMBERED = 4096  # distinct lines QuietFilter remembers for its "say it once" rule


def is_verbose() -> bool:
    """Whether ``--verbose`` was given (components that configure their own logging, e.g. uvicorn, ask)."""
    return _verbose


class QuietFilter(logging.Filter):
    """Drops the known-harmless vLLM warnings and any line already said once (same logger, same text)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is still shown, as logging would
            return True
        if record.name.startswith("vllm") and any(h in msg for h in HARMLESS_WARNINGS):
            return False
        key = (record.name, msg)
        if key in self._seen:
            return False
        if len(self._seen) >= _MAX_REMEMBERED:  # a long-running server must not keep every line it logged
            self._seen.clear()
        self._seen.add(key)
        return True


class _Formatter(logging.Formatter):
    """Our messages as they are (they already start with ``prag ...``); others with their source."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name.split(".")[0] in OUR_LOGGERS:
            return text
        return f"{record.name.split('.')[0]} {record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest swaps it between tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False) -> None:
    """Configure logging and the libraries' log settings for one command; safe to call again."""
    global _verbose
    _verbose = verbose
    env = os.environ
    env.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries results only
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # else a warning at every fork
    if not verbose:
        # vLLM's own handler logs INFO to stdout; unconfigured, its loggers reach ours (stderr, WARNING).
        # A user's VLLM_LOGGING_LEVEL / VLLM_LOGGING_CONFIG_PATH keeps vLLM's own configuration.
        if not (env.get("VLLM_LOGGING_LEVEL") or env.get("VLLM_LOGGING_CONFIG_PATH")):
            env.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10's "[W ... utils.cpp] NUMA binding" lines
        env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")  # workers
        for category in (FutureWarning, DeprecationWarning):  # library-internal deprecations, for developers
            warnings.filterwarnings("ignore", category=category)

    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_prag", False)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler._prag = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter("%(message)s"))
    if not verbose:
        handler.addFilter(QuietFilter())
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    if "transformers" in sys.modules and not verbose:  # imported already: the env var came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
