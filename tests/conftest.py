"""Session-wide fixtures: one fixture model and one vLLM engine for the whole test run.

Starting a vLLM engine costs ~20-40 s on the CPU, so every test that needs generation shares
``shared_llm`` (LoRA enabled, max rank 8, structured output on).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_file(name: str) -> Path:
    """A file from ../shared/data, or a clear skip when that folder is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real-data test skipped: {path} not found (../shared/data is absent on this machine)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from prag.fixture_model import build_fixture_model

    return build_fixture_model(tmp_path_factory.mktemp("fixture") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def shared_llm(tiny_model_dir):
    from offline_encode.config import EncodeConfig
    from engine.vllm_backend.llm import LLMConfig, make_llm, shutdown_llm

    # LoRA on the FFN projections only, as the Engine sets it up from its adapter store
    llm = make_llm(LLMConfig(model=str(tiny_model_dir), dtype="float32", max_model_len=1024, max_loras=8,
                             lora_target_modules=tuple(EncodeConfig().target_modules)))
    yield llm
    shutdown_llm(llm)  # now, while pytest's output streams are still open
