"""``prag index build --ray-address``: the corpus embedded by a Ray Data actor pool gives the index the
single-process build gives (same doc store, same vectors, same top-k), on a local 2-CPU cluster."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from prag.cli import main
from prag.errors import PragError
from retrieval.build_ray import RayIndexOptions, ShardEmbedder, plan_embed_actors
from retrieval.docstore import DOCSTORE_FILE, DocStore
from retrieval.evaluate import pool_oracle_passages
from retrieval.index import FAISS_FILE, IndexConfig
from retrieval.manifest import read_manifest
from retrieval.retriever import Retriever
from tests.conftest import shared_data_file

N_PASSAGES = 240  # the first 240 NQ gold passages and the questions they answer (about as many)
K = 10


def _vectors(index_dir: Path) -> np.ndarray:
    """Every stored vector by FAISS id (flat stores them as they are; IVF-Flat too, in its lists)."""
    import faiss

    index = faiss.read_index(str(index_dir / FAISS_FILE))
    if hasattr(index, "make_direct_map"):
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def _same_ranking(a: list[tuple[str, float]], b: list[tuple[str, float]], tol: float = 1e-5) -> bool:
    """The same scores, and the same ids in the same order, except that ids whose scores tie within ``tol``
    may swap (float noise from other batch shapes cannot decide a tie)."""
    if len(a) != len(b):
        return False
    for (da, sa), (db, sb) in zip(a, b):
        if abs(sa - sb) > tol or (da != db and not any(d == db and abs(s - sa) <= tol for d, s in a)):
            return False
    return True


# ---------------------------------------------------------------------------------------- planning and errors


def test_plan_embed_actors():
    plan = lambda res, **kw: plan_embed_actors(RayIndexOptions(address="local", **kw), res)
    assert plan({"CPU": 16}) == (4, 4, 0)                          # one actor per 4 CPUs
    assert plan({"CPU": 2}, embed_actors=2) == (2, 1, 0)           # split the CPUs two ways
    assert plan({"CPU": 8, "GPU": 4}) == (4, 1, 1)                 # one per GPU
    assert plan({"CPU": 8, "GPU": 4}, gpus_per_actor=0.5) == (8, 1, 0.5)
    assert plan({"CPU": 8, "GPU": 4}, gpus_per_actor=0) == (2, 4, 0)  # CPU actors on a GPU cluster
    assert plan({"CPU": 2}, embed_actors=6, gpus_per_actor=1) == (6, 1, 1)  # autoscaler will add the GPUs
    with pytest.raises(PragError, match=r"--ray-gpus-per-actor 1: the cluster has 0 GPU\(s\); pass "
                                        r"--ray-embed-actors N"):
        plan({"CPU": 2}, gpus_per_actor=1)
    with pytest.raises(PragError, match=r"--ray-embed-actors 3: the cluster's 2 CPU\(s\) hold only 2"):
        plan({"CPU": 2}, embed_actors=3)


@pytest.mark.parametrize("field,value,flag", [("embed_actors", 0, "--ray-embed-actors"),
                                              ("gpus_per_actor", -1.0, "--ray-gpus-per-actor"),
                                              ("num_cpus", 0, "--ray-num-cpus"), ("address", " ", "--ray-address")])
def test_bad_ray_options_name_the_flag(field, value, flag):
    opts = {"address": "local", field: value}
    with pytest.raises(PragError, match=flag):
        RayIndexOptions(**opts).validate()


def test_an_actor_that_cannot_see_the_doc_store_says_why(tmp_path):
    """A multi-node cluster without shared storage: the actor's error names the rule, not a SQLite failure."""
    with pytest.raises(PragError, match=r"not visible on node .*--out must be on a filesystem every node mounts"):
        ShardEmbedder(str(tmp_path / "elsewhere" / DOCSTORE_FILE), "all-MiniLM-L6-v2", "cpu", 8, False)


def test_an_actors_prag_error_reaches_the_user_unwrapped():
    from retrieval.build_ray import _user_error

    class RayTaskError(Exception):  # Ray keeps the actor's exception as .cause; Ray Data chains it
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    ours = PragError("the doc store is not visible")
    try:
        raise RuntimeError("Ray Data: a map task failed") from RayTaskError(ours)
    except RuntimeError as exc:
        assert _user_error(exc) is ours
    other = ValueError("not ours")
    assert _user_error(other) is other


