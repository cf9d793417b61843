"""benchmarks/sizing.py takes its bytes per document from the real store: the layout it builds for a model
config is the one `prag encode` wrote, and its per-document figures add up to the store's files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import sizing
from prag.errors import PragError
from prag.model_files import read_safetensors_header
from prag.store import AdapterStore, Layout
from tests.test_encode import CFG, augmented_file, encoded  # noqa: F401 (shared fixtures)


def _shards(store_dir: Path) -> list[tuple[int, int, int]]:
    """(rows, header bytes, file bytes) of every shard file, read from the files themselves."""
    out = []
    for path in sorted((store_dir / "shards").iterdir()):
        fd = os.open(path, os.O_RDONLY)
        try:
            header, data_start, size = read_safetensors_header(fd)
        finally:
            os.close(fd)
        out.append((header["adapters"]["shape"][0], data_start, size))
    return out


def test_computed_bytes_per_doc_equal_the_encoded_stores_shards(encoded, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    store_dir, _ = encoded
    with AdapterStore.open(store_dir) as real:
        real_layout, real_bytes, n_real = real.layout, real.bytes_per_doc, len(real)
    init = sizing.init_adapter(AutoConfig.from_pretrained(tiny_model_dir), CFG)
    assert Layout.from_adapter(init) == real_layout  # the meta-device layout is the one encode trained and stored
    m = sizing.measure_store(tmp_path / "s", init, CFG, docs=7, docs_per_shard=3)
    assert m.row_bytes == real_bytes and m.shard_docs == [3, 3, 1]
    shards = _shards(store_dir)
    assert sum(rows for rows, _, _ in shards) == n_real
    # the real store's shard bytes = its headers + documents x the computed row bytes
    assert sum(size - header for _, header, size in shards) == n_real * m.row_bytes
    assert all(size == header + rows * m.row_bytes for rows, header, size in shards)
    # and the plan's per-document figures add up to every file of the measured store
    overhead = {"header_bytes_per_doc": m.header_bytes_per_doc, "index_bytes_per_doc": m.index_bytes_per_doc}
    plan = sizing.store_plan(m.row_bytes, overhead, m.docs, 3, m.fixed_bytes)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file() and p.name != ".writer.lock")
    assert plan["bytes"] == pytest.approx(on_disk, abs=1e-6)
    assert plan["shard_files"] == 3  # shard file names are random: compare the sizes as a multiset
    assert sorted(m.shard_bytes) == sorted(size for _, _, size in _shards(tmp_path / "s"))


@pytest.mark.parametrize("name", ["llama-1b", "llama-8b"])
def test_model_shapes_give_rank_2_ffn_rows(name):
    from offline_encode.config import EncodeConfig

    shape = sizing.MODELS[name]
    init = sizing.init_adapter(sizing.llama_config(shape), EncodeConfig(rank=2, storage_dtype="bfloat16"))
    layout = Layout.from_adapter(init)
    # per layer: gate and up are hidden -> ffn, down is ffn -> hidden; A is [r, in], B is [out, r]
    expected = shape["num_hidden_layers"] * 2 * 3 * (shape["hidden_size"] + shape["intermediate_size"])
    assert layout.params_per_doc == expected and len(layout.modules) == 3 * shape["num_hidden_layers"]
    assert {k.rsplit(".", 2)[-2] for k in layout.keys} == {"gate_proj", "up_proj", "down_proj"}


def test_main_reads_benchmark_json_and_writes_the_report(tmp_path):
    retrieval = tmp_path / "retrieval.json"
    retrieval.write_text(json.dumps({
        "corpus": {"passages": 2600}, "device": "cpu", "machine": {"cpus": 2},
        "embedding": {"passages_per_s": 40.0},
        "indexes": {"flat": {"index_bytes_per_passage": 1536.0}, "ivfpq": {"index_bytes_per_passage": 72.5},
                    "bm25": {"bytes_per_passage": 1300.0, "docstore_bytes_per_passage": 640.0}}}))
    serve = tmp_path / "serve.json"
    serve.write_text(json.dumps({"meta": {"cpus": 2, "size": "small"},
                                 "modes": {"prag": {"questions_per_s": 25.0},
                                           "prag (warm cache)": {"questions_per_s": 40.0}}}))
    out = tmp_path / "out"
    res = sizing.main(["--out", str(out), "--models", "llama-1b", "--passages", "1000000", "--index-docs", "300",
                       "--sample-docs", "2", "--retrieval-json", str(retrieval), "--serve-json", str(serve)])
    m = res["adapters"]["models"]["llama-1b"]
    assert m["measured"]["row_bytes"] == 1_966_080
    assert m["dpr"]["bytes_per_doc"] == pytest.approx(1_966_080 + res["adapters"]["overhead"]["header_bytes_per_doc"]
                                                      + res["adapters"]["overhead"]["index_bytes_per_doc"])
    assert 5 < res["adapters"]["overhead"]["header_bytes_per_doc"] < 100  # the ids in the shard header
    assert res["index_plan"]["index"]["ivfpq"]["bytes"] == pytest.approx(72.5e6)
    assert res["gpu_hours"]["encode"]["gpu_hours"] == pytest.approx(1e6 * 0.18 / 3600)
    assert res["gpu_hours"]["embed"]["machine_hours"] == pytest.approx(1e6 / 40 / 3600)
    assert [(r["target_qps"], r["replicas_cold"], r["replicas_warm"]) for r in res["serve"]["rows"]] == \
        [(10, 1, 1), (100, 4, 3), (1000, 40, 25)]
    saved = json.loads((out / "results.json").read_text())
    assert saved["serve"]["prag_cold_qps"] == 25.0
    md = (out / "results.md").read_text()
    assert "1,966,080" in md and "ivfpq" in md and "CPU fixture figures" in md and "not measured" in md


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"corpus": {"passages": 3}, "indexes": {"flat": {"index_bytes_per_passage": 1.0}}}))
    with pytest.raises(PragError, match=f"{bad}: missing field embedding"):
        sizing.index_from_json(bad)
    bad.write_text(json.dumps({"modes": {"none": {"questions_per_s": 3}}}))
    with pytest.raises(PragError, match=r"missing field prag"):
        sizing.serve_from_json(bad)
    with pytest.raises(PragError, match="per-replica"):
        sizing.replicas_for(100, 0.0)
    with pytest.raises(PragError, match="--models"):
        sizing.main(["--out", str(tmp_path / "o"), "--models", "gpt-5"])
