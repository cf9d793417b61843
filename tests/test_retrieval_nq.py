"""Real data: the 2,600 unique gold passages of NQ-open (``../shared/data``) as the corpus.

Built once per module with the default embedder; the questions' gold passages must be found
(recall@1 >= 0.85, recall@5 >= 0.97; the README reports 0.895 / 0.991), and hnsw / ivf with
their default settings must agree with the exact index.
"""

from __future__ import annotations

import pytest

from retrieval.embed import CachedEmbedder, Embedder
from retrieval.evaluate import overlap_at_k, recall_at_k, write_pool
from retrieval.index import IndexConfig, build_index
from retrieval.manifest import read_manifest
from retrieval.retriever import Retriever
from tests.conftest import shared_data_file


@pytest.fixture(scope="module")
def nq(tmp_path_factory):
    path = shared_data_file("nq_open_oracle.jsonl.gz")
    root = tmp_path_factory.mktemp("nq")
    qas = write_pool(path, root / "pool.jsonl")
    embedder = CachedEmbedder(Embedder())  # the hnsw / ivf builds reuse the flat build's vectors
    flat = build_index(root / "pool.jsonl", root / "flat", IndexConfig(), embedder=embedder, progress=False).out
    retriever = Retriever.load(flat, embedder=embedder)
    qvecs = retriever.encode_questions([qa.question for qa in qas])
    yield {"root": root, "qas": qas, "embedder": embedder, "flat": retriever, "qvecs": qvecs}
    retriever.close()


def test_nq_pool_recall_of_gold_passage(nq):
    r = nq["flat"]
    m = read_manifest(r.index_dir)
    assert (m.count, m.skipped_empty, m.index_type) == (2600, 0, "flat")
    assert len(nq["qas"]) == 2655
    rows = r.search_vectors(nq["qvecs"], 5)
    ids = r.store.ids_of_rows(sorted({x for h in rows for x, _ in h}))
    by_row = dict(zip(sorted({x for h in rows for x, _ in h}), ids))
    retrieved = [[by_row[x] for x, _ in h] for h in rows]
    gold = [qa.gold_id for qa in nq["qas"]]
    r1, r5 = recall_at_k(retrieved, gold, 1), recall_at_k(retrieved, gold, 5)
    print(f"NQ pool (2,600 passages, 2,655 questions): recall@1 {r1:.3f}, recall@5 {r5:.3f}")
    assert r1 >= 0.85 and r5 >= 0.97, (r1, r5)
    # the text path gives the same answer as the vector path
    (first,) = r.search([nq["qas"][0].question], k=5)
    assert [d for d, _ in first] == retrieved[0]


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_nq_approximate_indexes_match_flat(nq, index_type):
    out = build_index(nq["root"] / "pool.jsonl", nq["root"] / index_type, IndexConfig(index_type=index_type),
                      embedder=nq["embedder"], progress=False).out
    exact = [[x for x, _ in h] for h in nq["flat"].search_vectors(nq["qvecs"], 10)]
    with Retriever.load(out, embedder=nq["embedder"]) as r:
        approx = [[x for x, _ in h] for h in r.search_vectors(nq["qvecs"], 10)]
        params = r.manifest.index_params
    if index_type == "ivf":
        assert (params["nlist"], params["nprobe"]) == (66, 32)  # probes half of the lists
    recall = overlap_at_k(approx, exact, 10)
    print(f"{index_type} recall@10 relative to flat on the NQ pool: {recall:.3f}")
    assert recall >= 0.95
