"""Adapter-store damage is detected on read and fails only what it touches (README, Data safety).

Damage is made the way it happens: bytes overwritten inside one row, NaN in a row (with and without a
matching checksum, i.e. disk damage vs. an encode that diverged), a shard file deleted, resized or
replaced by a ``torch.save`` zip, a truncated ``index.sqlite``. Store-level checks use small
hand-made stores; engine and server checks use the real vLLM (session ``shared_llm``, fp32) and
compare the undamaged questions' output tokens with a run on the intact store.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prag.store import (AdapterStore, CorruptAdapterError, StoreSpec, nonfinite_rows, row_checksum,
                                  verify_store)
from prag.cli import main as prag_main
from prag.errors import PragError

MODULES = [f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")]
SHAPES = {"gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}  # (in, out)
NAN64 = struct.pack("<f", float("nan")) * 16  # 64 bytes of float32 NaN


# ---------------------------------------------------------------------------------------------
# helpers: build small stores, find a row's bytes, damage them


def make_adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in MODULES:
        fan_in, fan_out = SHAPES[name.rsplit(".", 1)[-1]]
        out[f"{name}.lora_A"] = torch.randn(2, fan_in, generator=g)
        out[f"{name}.lora_B"] = torch.randn(fan_out, 2, generator=g)
    return out


def small_store(path: Path, shards: list[list[str]], storage_dtype: str = "float32") -> Path:
    """A store with one shard per list of doc ids (adapter of doc ``d`` seeded by its position)."""
    spec = StoreSpec(base_model="m", model_fingerprint={"name": "m", "hash": "h"}, rank=2, alpha=32,
                     target_modules=("gate_proj", "up_proj", "down_proj"), encode_config={"rank": 2},
                     storage_dtype=storage_dtype)
    seed = 0
    with AdapterStore.create_or_open(path, spec, init_adapter=make_adapter(999)) as st:
        for ids in shards:
            st.add_batch(ids, [make_adapter(seed + i) for i in range(len(ids))])
            seed += len(ids)
    return path


def row_span(store_dir: Path, doc_id: str) -> tuple[Path, int, int]:
    """(shard file, byte offset, byte length) of a document's row, read from the index and the
    safetensors header independently of the store code."""
    con = sqlite3.connect(store_dir / "index.sqlite")
    name, row = con.execute("SELECT s.name, d.row FROM docs d JOIN shards s ON s.id = d.shard_id "
                            "WHERE d.doc_id = ?", (doc_id,)).fetchone()
    con.close()
    path = store_dir / "shards" / name
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n))["adapters"]
    start, end = info["data_offsets"]
    width = (end - start) // info["shape"][0]
    return path, 8 + n + start + row * width, width


def overwrite_row(store_dir: Path, doc_id: str, data: bytes, at: int = 128, fix_checksum: bool = False) -> None:
    """Write ``data`` into the doc's row; ``fix_checksum`` also records the new bytes' checksum in the
    index (what a diverged encode would have stored), so only the finite-value check can catch it."""
    path, offset, width = row_span(store_dir, doc_id)
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        fh.write(data)
        if fix_checksum:
            fh.seek(offset)
            row = torch.frombuffer(bytearray(fh.read(width)), dtype=torch.float32)
    if fix_checksum:
        algo = json.loads((store_dir / "manifest.json").read_text()).get("checksum_algorithm", "sha256")
        con = sqlite3.connect(store_dir / "index.sqlite")
        with con:
            con.execute("UPDATE docs SET checksum = ? WHERE doc_id = ?", (row_checksum(row, algo), doc_id))
        con.close()


def shard_of(store_dir: Path, doc_id: str) -> Path:
    return row_span(store_dir, doc_id)[0]


SHARDS4 = [[f"d{3 * s + i}" for i in range(3)] for s in range(4)]  # 4 shards of 3 docs: d0-d2, d3-d5, ...
ALL = [d for ids in SHARDS4 for d in ids]


# ---------------------------------------------------------------------------------------------
# store level


def test_every_read_is_verified_and_fails_only_the_bad_document(tmp_path):
    store = small_store(tmp_path / "s", SHARDS4)
    with AdapterStore.open(store) as st:
        intact = st.get_rows(ALL).clone()
    overwrite_row(store, "d4", b"\xa5" * 64)  # 64 bytes of one row, as in the server repro
    with AdapterStore.open(store) as st:
        with pytest.raises(CorruptAdapterError) as err:
            st.get_rows(["d3", "d4", "d5"])  # the default read path (what the engine calls)
        assert err.value.doc_ids == ["d4"] and isinstance(err.value, PragError)
        msg = str(err.value)
        assert "checksum mismatch for doc id 'd4'" in msg and shard_of(store, "d4").name in msg
        assert f"prag store verify --store {store} --drop-bad" in msg and "prag encode" in msg
        others = [d for d in ALL if d != "d4"]
        assert torch.equal(st.get_rows(others), intact[[ALL.index(d) for d in others]])
        with pytest.raises(CorruptAdapterError):
            st.get("d4")  # export's path
        # the switch: unverified reads return the damaged bytes
        assert not torch.equal(st.get_rows(["d4"], verify=False)[0], intact[4])
    with AdapterStore.open(store, verify_rows=False) as st:
        st.get_rows(["d4"])
        assert st.verify() == ["d4"]  # a full check ignores the switch


def test_nan_row_with_a_valid_checksum_is_caught_by_the_finite_check(tmp_path):
    store = small_store(tmp_path / "s", SHARDS4)
    overwrite_row(store, "d7", NAN64, fix_checksum=True)
    with AdapterStore.open(store) as st:
        with pytest.raises(CorruptAdapterError, match=r"NaN/inf values in the stored adapter for doc id 'd7'") as err:
            st.get_many(["d6", "d7"])
        assert err.value.doc_ids == ["d7"]
        assert torch.isnan(st.get_rows(["d7"], verify=False)).any()  # the checksum alone would pass it
        assert st.get_rows(["d6", "d8"]).isfinite().all()
        assert st.verify() == ["d7"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_finite_check_in_every_storage_dtype(tmp_path, dtype):
    store = small_store(tmp_path / "s", [["a", "b", "c"]], storage_dtype=dtype)
    nan = {"float32": NAN64, "bfloat16": b"\xc0\x7f" * 32, "float16": b"\x00\x7e" * 32}[dtype]
    overwrite_row(store, "b", nan, fix_checksum=True)
    with AdapterStore.open(store) as st:
        with pytest.raises(CorruptAdapterError, match="NaN/inf values in the stored adapter for doc id 'b'"):
            st.get_rows(["a", "b"])
        assert st.get_rows(["a", "c"]).shape[0] == 2
    # finite values whose float32 sum overflows are not flagged; inf is
    assert nonfinite_rows(torch.full((2, 8), 3e38)) == [] and nonfinite_rows(torch.full((1, 8), -float("inf"))) == [0]


def test_missing_shard_fails_only_its_documents(tmp_path, caplog):
    store = small_store(tmp_path / "s", SHARDS4)
    gone = shard_of(store, "d4")
    gone.unlink()
    with caplog.at_level(logging.WARNING, logger="prag.store"):
        st = AdapterStore.open(store)  # the cheap check at open: one stat per shard
    with st:
        assert list(st.shard_problems) == [gone.name] and "is missing" in st.shard_problems[gone.name]
        assert gone.name in caplog.text and "1 damaged shard file" in caplog.text
        with pytest.raises(CorruptAdapterError) as err:
            st.get_rows(["d0", "d3", "d5", "d9"])
        assert err.value.doc_ids == ["d3", "d5"] and err.value.shards == [str(gone)]
        assert f"shard file {gone} is missing for doc ids 'd3', 'd5'" in str(err.value)
        assert st.get_rows(["d0", "d1", "d2", "d6", "d11"]).shape[0] == 5  # every other shard still serves
        assert st.verify() == ["d3", "d4", "d5"]


@pytest.mark.parametrize("damage", ["torch-zip", "torch-zip-recorded-size", "appended", "truncated"])
def test_damaged_shard_files_give_named_errors(tmp_path, damage):
    store = small_store(tmp_path / "s", SHARDS4)
    path = shard_of(store, "d7")
    if damage.startswith("torch-zip"):
        torch.save({"adapters": torch.zeros(3, 10)}, path)  # a zip in place of the shard
        if damage == "torch-zip-recorded-size":  # the index agrees on the size: the header bound must catch it
            con = sqlite3.connect(store / "index.sqlite")
            with con:
                con.execute("UPDATE shards SET nbytes = ? WHERE name = ?", (path.stat().st_size, path.name))
            con.close()
    elif damage == "appended":
        with open(path, "ab") as fh:
            fh.write(b"\0" * 100)
    else:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) - 1000])
    want = {"torch-zip": "bytes, the index records", "torch-zip-recorded-size": "is not a safetensors adapter shard",
            "appended": "bytes, the index records", "truncated": "bytes, the index records"}[damage]
    with AdapterStore.open(store) as st:
        with pytest.raises(CorruptAdapterError, match=want) as err:
            st.get_rows(["d1", "d7"])
        assert err.value.doc_ids == ["d7"] and str(path) in str(err.value)
        assert st.get_rows(["d1", "d4", "d10"]).shape[0] == 3


def test_damaged_index_is_a_named_error_at_open(tmp_path):
    store = small_store(tmp_path / "s", [[f"x{i:03d}-" + "p" * 100 for i in range(200)], ["y"]])  # several pages
    index = store / "index.sqlite"
    data = index.read_bytes()
    assert len(data) >= 4 * 4096
    index.write_bytes(data[:len(data) // 2])
    with pytest.raises(PragError, match=rf"adapter store index {index} is truncated: \d+ bytes, its header says"):
        AdapterStore.open(store)
    index.write_bytes(data[:50])
    with pytest.raises(PragError, match=rf"adapter store index {index} is damaged: not an SQLite database"):
        AdapterStore.open(store)
    index.write_bytes(data)
    with AdapterStore.open(store) as st:
        assert len(st) == 201


def test_version1_sha256_stores_are_still_verified_and_resumed(tmp_path):
    """Stores written before crc32 keep sha256 rows: read, verified and extended with sha256."""
    store = small_store(tmp_path / "s", [["a", "b"]])
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["checksum_algorithm"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    with AdapterStore.open(store, verify_rows=False) as st:
        rows = dict(zip(["a", "b"], st.get_rows(["a", "b"])))
    con = sqlite3.connect(store / "index.sqlite")
    with con:
        for d, r in rows.items():
            con.execute("UPDATE docs SET checksum = ? WHERE doc_id = ?", (row_checksum(r, "sha256"), d))
    con.close()
    with AdapterStore.open(store) as st:
        assert st.checksum == "sha256" and st.verify() == []
        st.get_rows(["a", "b"])
    spec = StoreSpec(base_model="m", model_fingerprint={"name": "m", "hash": "h"}, rank=2, alpha=32,
                     target_modules=("gate_proj", "up_proj", "down_proj"), encode_config={"rank": 2})
    with AdapterStore.create_or_open(store, spec) as st:
        st.add_batch(["c"], [make_adapter(5)])
    con = sqlite3.connect(store / "index.sqlite")
    assert con.execute("SELECT length(checksum) FROM docs WHERE doc_id='c'").fetchone() == (64,)
    con.close()
    overwrite_row(store, "b", b"\x01" * 64)
    with AdapterStore.open(store) as st:
        assert st.verify() == ["b"]
        with pytest.raises(CorruptAdapterError, match="checksum mismatch for doc id 'b'"):
            st.get("b")


# ---------------------------------------------------------------------------------------------
# prag store verify / export-adapter


def test_store_verify_cli_reports_and_drops_bad_documents(tmp_path, capsys):
    store = small_store(tmp_path / "s", SHARDS4)
    assert prag_main(["store", "verify", "--store", str(store)]) == 0
    assert "OK: every row matches its checksum" in capsys.readouterr().out

    overwrite_row(store, "d1", b"\xff" * 64)
    overwrite_row(store, "d7", NAN64, fix_checksum=True)
    gone = shard_of(store, "d10")
    gone.unlink()
    assert prag_main(["store", "verify", "--store", str(store), "--json"]) == 1
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["ok"] is False
    assert sorted(report["bad_docs"]) == ["d1", "d10", "d11", "d7", "d9"]
    assert "checksum mismatch" in report["bad_docs"]["d1"] and "NaN/inf" in report["bad_docs"]["d7"]
    assert list(report["bad_shards"]) == [gone.name] and "is missing" in report["bad_shards"][gone.name]
    for d in ("'d1'", "'d7'", "'d9'", "'d10'", "'d11'"):
        assert f"bad document {d}" in out
    assert "FAILED: 5 bad document(s), 1 bad shard file(s)" in out and "--drop-bad" in out

    assert prag_main(["store", "verify", "--store", str(store), "--drop-bad"]) == 1
    assert "dropped 5 bad document(s)" in capsys.readouterr().out
    with AdapterStore.open(store) as st:
        assert st.missing(ALL) == ["d1", "d7", "d9", "d10", "d11"] and st.shard_problems == {}
    assert prag_main(["store", "verify", "--store", str(store)]) == 0  # the missing shard left the index
    capsys.readouterr()

    (store / "manifest.json").write_text("{")
    assert prag_main(["store", "verify", "--store", str(store)]) == 2
    assert "manifest" in capsys.readouterr().err


def test_store_verify_checks_the_init_adapter(tmp_path):
    store = small_store(tmp_path / "s", [["a"]])
    data = bytearray((store / "init.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # a NaN in the last init value
    (store / "init.safetensors").write_bytes(bytes(data))
    report = verify_store(store)
    assert not report.ok and report.bad_docs == {}
    assert any("init.safetensors does not match the sha256" in p for p in report.problems)


def test_export_adapter_on_a_missing_shard_is_a_clean_error(tmp_path, capsys):
    store = small_store(tmp_path / "s", SHARDS4)
    gone = shard_of(store, "d4")
    gone.unlink()
    out = tmp_path / "export"
    assert prag_main(["export-adapter", "--store", str(store), "--doc-id", "d4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # the store's open-time warning about the damaged shard may come first (one line, no traceback)
    error = [line for line in err.splitlines() if line.startswith("prag export-adapter: error:")]
    assert len(error) == 1 and error[0].startswith("prag export-adapter: error: adapter store")
    assert gone.name in err and "'d4'" in err
    assert "Traceback" not in err and not out.exists()
    assert prag_main(["export-adapter", "--store", str(store), "--doc-id", "d1", "--out", str(out)]) == 0


def test_drop_bad_then_encode_reencodes_exactly_the_dropped_documents(tmp_path, tiny_model_dir):
    """The repair the error message prescribes is real: encode resumes with just the dropped documents."""
    from offline_encode.config import EncodeConfig
    from offline_encode.encode import encode_corpus
    from tests.test_encode import write_augmented

    augmented = write_augmented(tmp_path / "aug.jsonl", bad=False)
    lines = augmented.read_text().splitlines()[:3]
    augmented.write_text("\n".join(lines) + "\n")
    ids = [json.loads(ln)["doc_id"] for ln in lines]
    store = tmp_path / "store"
    cfg = EncodeConfig(docs_per_step=3)
    encode_corpus(augmented, tiny_model_dir, store, cfg, progress=False)
    with AdapterStore.open(store) as st:
        before = st.get_rows(ids).clone()
    overwrite_row(store, ids[1], b"\x00" * 64)
    with AdapterStore.open(store) as st:
        with pytest.raises(CorruptAdapterError) as err:
            st.get(ids[1])
    assert f"--augmented {augmented.resolve()} --model {tiny_model_dir} --out {store}" in str(err.value)
    assert verify_store(store, drop_bad=True).dropped == 1
    summary = encode_corpus(augmented, tiny_model_dir, store, cfg, progress=False)
    assert summary.trained == 1 and summary.already_encoded == 2
    assert verify_store(store).ok
    with AdapterStore.open(store) as st:
        torch.testing.assert_close(st.get_rows(ids), before, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# the engine and the server on the real vLLM

DOCS = {d: f"Record {d}: the beacon of Tarn{d} was lit in {1800 + i} by keeper Ivo{d}." for i, d in enumerate(ALL)}
QUESTIONS = [f"When was the beacon of Tarn{d} lit?" for d in ("d0", "d2", "d3", "d5", "d6", "d8", "d9", "d11")] + \
    ["Who kept the beacons of Tarn?", "Which beacon was lit first?"]
# two questions per shard, each with its own documents, plus two that span two shards
SETS = [["d0", "d1"], ["d1", "d2"], ["d3", "d4"], ["d4", "d5"], ["d6", "d7"], ["d7", "d8"], ["d9", "d10"],
        ["d10", "d11"], ["d0", "d4"], ["d2", "d9"]]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir):
    """The intact 4-shard random store and damaged copies of it."""
    from tests.helpers.random_store import build_random_store

    root = tmp_path_factory.mktemp("faults")
    build_random_store(root / "intact", tiny_model_dir, ALL, seed=11, batch=3).close()
    out = {"intact": root / "intact"}
    for name in ("nan", "nan-valid-checksum", "missing-shard"):
        shutil.copytree(root / "intact", root / name)
        out[name] = root / name
    overwrite_row(out["nan"], "d4", NAN64)
    overwrite_row(out["nan-valid-checksum"], "d4", NAN64, fix_checksum=True)
    shard_of(out["missing-shard"], "d4").unlink()  # d3, d4, d5
    return out


def _engine(model, store_dir, llm):
    from engine.engine import Engine, EngineConfig

    return Engine(model, store=store_dir, llm=llm, documents=DOCS, config=EngineConfig(top_k=2))


@pytest.fixture(scope="module")
def intact_answers(stores, tiny_model_dir, shared_llm):
    with _engine(tiny_model_dir, stores["intact"], shared_llm) as engine:
        answers = engine.generate(QUESTIONS, mode="prag", doc_ids=SETS)
        base = engine.generate(QUESTIONS, mode="none")
    assert all(a.ok and a.output_token_ids for a in answers)
    changed = sum(a.output_token_ids != b.output_token_ids for a, b in zip(answers, base))
    assert changed >= len(QUESTIONS) // 2, f"adapters changed only {changed} answers: the test could not fail"
    return answers


@pytest.mark.parametrize("damage, bad_docs, fragment", [
    ("nan", {"d4"}, "checksum mismatch for doc id 'd4'"),
    ("nan-valid-checksum", {"d4"}, "NaN/inf values in the stored adapter for doc id 'd4'"),
    ("missing-shard", {"d3", "d4", "d5"}, "is missing"),
])
def test_engine_fails_only_questions_that_need_the_damage(stores, intact_answers, tiny_model_dir, shared_llm,
                                                          damage, bad_docs, fragment):
    with _engine(tiny_model_dir, stores[damage], shared_llm) as engine:
        answers = engine.generate(QUESTIONS, mode="prag", doc_ids=SETS)
    failed = 0
    for a, want, docs in zip(answers, intact_answers, SETS):
        touched = sorted(bad_docs & set(docs))
        if touched:
            failed += 1
            assert a.error is not None and fragment in a.error and a.output_token_ids == []
            assert all(f"'{d}'" in a.error for d in touched) and "prag store verify" in a.error
            if damage == "missing-shard":
                assert shard_of(stores["intact"], "d4").name in a.error
        else:  # batched with the damaged ones, answered exactly as from the intact store
            assert a.error is None, a.error
            assert a.output_token_ids == want.output_token_ids, f"{damage}: {a.question!r} changed"
    assert failed == 3  # d3+d4, d4+d5, d0+d4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_every_request_that_does_not_need_the_missing_shard(stores, intact_answers, tiny_model_dir,
                                                                          shared_llm):
    import openai
    import uvicorn

    from engine.http.app import ServerConfig, create_app

    engine = _engine(tiny_model_dir, stores["missing-shard"], shared_llm)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig(port=port)),
                                        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        gone = shard_of(stores["intact"], "d4").name

        def ask(i: int):
            q, docs = QUESTIONS[i % len(QUESTIONS)], SETS[i % len(SETS)]
            try:
                r = client.completions.create(model=engine.model, prompt=q, extra_body={"prag": {"doc_ids": docs}})
                return i, 200, r.choices[0].text
            except openai.APIStatusError as exc:
                return i, exc.status_code, str(exc)

        with ThreadPoolExecutor(20) as pool:  # concurrent: they share vLLM's running batch
            got = list(pool.map(ask, range(20)))
        for i, status, text in got:
            docs = SETS[i % len(SETS)]
            if {"d3", "d4", "d5"} & set(docs):
                assert status == 422 and gone in text, (i, status, text)
            else:
                assert status == 200 and text == intact_answers[i % len(SETS)].text, (i, status, text)
        assert sum(s == 200 for _, s, _ in got) == 14
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        engine.close()
