"""Issue 13 faults: a corrupted index is caught, --out never deletes what the command did not create,
and nothing reaches the network unasked. Real FAISS, real embedder, real adapter store, real files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_encode import CFG, augmented_file, encoded  # noqa: F401 (shared session fixtures)
from tests.test_retrieval_index import synthetic_corpus, synthetic_questions, write_jsonl

from prag.cli import main
from prag.errors import PragError
from prag.io import sampled_blocks, sampled_sha256, sha256_file
from retrieval.index import FAISS_FILE, build_index, verify_index
from retrieval.manifest import MANIFEST_FILE, read_manifest
from retrieval.retriever import Retriever

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 800  # enough for an index.faiss over 1 MiB, so the load check samples it instead of reading it all


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its sha256: compared before and after a refused command."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", synthetic_corpus(N_DOCS))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("built") / "idx"
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--bm25", "--quiet"]) == 0
    return out


@pytest.fixture
def index_copy(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "idx")
    return tmp_path / "idx"


def _zero(path: Path, start: int, stop: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\0" * (stop - start))


# ---------------------------------------------------------------------------------------------
# 1. A corrupted FAISS index


def test_manifest_records_size_and_sha256_of_every_file(built):
    files = read_manifest(built).files
    assert {FAISS_FILE, "docs.sqlite"} <= set(files) and any(n.startswith("bm25/") for n in files)
    for name, rec in files.items():
        assert rec["size"] == (built / name).stat().st_size
        assert rec["sha256"] == sha256_file(built / name)
        assert rec["sampled_sha256"] == sampled_sha256(built / name)


def test_intact_index_verifies(built, capsys):
    assert main(["index", "verify", "--index", str(built)]) == 0
    out = capsys.readouterr().out
    assert f"verified: {len(read_manifest(built).files)} file(s)" in out and "ok   index.faiss" in out


def test_zeroed_faiss_bytes_fail_load_search_and_verify(index_copy, tmp_path, capsys):
    _zero(index_copy / FAISS_FILE, 2000, 52000)  # the damage that motivated the check: recall@1 0.98 -> 0.44, exit 0
    with pytest.raises(PragError, match=r"index file .*idx/index\.faiss is corrupted .*rebuild it with 'prag index build'"):
        Retriever.load(index_copy)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "question": q}
                                                 for i, q in enumerate(synthetic_questions(5))])
    capsys.readouterr()
    rc = main(["index", "search", "--index", str(index_copy), "--queries", str(queries), "--k", "3",
               "--out", str(tmp_path / "hits.jsonl")])
    assert rc == 2 and "index.faiss is corrupted" in capsys.readouterr().err
    assert not (tmp_path / "hits.jsonl").exists()
    rc = main(["index", "verify", "--index", str(index_copy)])
    cap = capsys.readouterr()
    assert rc == 2
    assert "BAD  index.faiss" in cap.out and "1 of " in cap.out and "ok   docs.sqlite" in cap.out
    assert "index.faiss is corrupted (sha256 differs from the manifest)" in cap.err


def test_load_check_is_sampled_and_verify_is_full(index_copy):
    """The load check reads only the sampled blocks: damage between them passes it, the full verify does not."""
    faiss_path = index_copy / FAISS_FILE
    size = faiss_path.stat().st_size
    blocks = sampled_blocks(size)
    assert size > 1 << 20 and len(blocks) == 16 and sum(n for _, n in blocks) == 1 << 20 < size
    gap_start = blocks[3][0] + blocks[3][1]  # between two sampled blocks
    assert blocks[4][0] - gap_start >= 4096
    _zero(faiss_path, gap_start, gap_start + 4096)
    with Retriever.load(index_copy) as r:  # cheap check: not seen (by design: ~1 MiB read per file)
        assert len(r) == N_DOCS
    report = verify_index(index_copy)
    assert [c.name for c in report.bad] == [FAISS_FILE]
    # a size change is caught at load whatever the offset
    with open(index_copy / "docs.sqlite", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PragError, match=r"docs\.sqlite is corrupted \(size .* the manifest records"):
        Retriever.load(index_copy)


def test_index_without_checksums_loads_with_a_note(index_copy, capsys):
    manifest = json.loads((index_copy / MANIFEST_FILE).read_text())
    del manifest["files"]  # as written before this change
    (index_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    capsys.readouterr()
    with Retriever.load(index_copy) as r:
        assert len(r) == N_DOCS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be verified" in err
    assert main(["index", "verify", "--index", str(index_copy)]) == 2
    assert "cannot be verified; rebuild it" in capsys.readouterr().err


def test_store_fingerprint_sampler_is_the_shared_one():
    from prag.store import _sampled_sha256

    assert _sampled_sha256 is sampled_sha256


# ---------------------------------------------------------------------------------------------
# 2. Commands never delete what they did not create


@pytest.fixture
def store_copy(encoded, tmp_path) -> Path:
    store, _ = encoded
    parent = tmp_path / "work"
    shutil.copytree(store, parent / "store")
    (parent / "notes.txt").write_text("mine")
    return parent / "store"


def test_export_adapter_never_deletes_the_store_or_its_parent(store_copy, capsys):
    parent = store_copy.parent
    before = _tree(parent)
    for out, says in ((store_copy, "is the input"), (parent, "contains the input"),
                      (store_copy / "shards", "is inside the input")):
        rc = main(["export-adapter", "--store", str(store_copy), "--doc-id", "brenn", "--out", str(out),
                   "--overwrite"])
        assert rc == 2 and says in capsys.readouterr().err
    assert _tree(parent) == before


def test_export_adapter_overwrite_only_replaces_a_previous_export(store_copy, tmp_path, capsys):
    out = tmp_path / "brenn"
    assert main(["export-adapter", "--store", str(store_copy), "--doc-id", "brenn", "--out", str(out)]) == 0
    first = _tree(out)
    assert main(["export-adapter", "--store", str(store_copy), "--doc-id", "brenn", "--out", str(out)]) == 2
    assert "already holds an exported adapter" in capsys.readouterr().err and _tree(out) == first
    assert main(["export-adapter", "--store", str(store_copy), "--doc-id", "elsa", "--out", str(out),
                 "--overwrite"]) == 0
    assert _tree(out).keys() == first.keys() and _tree(out) != first  # replaced by the other document
    (out / "README.md").write_text("my notes")  # now a user's folder, not a pure export
    before = _tree(out)
    assert main(["export-adapter", "--store", str(store_copy), "--doc-id", "brenn", "--out", str(out),
                 "--overwrite"]) == 2
    assert "not an exported adapter" in capsys.readouterr().err and _tree(out) == before


def test_fixture_model_keeps_user_files_and_overwrites_only_its_own(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("do not delete")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    for out in (user, a_file):
        for extra in ([], ["--overwrite"]):
            assert main(["fixture-model", "--out", str(out), *extra]) == 2
            assert str(out) in capsys.readouterr().err
    assert (user / "thesis.txt").read_text() == "do not delete" and a_file.read_text() == "keep"

    model = tmp_path / "model"
    assert main(["fixture-model", "--out", str(model)]) == 0
    first = _tree(model)
    assert main(["fixture-model", "--out", str(model), "--seed", "1"]) == 2
    assert "already holds a fixture model" in capsys.readouterr().err and _tree(model) == first
    assert main(["fixture-model", "--out", str(model), "--seed", "1", "--overwrite"]) == 0
    assert json.loads((model / "fixture.json").read_text())["seed"] == 1 and _tree(model) != first


def test_index_build_out_rules(corpus, built, store_copy, tmp_path, capsys):
    out = tmp_path / "idx"
    shutil.copytree(built, out)
    before = _tree(out)
    args = ["index", "build", "--corpus", str(corpus), "--quiet"]
    assert main([*args, "--out", str(out)]) == 2
    assert "already holds an index from a previous 'prag index build'; pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == before
    # an adapter store also has a manifest.json: it is not an index, even with --overwrite
    store_before = _tree(store_copy)
    assert main([*args, "--out", str(store_copy), "--overwrite"]) == 2
    assert "is a non-empty directory that is not an index" in capsys.readouterr().err
    assert _tree(store_copy) == store_before
    assert main([*args, "--out", str(corpus.parent), "--overwrite"]) == 2  # holds the corpus
    assert "contains the input" in capsys.readouterr().err and corpus.exists()
    small = write_jsonl(tmp_path / "small.jsonl", synthetic_corpus(20))
    assert main(["index", "build", "--corpus", str(small), "--quiet", "--out", str(out), "--overwrite"]) == 0
    assert read_manifest(out).count == 20


def test_failed_index_build_leaves_nothing(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": "a", "text": " "}])
    with pytest.raises(PragError, match="no non-empty documents"):
        build_index(empty, tmp_path / "new" / "deeper" / "idx", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]  # not even the parents it created
    (tmp_path / "existing").mkdir()
    with pytest.raises(PragError, match="no non-empty documents"):
        build_index(empty, tmp_path / "existing", progress=False)
    assert (tmp_path / "existing").is_dir() and not any((tmp_path / "existing").iterdir())  # kept, as it was


def test_failed_encode_leaves_nothing(tmp_path, tiny_model_dir, augmented_file):
    from offline_encode.encode import encode_corpus

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"doc_id": "x", "passage": "p", "qa": [], "error": "failed"},
                                               {"doc_id": "y", "qa": []}])
    with pytest.raises(PragError, match=r"bad\.jsonl: no trainable records \(2 read; skipped: .*no adapter store"):
        encode_corpus(bad, tiny_model_dir, tmp_path / "a" / "store", CFG, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    with pytest.raises(PragError, match=r"model not found: no-such/model .*hf download no-such/model"):
        encode_corpus(augmented_file, "no-such/model", tmp_path / "store", CFG, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PragError, match="model not found"):
        encode_corpus(augmented_file, tmp_path / "missing-model", tmp_path / "empty", CFG, progress=False)
    assert (tmp_path / "empty").is_dir()  # it existed before: never removed
    user = tmp_path / "mine"
    user.mkdir()
    (user / "a.txt").write_text("keep")
    with pytest.raises(PragError, match="not an adapter store"):
        encode_corpus(augmented_file, tiny_model_dir, user, CFG, progress=False)
    with pytest.raises(PragError, match="is the input"):
        encode_corpus(augmented_file, tiny_model_dir, tiny_model_dir, CFG, progress=False)
    assert (user / "a.txt").read_text() == "keep" and (tiny_model_dir / "config.json").exists()


def test_eval_out_refuses_foreign_folders_and_inputs(store_copy, built, tmp_path):
    from engine.eval.harness import EvalConfig, check_inputs

    data = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "question": "Who?", "answer": "x"}])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "a.txt").write_text("keep")
    for out, says in ((user, "not an evaluation run"), (store_copy.parent, "contains the input"),
                      (built, "is the input")):
        cfg = EvalConfig(dataset="generic", data=str(data), out=str(out), model="m", index=str(built),
                         store=str(store_copy), modes=["none", "prag"])
        with pytest.raises(PragError, match=says):
            check_inputs(cfg)
    assert (user / "a.txt").read_text() == "keep"
    cfg = EvalConfig(dataset="generic", data=str(data), out=str(tmp_path / "run"), model="m", modes=["none"])
    check_inputs(cfg)  # a new folder is fine


def test_search_out_never_replaces_its_queries(built, tmp_path, capsys):
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "question": "Which museum?"}])
    before = queries.read_text()
    rc = main(["index", "search", "--index", str(built), "--queries", str(queries), "--k", "2", "--out", str(queries)])
    assert rc == 2 and "is the input" in capsys.readouterr().err and queries.read_text() == before


# ---------------------------------------------------------------------------------------------
# 3. Nothing reaches the network unasked


def test_unknown_embedder_fails_at_once_without_network(corpus, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "prag.cli", "index", "build", "--corpus", str(corpus),
                            "--embedder", "no-such/embedder", "--out", str(tmp_path / "idx"), "--quiet"],
                           env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("index build with an unknown embedder hung (it tried the network)")
    seconds = time.perf_counter() - start
    assert r.returncode == 2, r.stderr
    assert "embedder not found: no-such/embedder" in r.stderr
    assert "hf download no-such/embedder" in r.stderr and "--allow-download" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "idx").exists()
    assert seconds < 10, f"took {seconds:.1f} s"


def test_allow_download_still_respects_hf_hub_offline(monkeypatch):
    from retrieval.embed import Embedder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PragError, match="HF_HUB_OFFLINE=1 forbids downloads"):
        Embedder("no-such/embedder", allow_download=True)


def test_augment_out_never_replaces_its_corpus(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "Ada Lovelace was born in London in 1815."}')  # no final newline
    before = corpus.read_text()
    rc = main(["augment", "--corpus", str(corpus), "--augmenter", "rule", "--out", str(corpus), "--no-progress"])
    assert rc == 2 and "is the input" in capsys.readouterr().err and corpus.read_text() == before
