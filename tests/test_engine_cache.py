"""Merged-adapter cache (LRU by bytes on tmpfs, stable vLLM identities, pins) and the truncation rule.
No vLLM needed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.adapter_cache import MergedAdapterCache, make_key
from engine.merge import cat_merge
from offline_encode.peft_format import read_peft_adapter, write_peft_adapter

MOD = "model.layers.0.mlp.gate_proj"


def _merged(seed: int):
    g = torch.Generator().manual_seed(seed)
    ads = [{f"{MOD}.lora_A": torch.randn(2, 64, generator=g), f"{MOD}.lora_B": torch.randn(32, 2, generator=g)}
           for _ in range(3)]
    return cat_merge(ads, alpha=32)


def _writer(calls: list):
    def write(merged, out_dir):
        calls.append(out_dir)
        write_peft_adapter(merged.tensors, out_dir, rank=merged.rank, alpha=merged.alpha, target_modules=["gate_proj"])
    return write


def test_key_is_the_sorted_document_set_plus_store_version():
    assert make_key(["b", "a", "c"], "v1") == make_key(["c", "b", "a"], "v1") == (("a", "b", "c"), "v1")
    assert make_key(["a", "b"], "v1") != make_key(["a", "b"], "v2")


def test_lru_by_bytes_stable_ids_and_deleted_dirs(tmp_path):
    calls: list = []
    one = _merged(0)
    probe = MergedAdapterCache(_writer([]), root=tmp_path / "probe")
    size = probe.get_or_build(make_key(["x"], "v"), lambda: one).nbytes
    cache = MergedAdapterCache(_writer(calls), root=tmp_path / "c", max_bytes=2 * size + size // 2)  # room for 2
    ka, kb, kc = (make_key([d], "v") for d in "abc")
    a = cache.get_or_build(ka, lambda: _merged(1))
    b = cache.get_or_build(kb, lambda: _merged(2))
    assert a.lora_int_id != b.lora_int_id and a.lora_name != b.lora_name and a.lora_int_id >= 1
    tensors, config = read_peft_adapter(a.path)
    assert config["r"] == 6 and config["lora_alpha"] == 6
    torch.testing.assert_close(tensors[f"{MOD}.lora_A"], _merged(1).tensors[f"{MOD}.lora_A"])
    assert cache.get_or_build(ka, lambda: pytest.fail("hit must not rebuild")) == a  # a is now most recent
    c = cache.get_or_build(kc, lambda: _merged(3))  # evicts b (least recently used)
    assert kb not in cache and ka in cache and kc in cache
    assert not b.path.exists() and a.path.exists() and c.path.exists()
    assert cache.stats.evictions == 1 and cache.stats.bytes <= cache.max_bytes
    b2 = cache.get_or_build(kb, lambda: _merged(2))  # comes back with the same vLLM identity
    assert (b2.lora_name, b2.lora_int_id) == (b.lora_name, b.lora_int_id)
    assert len(calls) == 4 and cache.stats.hits == 1 and cache.stats.misses == 4
    cache.close()
    assert not any((tmp_path / "c").iterdir())


def test_two_caches_never_share_a_vllm_id(tmp_path):
    """Engines sharing one vLLM engine must not hand it the same lora_int_id for different adapters."""
    key = make_key(["a"], "v")
    one = MergedAdapterCache(_writer([]), root=tmp_path / "1").get_or_build(key, lambda: _merged(1))
    two = MergedAdapterCache(_writer([]), root=tmp_path / "2").get_or_build(key, lambda: _merged(2))
    assert one.lora_int_id != two.lora_int_id and one.lora_name != two.lora_name
    cache = MergedAdapterCache(_writer([]), root=tmp_path / "3")
    first = cache.get_or_build(key, lambda: _merged(1))
    cache.clear(forget_identities=True)
    assert cache.get_or_build(key, lambda: _merged(1)).lora_int_id != first.lora_int_id


def test_pinned_entries_survive_until_released(tmp_path):
    cache = MergedAdapterCache(_writer([]), root=tmp_path, max_bytes=1)  # everything is over budget
    ka, kb = make_key(["a"], "v"), make_key(["b"], "v")
    a = cache.get_or_build(ka, lambda: _merged(1), pin=True)
    b = cache.get_or_build(kb, lambda: _merged(2), pin=True)
    assert a.path.exists() and b.path.exists()  # pinned: in use by a running batch
    cache.unpin([ka])
    assert not a.path.exists() and b.path.exists()
    cache.unpin([kb])
    assert len(cache) == 0


def test_concurrent_requests_for_one_key_build_once(tmp_path):
    calls: list = []
    cache = MergedAdapterCache(_writer(calls), root=tmp_path)
    key = make_key(["a", "b", "c"], "v")
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.2)
        return _merged(5)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build(key, build))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(calls) == 1 and len({r.lora_int_id for r in results}) == 1
    cache.close()


def test_default_root_is_tmpfs_when_available():
    from pathlib import Path

    cache = MergedAdapterCache(_writer([]))
    try:
        if Path("/dev/shm").is_dir():
            assert str(cache.root).startswith("/dev/shm/")
        assert cache.root.is_dir()
    finally:
        cache.close()
    assert not cache.root.exists()


def test_water_filling_truncation_rule(tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.prompts import build_prompt
    from prag.errors import PragError
    from prag.prompt import PromptConfig, build_prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = PromptConfig()
    short = "The bridge was completed in 1901."
    long1 = " ".join(["the river flows north through three valleys"] * 40)
    long2 = " ".join(["he served as mayor for twelve years"] * 30)
    q = "Where does the river flow?"
    full = build_prompt(tok, q, [short, long1, long2], cfg, budget=10_000)
    assert full.truncation is None and full.ids == build_prompt_ids(tok, q, [short, long1, long2], cfg=cfg)
    budget = len(full.ids) - 300
    cut = build_prompt(tok, q, [short, long1, long2], cfg, budget=budget)
    t = cut.truncation
    assert len(cut.ids) <= budget and t["tokens_before"] == len(full.ids)
    assert cut.passages[0] == short and t["passage_tokens_after"][0] == t["passage_tokens_before"][0]
    # both long passages are cut to the same cap, the longer one loses more
    assert t["passage_tokens_after"][1] == t["passage_tokens_after"][2] < min(t["passage_tokens_before"][1:])
    assert cut.ids[-12:] == full.ids[-12:]  # question and template untouched
    assert cut.text.endswith("Question: Where does the river flow?<|end|>\n<|assistant|>\nThe answer is")
    with pytest.raises(PragError, match="even with empty passages"):
        build_prompt(tok, q, [short, long1], cfg, budget=40)
    with pytest.raises(PragError, match="without passages"):
        build_prompt(tok, q, None, cfg, budget=5)
