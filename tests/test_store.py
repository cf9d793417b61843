"""Adapter store and PEFT directory format: round trips, manifest, atomicity, mismatch errors (no training)."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
import torch

from offline_encode.peft_format import read_peft_adapter, write_peft_adapter
from prag.store import (AdapterStore, MissingAdapterError, StoreMismatchError, StoreSpec,
                                  model_fingerprint, write_shard_file)
from prag.errors import PragError

MODULES = [f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")]
SHAPES = {"gate_proj": (128, 256), "up_proj": (128, 256), "down_proj": (256, 128)}  # (in, out)


def make_adapter(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in MODULES:
        fan_in, fan_out = SHAPES[name.rsplit(".", 1)[-1]]
        out[f"{name}.lora_A"] = torch.randn(rank, fan_in, generator=g)
        out[f"{name}.lora_B"] = torch.randn(fan_out, rank, generator=g)
    return out


def spec(**kw) -> StoreSpec:
    base = dict(base_model="m", model_fingerprint={"name": "m", "hash": "h1"}, rank=2, alpha=32,
                target_modules=("gate_proj", "up_proj", "down_proj"), storage_dtype="float32",
                encode_config={"rank": 2, "alpha": 32, "learning_rate": 3e-4, "docs_per_step": 32},
                augmentation={"path": "/data/aug.jsonl", "sha256": "abc", "augmenter": ["rule"]})
    base.update(kw)
    return StoreSpec(**base)


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("bfloat16", 0.0), ("float16", 0.0)])
def test_round_trip_dtypes_and_bytes_per_doc(tmp_path, dtype, atol):
    adapters = [make_adapter(i) for i in range(5)]
    with AdapterStore.create_or_open(tmp_path / "s", spec(storage_dtype=dtype), init_adapter=make_adapter(99)) as st:
        v0 = st.version
        st.add_batch(["a", "b", "c"], adapters[:3])
        v1 = st.version
        st.add_batch(["d", "e"], adapters[3:])
        assert len({v0, v1, st.version}) == 3  # the version changes with the content
    st = AdapterStore.open(tmp_path / "s")
    assert len(st) == 5 and "c" in st and "zz" not in st and st.doc_ids() == list("abcde")
    params = sum(t.numel() for t in adapters[0].values())
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    assert st.bytes_per_doc == params * itemsize == st.manifest["bytes_per_doc"]
    assert st.stats()["shards"] == 2
    got = st.get_many(["e", "a", "e"])  # any order, repeats allowed
    for want, have in zip([adapters[4], adapters[0], adapters[4]], got):
        assert set(have) == set(want)
        for k in want:
            assert have[k].dtype == torch.float32
            expected = want[k].to(getattr(torch, dtype)).to(torch.float32)  # exactly what the dtype keeps
            torch.testing.assert_close(have[k], expected, atol=atol, rtol=0)
    init = st.init_adapter()
    assert all(torch.equal(init[k], make_adapter(99)[k]) for k in init)  # the init is always kept in fp32
    assert st.verify() == []
    st.close()


def test_missing_ids_and_duplicates(tmp_path):
    with AdapterStore.create_or_open(tmp_path / "s", spec(), init_adapter=make_adapter(0)) as st:
        st.add_batch(["x"], [make_adapter(1)])
        with pytest.raises(MissingAdapterError, match=r"'nope'.*'gone'"):
            st.get_many(["x", "nope", "gone"])
        with pytest.raises(PragError, match="already has doc id"):
            st.add_batch(["x"], [make_adapter(2)])
        with pytest.raises(PragError, match="does not match the store layout"):
            st.add_batch(["y"], [{k: v for k, v in list(make_adapter(3).items())[1:]}])
        with pytest.raises(PragError, match="shape"):
            st.add_batch(["y"], [make_adapter(3, rank=4)])
        assert len(st) == 1
    ro = AdapterStore.open(tmp_path / "s")
    with pytest.raises(PragError, match="read-only"):
        ro.add_batch(["z"], [make_adapter(4)])


def test_manifest_contents(tmp_path):
    with AdapterStore.create_or_open(tmp_path / "s", spec(storage_dtype="bfloat16"), make_adapter(0)) as st:
        st.add_batch(["d1", "d2"], [make_adapter(1), make_adapter(2)])
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["base_model"] == {"name_or_path": "m", "fingerprint": {"name": "m", "hash": "h1"}}
    assert (m["rank"], m["alpha"], m["storage_dtype"]) == (2, 32, "bfloat16")
    assert m["target_modules"] == ["gate_proj", "up_proj", "down_proj"]
    assert m["encode_config"]["learning_rate"] == 3e-4 and len(m["config_hash"]) == 64
    assert m["augmentation"] == [{"path": "/data/aug.jsonl", "sha256": "abc", "augmenter": ["rule"]}]
    assert m["modules"] == MODULES
    layout = m["layout"]
    assert layout[0] == {"key": MODULES[0] + ".lora_A", "shape": [2, 128], "offset": 0, "numel": 256}
    assert sum(e["numel"] for e in layout) == m["params_per_doc"] and m["bytes_per_doc"] == 2 * m["params_per_doc"]
    # per-document checksums live in the index, next to each doc's (shard, row)
    rows = sqlite3.connect(tmp_path / "s" / "index.sqlite").execute(
        "SELECT doc_id, row, length(checksum) FROM docs ORDER BY row").fetchall()
    assert rows == [("d1", 0, 8), ("d2", 1, 8)]  # crc32 hex (format version 2; version 1 had sha256)
    assert m["checksum_algorithm"] == "crc32" and m["format_version"] == 2


def test_mismatch_errors_and_single_writer(tmp_path):
    path = tmp_path / "s"
    AdapterStore.create_or_open(path, spec(), make_adapter(0)).close()
    cases = [
        (spec(rank=4), "rank 2, but rank 4"),
        (spec(target_modules=("q_proj",)), r"targets \['gate_proj', 'up_proj', 'down_proj'\], but \['q_proj'\]"),
        (spec(model_fingerprint={"name": "other", "hash": "h2"}), "built for base model 'm', but 'other'"),
        (spec(storage_dtype="float16"), "stores float32, but float16"),
        (spec(encode_config={"rank": 2, "alpha": 32, "learning_rate": 1e-3}), "learning_rate: store 0.0003"),
    ]
    for bad, message in cases:
        with pytest.raises(StoreMismatchError, match=message):
            AdapterStore.create_or_open(path, bad)
    # runtime-only settings (docs_per_step) may differ on resume
    ok = AdapterStore.create_or_open(path, spec(encode_config={"rank": 2, "alpha": 32, "learning_rate": 3e-4,
                                                               "docs_per_step": 8}))
    with pytest.raises(PragError, match="being written by another process"):
        AdapterStore.create_or_open(path, spec())
    ok.close()
    with AdapterStore.open(path) as ro:
        ro.check_compatible(model_fingerprint={"hash": "h1"}, rank=2, target_modules=["down_proj", "gate_proj",
                                                                                       "up_proj"])
        with pytest.raises(StoreMismatchError):
            ro.check_compatible(rank=8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(PragError, match="not empty and not an adapter store"):
        AdapterStore.create_or_open(tmp_path / "junk", spec(), make_adapter(0))
    with pytest.raises(PragError, match="not an adapter store"):
        AdapterStore.open(tmp_path / "junk")


def test_uncommitted_shard_is_invisible_and_cleaned(tmp_path):
    """A crash between writing a shard file and committing it never exposes its documents."""
    path = tmp_path / "s"
    with AdapterStore.create_or_open(path, spec(), make_adapter(0)) as st:
        st.add_batch(["kept"], [make_adapter(1)])
        orphan = write_shard_file(path, st.layout, "float32", ["lost"], [make_adapter(2)])  # "crash" here
        (path / "shards" / ".shard-x.safetensors.tmp").write_bytes(b"partial")
    assert (path / "shards" / orphan.name).exists()
    with AdapterStore.open(path) as ro:
        assert ro.doc_ids() == ["kept"] and "lost" not in ro
    AdapterStore.create_or_open(path, spec()).close()  # the next writer removes what was never committed
    assert sorted(p.name for p in (path / "shards").iterdir()) == [
        n for (n,) in sqlite3.connect(path / "index.sqlite").execute("SELECT name FROM shards")]


def test_checksum_detects_corruption(tmp_path):
    path = tmp_path / "s"
    with AdapterStore.create_or_open(path, spec(), make_adapter(0)) as st:
        st.add_batch(["a", "b"], [make_adapter(1), make_adapter(2)])
    shard = next((path / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the last row ("b")
    shard.write_bytes(bytes(data))
    with AdapterStore.open(path) as ro:
        assert ro.verify() == ["b"]
        with pytest.raises(PragError, match="checksum mismatch for doc id 'b'"):
            ro.get("b", verify=True)


def test_model_fingerprint(tiny_model_dir, tmp_path):
    fp = model_fingerprint(tiny_model_dir)
    assert fp == model_fingerprint(tiny_model_dir) and fp["weights"]["model.safetensors"] > 0
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir, moved)
    assert model_fingerprint(moved)["hash"] == fp["hash"]  # the name does not matter, the content does
    from prag.fixture_model import build_fixture_model

    other = build_fixture_model(tmp_path / "seed1", size="tiny", seed=1)  # same config and sizes, other weights
    assert model_fingerprint(other)["hash"] != fp["hash"]
    with pytest.raises(PragError, match="does-not-exist does not exist"):  # a path: no hub hint
        model_fingerprint(tmp_path / "does-not-exist")
    with pytest.raises(PragError, match="neither a local directory nor a model in the Hugging Face cache"):
        model_fingerprint("no-such-org/no-such-model")  # a hub id not in the cache: fails at once


def test_safetensors_writer_reads_back_with_the_safetensors_library(tmp_path):
    """Our writer (one header, raw bytes) against the reference reader: dtypes, shapes, strided and empty
    tensors, scalars, metadata; and a clear error for a dtype safetensors cannot hold."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from offline_encode.peft_format import save_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, 2, generator=g).to(torch.bfloat16),
               "f16_strided": torch.randn(4, 6, generator=g).to(torch.float16)[:, ::2], "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(2.5), "i64": torch.arange(5), "flag": torch.tensor([True, False, True])}
    save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "pt", "n": "7"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "n": "7"}
    with pytest.raises(PragError, match="complex64"):
        save_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")


