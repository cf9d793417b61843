"""Index build / load / search with real FAISS and the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prag.errors import PragError
from retrieval.corpus import Document
from retrieval.embed import DEFAULT_EMBEDDER, CachedEmbedder, Embedder, packaged_model_dir, passage_text
from retrieval.fusion import reciprocal_rank_fusion
from retrieval.index import BUILDING_FILE, FAISS_FILE, IndexConfig, build_index, ivf_nlist
from retrieval.manifest import MANIFEST_FILE, Manifest, read_manifest, write_manifest
from retrieval.retriever import HYBRID_DEPTH, Retriever

REPO = Path(__file__).resolve().parents[1]

_NAMES = ["Orvale", "Brintek", "Castamir", "Dunhollow", "Elsper", "Fennick", "Garrow", "Hesketh", "Ilmare", "Jorvik",
          "Kestrel", "Lammas", "Morrow", "Nettle", "Oakhurst", "Pellam", "Quillon", "Rowan", "Sablewood", "Thimble"]
_KINDS = ["museum", "bridge", "library", "brewery", "observatory", "lighthouse", "monastery", "bakery", "theatre",
          "harbour", "university", "orchard", "railway station", "castle", "market"]
_PLACES = ["Norway", "Peru", "Kenya", "Japan", "Chile", "Ireland", "Morocco", "Canada", "Vietnam", "Portugal",
           "Iceland", "Egypt", "Nepal", "Brazil", "Finland"]
_FAMOUS = ["stained glass windows", "rare manuscripts", "copper roof", "annual music festival", "sourdough bread",
           "telescope", "spiral staircase", "cherry trees", "steam engines", "underground tunnels", "silver bells",
           "marble statues", "herb garden", "wooden carvings", "night markets"]


def synthetic_corpus(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        name, kind, place, famous = (rng.choice(_NAMES), rng.choice(_KINDS), rng.choice(_PLACES), rng.choice(_FAMOUS))
        year = rng.randint(1200, 2000)
        docs.append({"id": f"doc-{i:04d}", "title": f"{name} {kind}",
                     "text": f"The {name} {kind} is in {place}. It opened in {year} and is known for its {famous}."})
    return docs


def synthetic_questions(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"Which {rng.choice(_KINDS)} in {rng.choice(_PLACES)} is famous for its {rng.choice(_FAMOUS)}?"
            for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """The real model; cached so the many small builds below embed each text once."""
    return CachedEmbedder(Embedder())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """12 documents, one with an empty text, and a made-up keyword only BM25 can match exactly."""
    docs = synthetic_corpus(10)
    docs.append({"id": "empty", "title": "Nothing", "text": "   "})
    docs.append({"id": "zorb", "title": "Note", "text": "The zorblaxian protocol governs quarterly audits."})
    return write_jsonl(tmp_path_factory.mktemp("small") / "corpus.jsonl", docs)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, small, embedder) -> Path:
    out = tmp_path_factory.mktemp("idx") / "small"
    build_index(small, out, IndexConfig(bm25=True), embedder=embedder, progress=False)
    return out


# ---------------------------------------------------------------------------------------- embedder


def test_default_embedder_is_packaged_and_normalised(embedder):
    assert embedder.name == DEFAULT_EMBEDDER and embedder.dim == 384
    vecs = embedder.encode(["hello world", "a second, longer sentence about FAISS indexes"])
    assert vecs.dtype == np.float32 and vecs.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_embedder_aliases():
    from retrieval.embed import canonical_embedder_name

    for alias in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", str(packaged_model_dir()), None):
        assert canonical_embedder_name(alias) == DEFAULT_EMBEDDER


def test_unknown_embedder_is_a_clear_error():
    with pytest.raises(PragError, match=r"embedder not found: no-such/model-anywhere .*hf download"):
        Embedder("no-such/model-anywhere")


# ---------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_validation(tmp_path):
    m = Manifest(embedder=DEFAULT_EMBEDDER, dim=384, index_type="ivf", count=10, corpus_sha256="ab" * 32,
                 skipped_empty=2, index_params={"nlist": 4, "nprobe": 2}, bm25=True)
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert data["version"] == 1 and data["metric"] == "inner_product" and data["skipped_empty"] == 2

    del data["dim"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PragError, match=r"incomplete manifest, missing field 'dim'"):
        read_manifest(tmp_path)
    data["dim"], data["version"] = 384, 99
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PragError, match=r"format version 99 is newer"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"embedder": "x", "dim": ')
    with pytest.raises(PragError, match=r"manifest\.json:1: malformed JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(PragError, match=r"not a complete index: manifest\.json is missing"):
        read_manifest(tmp_path)


def test_index_manifest_contents(small_index, small):
    m = read_manifest(small_index)
    from prag.io import sha256_file

    assert (m.embedder, m.dim, m.metric, m.index_type, m.count, m.skipped_empty, m.bm25) == \
        (DEFAULT_EMBEDDER, 384, "inner_product", "flat", 11, 1, True)
    assert m.corpus_sha256 == sha256_file(small)
    assert sorted(p.name for p in small_index.iterdir()) == ["bm25", "docs.sqlite", FAISS_FILE, MANIFEST_FILE]


# ---------------------------------------------------------------------------------------- save / load / search


def test_round_trip_matches_brute_force(small_index, small, embedder):
    docs = [json.loads(line) for line in small.read_text().splitlines()]
    docs = [d for d in docs if d["text"].strip()]
    passages = embedder.encode([passage_text(d["title"], d["text"]) for d in docs])
    questions = synthetic_questions(6) + ["zorblaxian audits"]
    q = embedder.encode(questions)
    expect = np.argsort(-(q @ passages.T), axis=1, kind="stable")[:, :3]

    with Retriever.load(small_index, embedder=embedder) as r:
        assert len(r) == 11
        hits = r.search(questions, k=3)
        assert [[d for d, _ in h] for h in hits] == [[docs[i]["id"] for i in row] for row in expect]
        for h, qv in zip(hits, q):
            ids = [d for d, _ in h]
            fetched = r.fetch(ids)
            assert [f.id for f in fetched] == ids
            got = embedder.encode([passage_text(f.title, f.text) for f in fetched]) @ qv
            np.testing.assert_allclose([s for _, s in h], got, atol=1e-4)
        # fetch returns the stored title/text in the order asked, and rows line up with ids
        assert r.fetch(["zorb", "doc-0000"]) == [
            Document(id="zorb", title="Note", text="The zorblaxian protocol governs quarterly audits."),
            Document(id="doc-0000", title=docs[0]["title"], text=docs[0]["text"])]
        assert [d.id for d in r.fetch_rows([10, 0])] == ["zorb", "doc-0000"]
        with pytest.raises(PragError, match=r"unknown document id\(s\).*'nope'"):
            r.fetch(["doc-0001", "nope"])
        with pytest.raises(PragError, match=r"unknown document id\(s\).*'empty'"):
            r.fetch(["empty"])  # skipped at build time


def test_k_must_be_positive(small_index, embedder):
    with Retriever.load(small_index, embedder=embedder) as r:
        for k in (0, -3):
            with pytest.raises(PragError, match=rf"k must be a positive integer, got k={k}"):
                r.search(["anything"], k=k)
        with pytest.raises(PragError, match=r"method must be one of dense, bm25, hybrid"):
            r.search(["anything"], k=1, method="sparse")


@pytest.mark.parametrize("method", ["dense", "bm25", "hybrid"])
def test_k_larger_than_corpus_returns_what_exists(small_index, embedder, method):
    with Retriever.load(small_index, embedder=embedder) as r:
        (hits,) = r.search(["The museum known for its rare manuscripts and zorblaxian audits"], k=50, method=method)
    ids = [d for d, _ in hits]
    if method == "bm25":  # BM25 only returns passages sharing a word with the question
        assert 0 < len(ids) <= 11
    else:
        assert len(ids) == 11
    assert len(set(ids)) == len(ids) and "empty" not in ids
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)


def test_bm25_and_hybrid(small_index, embedder):
    with Retriever.load(small_index, embedder=embedder) as r:
        question = "zorblaxian"
        (bm25,) = r.search([question], k=5, method="bm25")
        assert [d for d, _ in bm25] == ["zorb"] and bm25[0][1] > 0  # the only passage with the word
        (unknown,) = r.search(["qwxyzzy"], k=5, method="bm25")
        assert unknown == []  # no shared word: no BM25 hit at all
        questions = ["zorblaxian quarterly audits", synthetic_questions(1)[0]]
        hybrid = r.search(questions, k=4, method="hybrid")
        dense_rows = r.search_rows(questions, k=HYBRID_DEPTH, method="dense")
        bm25_rows = r.search_rows(questions, k=HYBRID_DEPTH, method="bm25")
        for got, d, b in zip(hybrid, dense_rows, bm25_rows):
            fused = reciprocal_rank_fusion([[x for x, _ in d], [x for x, _ in b]], 4)
            ids = [doc.id for doc in r.fetch_rows([row for row, _ in fused])]
            assert [g for g, _ in got] == ids
            np.testing.assert_allclose([s for _, s in got], [s for _, s in fused])
        assert hybrid[0][0][0] == "zorb"


def test_rrf_maths():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], k=3, rrf_k=60)
    assert [x for x, _ in fused] == ["a", "c", "b"]
    np.testing.assert_allclose([s for _, s in fused], [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62])
    assert reciprocal_rank_fusion([["x", "y"], []], k=1) == [("x", 1 / 61)]


def test_bm25_needs_bm25_index(tmp_path, small, embedder):
    out = tmp_path / "nobm25"
    build_index(small, out, IndexConfig(), embedder=embedder, progress=False)
    with Retriever.load(out, embedder=embedder) as r:
        with pytest.raises(PragError, match=r"has no BM25 index; rebuild it with --bm25"):
            r.search(["x"], k=1, method="hybrid")


# ---------------------------------------------------------------------------------------- index types


@pytest.fixture(scope="module")
def typed_indexes(tmp_path_factory, embedder):
    """flat / hnsw / ivf / ivfpq over one corpus (the cached embedder embeds it once for all four)."""
    corpus = write_jsonl(tmp_path_factory.mktemp("typed") / "corpus.jsonl", synthetic_corpus(300))
    root = tmp_path_factory.mktemp("typed-idx")
    cfgs = {"flat": IndexConfig(), "hnsw": IndexConfig(index_type="hnsw"),
            "ivf": IndexConfig(index_type="ivf", chunk_size=128), "ivfpq": IndexConfig(index_type="ivfpq", chunk_size=128)}
    return {name: build_index(corpus, root / name, cfg, embedder=embedder, progress=False).out
            for name, cfg in cfgs.items()}


def test_hnsw_and_ivf_recall_vs_flat(typed_indexes, embedder):
    """Default settings. (The NQ test checks the same on real text, where IVF probes a fraction of its lists.)"""
    q = embedder.encode(synthetic_questions(60))
    results = {}
    for name, path in typed_indexes.items():
        with Retriever.load(path, embedder=embedder) as r:
            results[name] = [[row for row, _ in h] for h in r.search_vectors(q, 10)]
    m = read_manifest(typed_indexes["ivf"])
    assert (m.index_type, m.count, m.index_params["nlist"], m.index_params["nprobe"]) == ("ivf", 300, 7, 7)
    assert read_manifest(typed_indexes["hnsw"]).index_params == {"M": 32, "ef_construction": 200, "ef_search": 128}
    for name in ("hnsw", "ivf"):
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(results[name], results["flat"])])
        assert recall >= 0.95, f"{name} recall@10 vs flat = {recall:.3f}"


def test_ivf_k_beyond_probed_lists_has_no_missing_ids(typed_indexes, embedder):
    with Retriever.load(typed_indexes["ivf"], embedder=embedder, nprobe=1) as r:
        (hits,) = r.search(["Which museum in Peru?"], k=300)
    assert 0 < len(hits) < 300  # one probed list holds only part of the corpus; no -1 placeholders
    assert all(d.startswith("doc-") for d, _ in hits)


def test_ivf_nprobe_rules():
    from retrieval.index import ivf_nprobe

    assert (ivf_nprobe(66, None), ivf_nprobe(7, None), ivf_nprobe(4000, None), ivf_nprobe(66, 8)) == (32, 7, 250, 8)


def test_ivf_nlist_rules():
    assert ivf_nlist(2600, None) == 66  # 4*sqrt(2600)=204, capped at 2600/39
    assert ivf_nlist(1_000_000, None) == 4000
    assert ivf_nlist(10, None) == 1
    with pytest.raises(PragError, match=r"nlist=50 needs at least 50 training passages"):
        ivf_nlist(20, 50)


def test_ivf_trains_on_a_sample(tmp_path, embedder):
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_corpus(120))  # the same texts as typed_indexes' first 120
    out = build_index(corpus, tmp_path / "ivf", IndexConfig(index_type="ivf", train_size=80, nprobe=2, chunk_size=32),
                      embedder=embedder, progress=False).out
    m = read_manifest(out)
    assert (m.count, m.index_params["train_size"], m.index_params["nlist"]) == (120, 80, 2)
    with Retriever.load(out, embedder=embedder) as r:
        assert len(r.search(["Which castle is in Chile?"], k=5)[0]) == 5


def test_ivfpq_builds_searches_reloads_and_verifies(typed_indexes, embedder):
    import faiss

    from retrieval.index import check_verified, verify_index

    path = typed_indexes["ivfpq"]
    m = read_manifest(path)
    assert (m.index_type, m.count, m.dim) == ("ivfpq", 300, 384)
    assert m.index_params == {"nlist": 7, "nprobe": 7, "train_size": 300, "pq_m": 48, "pq_bits": 8,
                              "factory": "IVF7,PQ48x8"}  # 300 passages: 7 lists (39 per list), 384/8 sub-quantizers
    index = faiss.read_index(str(path / FAISS_FILE))
    assert (type(index).__name__, index.code_size, index.pq.M, index.pq.nbits) == ("IndexIVFPQ", 48, 48, 8)
    check_verified(verify_index(path))
    q = embedder.encode(synthetic_questions(60))
    with Retriever.load(typed_indexes["flat"], embedder=embedder) as r:
        exact = [[row for row, _ in h] for h in r.search_vectors(q, 10)]
    with Retriever.load(path, embedder=embedder) as r:
        assert r.index.nprobe == 7
        hits = r.search_vectors(q, 10)
        approx = [[row for row, _ in h] for h in hits]
        (text_hits,) = r.search(["Which museum in Peru is famous for its rare manuscripts?"], k=3)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert 0.5 <= recall < 1.0, f"ivfpq recall@10 vs flat = {recall:.3f}"  # compressed: close, not exact
    assert all(len(h) == 10 for h in hits) and all(d.startswith("doc-") for d, _ in text_hits)
    with Retriever.load(path, embedder=embedder, nprobe=1) as r:  # the stored nprobe can be overridden
        assert r.index.nprobe == 1
        narrow = [[row for row, _ in h] for h in r.search_vectors(q, 10)]
    assert narrow != approx


def test_ivfpq_on_a_small_corpus_lowers_nlist_and_bits_and_says_so(tmp_path, embedder, caplog):
    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_corpus(120))
    with caplog.at_level("INFO", logger="retrieval"):
        out = build_index(corpus, tmp_path / "pq", IndexConfig(index_type="ivfpq", pq_m=16), embedder=embedder,
                          progress=False).out
    p = read_manifest(out).index_params
    assert (p["nlist"], p["pq_m"], p["pq_bits"], p["factory"]) == (3, 16, 6, "IVF3,PQ16x6")  # 2**6 = 64 <= 120
    said = caplog.text
    assert "ivfpq: 3 lists (not 4*sqrt(N) = 44: 120 training passages give at least 39 per list)" in said
    assert "ivfpq: 6-bit codes (not 8: 120 training passages cannot train 256 centroids" in said
    with Retriever.load(out, embedder=embedder) as r:
        assert len(r.search(["Which castle is in Chile?"], k=5)[0]) == 5


@pytest.mark.parametrize("flags,message", [
    (["--pq-m", "50"], r"--pq-m 50 must divide the embedding dimension 384 \(e\.g\. 4, 6, 8, 12, 16"),
    (["--pq-bits", "8", "--train-size", "100"], r"--pq-bits 8 means 256 centroids per sub-quantizer, which needs at "
                                                r"least that many training passages; only 100 are available \(lower "
                                                r"--pq-bits to 6 or less, or raise --train-size\)"),
    (["--pq-bits", "17"], r"pq_bits \(--pq-bits\) must be an integer from 1 to 16, got 17"),
    (["--pq-m", "0"], r"pq_m \(--pq-m\) must be a positive integer, got 0"),
    (["--nlist", "500"], r"nlist=500 needs at least 500 training passages; only 300 are available \(lower --nlist\)"),
])
def test_ivfpq_bad_parameters_name_the_flag(tmp_path, flags, message, capsys):
    from prag.cli import main

    corpus = write_jsonl(tmp_path / "c.jsonl", synthetic_corpus(300))
    out = tmp_path / "pq"
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--index-type", "ivfpq", "--quiet",
                 *flags]) == 2
    import re

    assert re.search(message, capsys.readouterr().err), message
    assert not out.exists() and not list(tmp_path.glob(".pq*"))  # nothing left behind


# ---------------------------------------------------------------------------------------- bad input


def test_wrong_embedder_at_load(small_index, embedder):
    with pytest.raises(PragError, match=r"built with embedder 'sentence-transformers/all-MiniLM-L6-v2', but "
                                        r"embedder 'sentence-transformers/paraphrase-MiniLM-L3-v2' was requested"):
        Retriever.load(small_index, embedder="sentence-transformers/paraphrase-MiniLM-L3-v2")
    for alias in ("all-MiniLM-L6-v2", str(packaged_model_dir())):  # aliases of the same model are fine
        Retriever.load(small_index, embedder=alias).close()


def test_missing_corpus_leaves_nothing(tmp_path, embedder):
    with pytest.raises(PragError, match=r"corpus file not found: .*missing\.jsonl"):
        build_index(tmp_path / "missing.jsonl", tmp_path / "idx", embedder=embedder, progress=False)
    assert sorted(os.listdir(tmp_path)) == []


def test_bad_corpus_line_fails_without_partial_index(tmp_path, embedder):
    docs = synthetic_corpus(30)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs[:20]) + '{"id": "x", "text": \n')
    with pytest.raises(PragError, match=r"c\.jsonl:21: malformed JSON"):
        build_index(path, tmp_path / "idx", embedder=embedder, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_duplicate_id_mid_corpus_keeps_previous_index(tmp_path, small, embedder):
    out = tmp_path / "idx"
    build_index(small, out, embedder=embedder, progress=False)
    before = read_manifest(out)
    docs = synthetic_corpus(30) + [{"id": "doc-0007", "title": "again", "text": "duplicate"}]
    bad = write_jsonl(tmp_path / "dup.jsonl", docs)
    for chunk_size in (8, 4096):  # the first copy in an earlier chunk (found in SQLite) or in the same chunk
        with pytest.raises(PragError, match=r"dup\.jsonl:31: duplicate document id 'doc-0007'"):
            build_index(bad, out, IndexConfig(chunk_size=chunk_size), embedder=embedder, progress=False,
                        overwrite=True)
    assert read_manifest(out) == before  # the old index is untouched and still loads
    with Retriever.load(out, embedder=embedder) as r:
        assert len(r) == 11
    assert sorted(os.listdir(tmp_path)) == ["dup.jsonl", "idx"]  # no temporary leftovers


def test_all_empty_corpus(tmp_path, embedder):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": ""}, {"id": "b", "text": " "}])
    with pytest.raises(PragError, match=r"no non-empty documents to index \(2 empty texts skipped\)"):
        build_index(path, tmp_path / "idx", embedder=embedder, progress=False)
    assert not (tmp_path / "idx").exists()


def test_refuses_to_overwrite_a_non_index_directory(tmp_path, small, embedder):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.txt").write_text("do not delete")
    with pytest.raises(PragError, match=r"not an index; refusing to overwrite"):
        build_index(small, target, embedder=embedder, progress=False)
    assert (target / "thesis.txt").read_text() == "do not delete"


def test_incomplete_index_is_refused(tmp_path, small_index):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_index, broken)
    (broken / FAISS_FILE).unlink()
    with pytest.raises(PragError, match=r"not a complete index: index\.faiss is missing"):
        Retriever.load(broken)
    shutil.copytree(small_index, tmp_path / "nomanifest")
    (tmp_path / "nomanifest" / MANIFEST_FILE).unlink()
    with pytest.raises(PragError, match=r"not a complete index: manifest\.json is missing"):
        Retriever.load(tmp_path / "nomanifest")


def test_killed_build_leaves_no_index_and_next_build_is_clean(tmp_path, small, embedder):
    """SIGKILL a real `prag index build` while it embeds; nothing usable appears, the next build cleans up."""
    corpus = write_jsonl(tmp_path / "big.jsonl", synthetic_corpus(3000, seed=5))
    out = tmp_path / "idx"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "prag.cli", "index", "build", "--corpus", str(corpus),
                             "--out", str(out), "--chunk-size", "64", "--batch-size", "16", "--quiet"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            tmps = list(tmp_path.glob(".idx.*.tmp"))
            # the doc store is complete once the embedding pass starts reading it back
            if tmps and (tmps[0] / BUILDING_FILE).exists() and (tmps[0] / "docs.sqlite").exists():
                time.sleep(1.0)
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"build finished before it could be killed: {proc.stdout.read()!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".idx.*.tmp"))
    assert len(leftovers) == 1 and not (leftovers[0] / MANIFEST_FILE).exists()
    with pytest.raises(PragError, match=r"index directory not found"):
        Retriever.load(out)

    build_index(small, out, embedder=embedder, progress=False)
    assert list(tmp_path.glob(".idx.*.tmp")) == []  # the dead build's directory was removed
    with Retriever.load(out, embedder=embedder) as r:
        assert len(r) == 11


@pytest.mark.parametrize("k1,b", [(1.2, 0.75), (0.9, 0.4)])
def test_bm25_scores_are_lucenes_with_elasticsearchs_defaults(tmp_path, embedder, k1, b):
    """The paper retrieved with Elasticsearch: Lucene's BM25, k1=1.2, b=0.75 unless told otherwise."""
    import math

    from bm25s.tokenization import Tokenizer

    docs = [{"id": "a", "title": "", "text": "glass glass works in the old town of Esterhalm"},
            {"id": "b", "title": "", "text": "the river Ulna flows past Esterhalm and the glass works"},
            {"id": "c", "title": "", "text": "a mill on the river"},
            {"id": "d", "title": "", "text": "bread and salt"}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    cfg = IndexConfig(bm25=True) if (k1, b) == (1.2, 0.75) else IndexConfig(bm25=True, bm25_k1=k1, bm25_b=b)
    out = build_index(corpus, tmp_path / "idx", cfg, embedder=embedder, progress=False).out
    assert read_manifest(out).index_params["bm25_k1"] == k1 and read_manifest(out).index_params["bm25_b"] == b
    tok = Tokenizer(stopwords="en")
    tokens = [tok.tokenize([passage_text(d["title"], d["text"])], return_as="tuple", update_vocab=True,
                           show_progress=False).ids[0] for d in docs]
    vocab = tok.get_vocab_dict()
    inv = {i: w for w, i in vocab.items()}
    words = [[inv[i] for i in t] for t in tokens]
    avgdl = sum(map(len, words)) / len(words)

    def expected(query: list[str], doc: list[str]) -> float:
        score = 0.0
        for w in set(query):
            df = sum(w in d for d in words)
            tf = doc.count(w)
            if tf:
                idf = math.log(1 + (len(words) - df + 0.5) / (df + 0.5))
                score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        return score

    with Retriever.load(out) as r:
        hits = r.search(["glass river Esterhalm"], 4, method="bm25")[0]
    want = sorted(((d["id"], expected(["glass", "river", "esterhalm"], w)) for d, w in zip(docs, words)),
                  key=lambda x: -x[1])
    want = [(d, s) for d, s in want if s > 0]
    assert [d for d, _ in hits] == [d for d, _ in want]
    np.testing.assert_allclose([s for _, s in hits], [s for _, s in want], rtol=1e-5)
    with pytest.raises(PragError, match="--bm25-b"):
        IndexConfig(bm25=True, bm25_b=1.5).validate()