def test_unreachable_address_fails_fast_before_any_work(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    from retrieval.build_ray import build_index_ray

    import ray

    assert not ray.is_initialized()  # runs before the module's cluster starts, so the address is really tried
    with pytest.raises(PragError, match=r"cannot reach the Ray cluster at --ray-address '127.0.0.1:1'"):
        build_index_ray(corpus, tmp_path / "idx", IndexConfig(), RayIndexOptions(address="127.0.0.1:1"),
                        progress=False)
    assert not (tmp_path / "idx").exists()


# ---------------------------------------------------------------------------------------- on a local cluster


@pytest.fixture(scope="module")
def nq_small(tmp_path_factory):
    path = shared_data_file("nq_open_oracle.jsonl.gz")
    docs, qas = pool_oracle_passages(path)
    docs = docs[:N_PASSAGES]
    keep = {d["id"] for d in docs}
    questions = [qa.question for qa in qas if qa.gold_id in keep]
    root = tmp_path_factory.mktemp("nq-ray")
    corpus = root / "pool.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return {"root": root, "corpus": corpus, "questions": questions}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU cluster for the builds below; `--ray-address local` joins it instead of starting one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_build_gives_the_single_process_index(nq_small, ray_cluster, capsys):
    """One build command, once in this process and once on Ray: the same doc store rows, the same vectors
    at the same FAISS ids, the same top-k. IVF with a training sample smaller than the corpus, so the
    sample's shards go through the actor pool first and then every row in order; 2 lists, both probed,
    so search is exhaustive and any difference would be the vectors'."""
    root, corpus = nq_small["root"], nq_small["corpus"]
    flags = ["--index-type", "ivf", "--train-size", "100", "--chunk-size", "64", "--quiet"]
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(root / "single"), *flags]) == 0
    # two actors, 64-passage shards: 6 blocks (2 of the sample, 4 of the corpus) from two processes, put in order
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(root / "ray"), *flags,
                 "--ray-address", "local", "--ray-embed-actors", "2"]) == 0
    assert f"indexed {N_PASSAGES} passages" in capsys.readouterr().out
    single, ray_dir = root / "single", root / "ray"
    ms, mr = read_manifest(single), read_manifest(ray_dir)
    assert (mr.count, mr.dim, mr.embedder, mr.index_type, mr.corpus_sha256, mr.index_params) == \
        (ms.count, ms.dim, ms.embedder, ms.index_type, ms.corpus_sha256, ms.index_params)
    assert (mr.count, mr.index_type, mr.index_params["train_size"], mr.index_params["nlist"],
            mr.index_params["nprobe"]) == (N_PASSAGES, "ivf", 100, 2, 2)
    with closing(DocStore(single / DOCSTORE_FILE)) as a, closing(DocStore(ray_dir / DOCSTORE_FILE)) as b:
        assert [d.id for c in a.iter_rows() for d in c] == [d.id for c in b.iter_rows() for d in c]  # row i: one doc
    vs, vr = _vectors(single), _vectors(ray_dir)
    assert vs.shape == vr.shape == (N_PASSAGES, 384)
    np.testing.assert_allclose(vr, vs, atol=1e-5)
    assert not np.allclose(vs[0], vs[1])

    questions = nq_small["questions"]
    assert len(questions) >= 200
    with Retriever.load(single) as a, Retriever.load(ray_dir, embedder=a.embedder) as b:
        qvecs = a.encode_questions(questions)
        ids = lambda r: [list(zip(r.store.ids_of_rows([x for x, _ in h]), [s for _, s in h]))
                         for h in r.search_vectors(qvecs, K)]
        top_a, top_b = ids(a), ids(b)
    exact = sum([d for d, _ in x] == [d for d, _ in y] for x, y in zip(top_a, top_b))
    print(f"Ray vs single-process build: {exact} of {len(questions)} top-{K} lists identical, max vector "
          f"difference {np.abs(vr - vs).max():.1e}")
    assert all(_same_ranking(x, y) for x, y in zip(top_a, top_b))
    assert exact >= len(questions) - 2, f"only {exact} of {len(questions)} top-{K} lists identical"