def test_peft_dir_round_trip(tmp_path):
    adapter = make_adapter(5)
    out = write_peft_adapter(adapter, tmp_path / "p", rank=2, alpha=32, target_modules=["gate_proj", "up_proj",
                                                                                         "down_proj"],
                             base_model_name_or_path="base")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    back, cfg = read_peft_adapter(out)
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 32 and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    assert set(back) == set(adapter) and all(torch.equal(back[k], adapter[k]) for k in adapter)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in fh.keys()
    # replacing an existing dir, with a dtype conversion (a merged rank-6 adapter, as the engine writes)
    merged = {k: torch.cat([v] * 3, dim=0 if k.endswith("lora_A") else 1) for k, v in adapter.items()}
    write_peft_adapter(merged, out, rank=6, alpha=6, target_modules=["gate_proj"], dtype="bfloat16")
    back, cfg = read_peft_adapter(out)
    assert cfg["r"] == 6 and back[MODULES[0] + ".lora_A"].dtype == torch.bfloat16
    assert back[MODULES[0] + ".lora_B"].shape == (256, 6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    with pytest.raises(PragError, match="no adapter_config.json"):
        read_peft_adapter(tmp_path)
    with pytest.raises(PragError, match="lora_A"):
        write_peft_adapter({"model.x.weight": torch.zeros(2, 2)}, tmp_path / "bad", 2, 32, ["x"])
